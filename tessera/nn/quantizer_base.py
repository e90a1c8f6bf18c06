"""
What every quantizer of the VQ-GAN tokenizer shares: its output, its interface, and codebook-usage
statistics.

A quantizer sits between the encoder and the decoder. It maps the encoder output z (B, C, H, W)
to a grid of integer ids, which stage 2 models, and to z_q (B, C, H, W), the quantized tensor the
decoder sees; the decoder's gradient reaches the encoder straight through the rounding
(z_q = z + sg(q - z)). `ids_to_codes` is the decode path of stage 2: sampled ids back to z_q.

The quantizers: `VectorQuantizer` (vector_quantizer.py), `ResidualQuantizer`
(residual_quantizer.py), `LookupFreeQuantizer` (lookup_free_quantizer.py),
`FiniteScalarQuantizer` (finite_scalar_quantizer.py), `GumbelQuantizer` (gumbel_quantizer.py, DALL-E's
dVAE: a relaxed sample in training, whose decoder gradient needs no straight-through estimate).

References:
1) Neural Discrete Representation Learning (VQ-VAE), van den Oord, Vinyals & Kavukcuoglu 2017:
https://arxiv.org/abs/1711.00937 (straight-through estimator, perplexity as codebook health)
2) Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation (LlamaGen), Sun et al.
2024: https://arxiv.org/abs/2406.06525 (usage = distinct ids in a rolling window of 65,536 ids,
there counted per rank; here across all ranks)
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


@dataclass
class QuantizerOutput:
    """What every quantizer's forward returns."""

    z_q: Tensor
    """(B, C, H, W) quantized z in z's dtype; its gradient flows straight through to z."""
    ids: Tensor
    """(B, H, W) long codebook ids, or (B, H, W, D) for a residual quantizer of depth D."""
    loss: Tensor
    """fp32 scalar: the weighted sum of the auxiliary terms, to add to the generator loss."""
    losses: dict[str, Tensor] = field(default_factory=dict)
    """The auxiliary terms by name, unweighted, for logging."""
    stats: dict[str, Tensor] = field(default_factory=dict)
    """Codebook health for logging: `usage` (fraction of codes used) and `perplexity`; see
    `CodebookUsage` for the window they cover."""


class Quantizer(nn.Module, ABC):
    """The interface of every quantizer: z (B, C, H, W) -> `QuantizerOutput`, and ids -> z_q.

    Codebook math runs in IEEE fp32 (`tessera.precision.fp32_math`) even under bf16 autocast or
    with TF32 allowed: distances between close codes and the EMA statistics lose too much in 8 or
    10 mantissa bits.

    Every subclass keeps each constructor argument as an attribute of the same name (`dim`, the
    channels of the z it takes, among them), so `quantizer_spec` can write it into a checkpoint
    and `build_quantizer` can rebuild it without the config that made it.
    """

    dim: int

    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """Number of distinct ids: stage 2's image vocabulary."""

    @abstractmethod
    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize z (B, C, H, W)."""

    @abstractmethod
    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """ids as in `QuantizerOutput.ids` -> fp32 z_q (B, C, H, W), equal to forward's z_q."""

    def set_step(self, step: int) -> None:
        """The training step the next training forward belongs to, handed over by the training loop.
        A quantizer whose training anneals with the step (`GumbelQuantizer`) keeps it; the others
        have no use for it."""


def quantizer_spec(quantizer: Quantizer) -> dict[str, Any]:
    """{"class_path": ..., "init_args": {...}}: the LightningCLI form of the quantizer's config."""
    cls = type(quantizer)
    names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    init_args = {}
    for name in names:
        value = getattr(quantizer, name)
        if isinstance(value, Quantizer):  # a quantizer made of quantizers (MultiScaleQuantizer's levels)
            value = quantizer_spec(value)
        init_args[name] = list(value) if isinstance(value, tuple) else value
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_quantizer(spec: dict[str, Any]) -> Quantizer:
    """The quantizer `quantizer_spec` described, with fresh weights."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise TypeError(f"{spec['class_path']} is not a tessera Quantizer")
    return cls(**spec["init_args"])


# -----------------------------------------------------------------------------
# collectives: no-ops on one process, so the same code runs with and without torch.distributed


def distributed() -> bool:
    """True inside an initialised process group (DDP, FSDP, or a test's gloo group)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the process group; 1 outside one."""
    return dist.get_world_size() if distributed() else 1


def all_reduce_sum_(x: Tensor) -> Tensor:
    """Sum x in place over all ranks."""
    if distributed():
        dist.all_reduce(x)
    return x


def broadcast_from_rank0_(x: Tensor) -> Tensor:
    """Overwrite x in place with rank 0's x."""
    if distributed():
        dist.broadcast(x, src=0)
    return x


def all_gather_ids(ids: Tensor, size: int) -> Tensor:
    """Every rank's 1-D ids, at most `size` of them, in rank order, each rank's padded with -1 to
    `size` (ids are never negative); on one process, the ids as they are.

    Ranks may hold different numbers of ids: a fixed size, known to every rank, spares reading
    each rank's count back to the host (a CUDA sync) to size the gather."""
    if not distributed():
        return ids
    padded = torch.cat([ids, ids.new_full((size - len(ids),), -1)])  # (size,)
    gathered = ids.new_empty(world_size() * size)
    dist.all_gather_into_tensor(gathered, padded)
    return gathered


def code_counts(ids: Tensor, codebook_size: int) -> Tensor:
    """(K,) long: how often each code occurs in ids. `torch.bincount` would read the largest id
    back to the host on CUDA (a sync) to size its output; here the codebook sizes it."""
    ids = ids.flatten()
    return torch.zeros(codebook_size, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


# -----------------------------------------------------------------------------


def usage_stats(counts: Tensor) -> dict[str, Tensor]:
    """Usage (fraction of codes counted at least once) and perplexity of a histogram of ids.

    Perplexity is exp(entropy) of the id distribution: the number of equally used codes that
    would give the same entropy, up to the codebook size.
    """
    probs = counts.float() / counts.sum().clamp_min(1)
    entropy = -torch.special.xlogy(probs, probs).sum()  # xlogy: unused codes add 0 log 0 = 0
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class CodebookUsage(nn.Module):
    """Counts of every code over the last `window` ids of all ranks together.

    In training mode each call gathers the batch's ids from every rank (in rank order, so one
    process fed the whole batch sees exactly the same stream), pushes them into a ring buffer of
    the last `window` ids and returns `usage_stats` of the ring. Memory is one long per code plus
    one per window slot (2 MB + 0.5 MB for 2^18 codes and 65,536 ids), whatever the codebook.
    Each rank sends its newest `window` ids padded to `window`: a gather whose size no rank's count
    decides, so the step never waits for one on the host (4 MB a step at 8 ranks, ~1% of a 76M
    tokenizer's gradient all-reduce).

    Every buffer holds the same values on every rank, so DDP's broadcast of buffers from rank 0
    changes nothing, and they are saved in the state dict, so a resumed run reports the same
    numbers.

    In eval mode a call runs no collectives (sampling may run on one rank only) and leaves the
    ring alone: it returns the stats of the given ids, per rank.
    """

    def __init__(self, codebook_size: int, window: int = 65536):
        super().__init__()
        self.codebook_size = codebook_size
        self.window = window
        self.register_buffer("recent_ids", torch.full((window,), -1, dtype=torch.long))  # ring, -1 = empty
        self.register_buffer("counts", torch.zeros(codebook_size, dtype=torch.long))  # histogram of the ring
        self.register_buffer("position", torch.zeros((), dtype=torch.long))  # next slot to overwrite

    @torch.no_grad()
    def forward(self, ids: Tensor) -> dict[str, Tensor]:
        ids = ids.flatten()
        if not self.training:
            return usage_stats(code_counts(ids, self.codebook_size))
        # only the newest `window` ids can stay; -1 pads the ranks' shares of the gather. Every shape
        # below is fixed by the window and the world size: nothing is read back to the host
        ids = all_gather_ids(ids[-self.window :], self.window)  # (n,)
        real = ids >= 0
        order = real.cumsum(0) - 1  # (n,) place of each real id among the real ones, oldest first
        total = real.sum()  # real ids gathered
        skipped = (total - self.window).clamp_min(0)  # the oldest, which the newer ones would overwrite at once
        kept = real & (order >= skipped)
        spare = self.window  # one slot past the ring takes every id not kept, and is then dropped
        slots = torch.where(kept, (self.position + order - skipped) % self.window, spare)  # (n,) distinct where kept
        ring = torch.cat([self.recent_ids, self.recent_ids.new_full((1,), -1)])  # (window + 1,)
        evicted = ring[slots]
        # empty slots (-1) and the spare slot are subtracted with weight 0
        self.counts.index_add_(0, evicted.clamp_min(0), -(evicted >= 0).long())
        self.counts.index_add_(0, ids.clamp_min(0), kept.long())
        ring[slots] = ids
        self.recent_ids.copy_(ring[:-1])
        self.position.copy_((self.position + total - skipped) % self.window)
        return usage_stats(self.counts)
