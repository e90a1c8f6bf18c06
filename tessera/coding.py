"""
Lossless coding with an autoregressive model: a range coder whose categorical model at every step
is the model's own distribution over the next symbol, so a symbol costs about -log2 p(symbol) bits.

    encode: for step s = 0 .. S-1: logits = model(symbols before s) -> p -> code symbol s with p
    decode: for step s = 0 .. S-1: logits = model(symbols decoded) -> p -> read symbol s with p

The model is any `Steps` generator (tessera/sampling.py): the KV-cached loop the sampler runs, sent
the symbols being coded (or just decoded) instead of drawn ones. Encoder and decoder must compute
bitwise-identical probabilities, or the decoder reads garbage from the first differing step on:
so the model runs the same batch in fp32 on one CPU thread on both sides (the same code on the
same floats then gives the same bits; `tessera compress` sees to it), and the probabilities are
one fp32 softmax over the first K logits.

The coder is constriction's range coder (FIFO: symbols come out in the order they went in, as an
autoregressive model predicts them), with 32-bit words and 24-bit probabilities: each categorical
is quantized to integers summing to 2**24, every symbol given at least 1, so any symbol can be
coded. Over K symbols that floor costs at most K / 2**24 of the mass (0.1% at K = 16,384, about
0.0014 bit a symbol), where a 16-bit CDF (torchac's) would reserve 25% of it. The overhead over
the model's -log2 p is measured in BENCHMARKS.md (bench/compression_shapes.py).

References:
1) constriction, Bamler 2022: https://github.com/bamler-lab/constriction
   (Understanding Entropy Coding With Asymmetric Numeral Systems (ANS): a Statistician's Perspective,
   https://arxiv.org/abs/2201.01741)
2) Practical Full Resolution Learned Lossless Image Compression (L3C), Mentzer et al. 2019:
   https://arxiv.org/abs/1811.12817 (torchac, its 16-bit CDFs)
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np
import torch

from tessera.sampling import Steps, run_steps

PRECISION_BITS = 24
"""Bits of the probabilities the range coder works with (constriction's default range coder)."""


def probabilities(logits: torch.Tensor, alphabet: int) -> np.ndarray:
    """The categorical the coder uses for logits (B, >= alphabet): an fp32 softmax over the first
    `alphabet` columns (a head's padding columns are no symbols), as float64 rows summing to 1."""
    if logits.size(-1) < alphabet:
        raise ValueError(f"the model gives {logits.size(-1)} logits a step, fewer than the alphabet's {alphabet} symbols")
    probs = logits[:, :alphabet].float().softmax(dim=-1).double().cpu().numpy()  # (B, K)
    if not np.isfinite(probs).all():
        raise ValueError("the model's logits are not finite: no distribution to code with")
    return probs / probs.sum(axis=-1, keepdims=True)


@dataclass
class Coded:
    """A batch's symbols, range-coded into one stream."""

    words: np.ndarray
    """The coded stream, uint32."""
    information_bits: np.ndarray
    """(B,) -log2 p of each row's symbols under the model's (float) probabilities: what an ideal coder would spend."""

    @property
    def bits(self) -> int:
        return 32 * len(self.words)


def encode(steps: Steps, symbols: torch.Tensor, alphabet: int) -> Coded:
    """Range-codes symbols (B, S), in [0, alphabet), with the model `steps` that predicts them
    column by column; the stream holds the rows of each step in turn."""
    symbols = symbols.long().cpu()
    if symbols.dim() != 2:
        raise ValueError(f"symbols must be (B, S), got {tuple(symbols.shape)}")
    if symbols.numel() and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet}), got [{int(symbols.min())}, {int(symbols.max())}]")
    encoder, family = constriction.stream.queue.RangeEncoder(), categorical_family()
    information = np.zeros(symbols.size(0))
    step = 0

    def code(logits: torch.Tensor) -> torch.Tensor:
        nonlocal step, information
        if step == symbols.size(1):
            raise ValueError(f"the model predicts more than the {symbols.size(1)} symbols given a row")
        probs, column = probabilities(logits, alphabet), symbols[:, step]
        rows = column.numpy()
        encoder.encode(rows.astype(np.int32), family, probs)
        information -= np.log2(probs[np.arange(len(rows)), rows])
        step += 1
        return column.to(logits.device)

    run_steps(steps, code)
    if step != symbols.size(1):
        raise ValueError(f"the model predicts {step} symbols a row, {symbols.size(1)} were given")
    return Coded(encoder.get_compressed(), information)


def decode(steps: Steps, words: np.ndarray, alphabet: int) -> torch.Tensor:
    """The symbols (B, S) that `encode` coded into `words` with the same model: `steps` must yield
    the very probabilities the encoder's did (the same model, batch, captions, device and dtype)."""
    decoder, family = constriction.stream.queue.RangeDecoder(np.asarray(words, dtype=np.uint32)), categorical_family()
    columns = []

    def read(logits: torch.Tensor) -> torch.Tensor:
        column = torch.from_numpy(decoder.decode(family, probabilities(logits, alphabet)).astype(np.int64))
        columns.append(column)
        return column.to(logits.device)

    run_steps(steps, read)
    return torch.stack(columns, dim=1)  # (B, S)


def categorical_family() -> constriction.stream.model.Categorical:
    """Categoricals whose probabilities come with every step; `perfect=False`: constriction's fast
    quantization, the same on both sides (the encoder's and decoder's must match)."""
    return constriction.stream.model.Categorical(perfect=False)
