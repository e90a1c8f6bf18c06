"""
Vector quantization: every position of z snaps to its nearest code in a codebook of K vectors.

The codebook learns either by gradient (the VQ-VAE codebook loss) or by an exponential moving
average of the vectors assigned to each code (no gradient), optionally on the unit sphere, and
codes nobody uses are restarted on vectors of the current batch.

References:
1) Neural Discrete Representation Learning (VQ-VAE), van den Oord, Vinyals & Kavukcuoglu 2017:
https://arxiv.org/abs/1711.00937 (codebook and commitment losses, straight-through estimator,
EMA codebook updates in its appendix)
2) Generating Diverse High-Fidelity Images with VQ-VAE-2, Razavi, van den Oord & Vinyals 2019:
https://arxiv.org/abs/1906.00446 (EMA with Laplace smoothing of the cluster sizes)
3) Taming Transformers (VQGAN), Esser, Rombach & Ommer 2021; its VectorQuantizer2 with the
default legacy=True puts beta on the codebook term instead of the commitment term:
https://github.com/CompVis/taming-transformers/blob/master/taming/modules/vqvae/quantize.py
4) Vector-quantized Image Modeling with Improved VQGAN (ViT-VQGAN), Yu et al. 2021:
https://arxiv.org/abs/2110.04627 (l2-normalised codes, low-dimensional lookup)
5) Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation (LlamaGen), Sun et al.
2024: https://arxiv.org/abs/2406.06525 (8-dim l2-normalised codes: 97% usage of 16,384 codes)
6) Jukebox, Dhariwal et al. 2020: https://arxiv.org/abs/2005.00341 (random restarts of codes whose
mean usage falls below a threshold); RQ-VAE's restart_unused_codes, which broadcasts rank 0's
choice: https://github.com/kakaobrain/rq-vae-transformer/blob/main/rqvae/models/rqvae/quantizations.py
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tessera.nn.quantizer_base import (
    CodebookUsage,
    Quantizer,
    QuantizerOutput,
    all_reduce_sum_,
    broadcast_from_rank0_,
    code_counts,
)
from tessera.precision import fp32_math

LAPLACE_EPS = 1e-5  # VQ-VAE-2's epsilon: keeps a code that lost all its vectors from dividing by zero
COUNT_DECAY = 0.99  # decay of the usage counts that find dead codes when the codebook itself is not an EMA


class VectorQuantizer(Quantizer):
    """Nearest-code quantization of z (B, dim, H, W) into ids (B, H, W).

    Args:
        dim: channels of z and of every code. LlamaGen's low-dimensional lookup (8 channels) is
            the caller's business: a 1x1 conv projects the encoder output down to `dim` before
            the quantizer and another projects z_q back up after it.
        codebook_size: number of codes K.
        beta: weight of the commitment loss ||z - sg(q)||^2, which keeps the encoder near its
            codes. The codebook loss ||sg(z) - q||^2 has weight 1, as in VQ-VAE; taming's legacy
            VectorQuantizer2 swaps the two and weights the codebook term by beta.
        l2_normalize: look up, and return, unit-length z and codes (ViT-VQGAN, LlamaGen):
            distances become cosine distances and no code can drift far from the data. The
            codebook then starts with unit rows (LlamaGen), not taming's U(-1/K, 1/K).
        ema_decay: None learns the codebook with the codebook loss. A decay (0.99 in VQ-VAE-2)
            instead moves every code to an exponential moving average of the vectors assigned
            to it, summed over all ranks; the codebook gets no gradient and the loss is the
            commitment term alone.
        dead_code_threshold: in training, restart every code whose moving average of
            assignments per step (over all ranks; decay `ema_decay`, or 0.99 without EMA)
            falls below this, on a random vector of rank 0's batch. 0 turns restarts off. Every
            code starts with an average of 1, so a threshold above 1 restarts, at the first
            step, every code that step does not lift above it: a data-dependent initialisation.
        usage_window: how many of the newest ids, over all ranks, the `usage` and `perplexity`
            stats cover.
    """

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int = 16384,
        beta: float = 0.25,
        l2_normalize: bool = False,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0.0,
        usage_window: int = 65536,
    ):
        super().__init__()
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay}")
        self.dim = dim
        self._codebook_size = codebook_size
        self.beta = beta
        self.l2_normalize = l2_normalize
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.usage_window = usage_window

        codebook = torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)  # taming's init
        if l2_normalize:
            # on the sphere, as LlamaGen: rows of norm ~1e-4 (K = 16384) would turn by ~70 degrees in one
            # Adam step of lr 1e-4 (the lookup sees only their direction), unit rows by ~0.01 degrees
            codebook = F.normalize(codebook, dim=-1)
        if ema_decay is None:
            self.codebook = nn.Parameter(codebook)  # (K, dim)
        else:
            # a buffer: no optimizer touches it, and it is saved and broadcast like the statistics
            self.register_buffer("codebook", codebook)  # (K, dim) = code_sum / smoothed code_count
            self.register_buffer("code_sum", codebook.clone())  # (K, dim) EMA of the summed assigned vectors
        if ema_decay is not None or dead_code_threshold > 0:
            # EMA of the assignments per step over all ranks; starting at 1, every code counts as
            # having been assigned once, to itself, so code_sum / code_count is the codebook
            self.register_buffer("code_count", torch.ones(codebook_size))  # (K,)
        self.codebook_usage = CodebookUsage(codebook_size, usage_window)

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    def codes(self, ids: Tensor) -> Tensor:
        """ids (...) -> fp32 codes (..., dim), unit length with `l2_normalize`."""
        # gather, then normalise: autograd then saves the gathered rows, not the codebook, which
        # a dead-code restart may overwrite before the backward pass
        codes = self.codebook[ids].float()
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 vectors z (N, dim), already normalised with `l2_normalize`, -> their nearest codes:
        ids (N,) and codes (N, dim), the codes carrying the codebook's gradient."""
        ids = self.distances(z).argmin(1)  # (N,)
        return ids, self.codes(ids)

    @torch.no_grad()
    def distances(self, z: Tensor) -> Tensor:
        """fp32 vectors z (N, dim) -> ||z - e_k||^2 - ||z||^2 for every code e_k, (N, K): the squared
        distances up to a constant per row, which neither an argmin nor a softmax over codes sees."""
        codebook = self.codebook.float()
        if self.l2_normalize:
            codebook = F.normalize(codebook, dim=-1)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 in one matmul
        return torch.addmm(codebook.square().sum(1), z, codebook.t(), alpha=-2)

    @torch.no_grad()
    def update_codebook(self, z: Tensor, ids: Tensor) -> Tensor:
        """In training: the EMA step and dead-code restarts from fp32 vectors z (N, dim) and their
        ids (N,). Returns the number of codes restarted, a long scalar on z's device.

        Every rank runs the same collectives in the same order: one all-reduce of this step's
        counts (and sums), then, with restarts on, one broadcast of rank 0's replacements. No shape
        depends on the data, so nothing is read back to the host (no CUDA sync).
        """
        restarted = z.new_zeros((), dtype=torch.long)
        if not self.training or (self.ema_decay is None and self.dead_code_threshold <= 0):
            return restarted
        counts = code_counts(ids, self.codebook_size).float()  # (K,)
        if self.ema_decay is None:
            local = counts[:, None]  # (K, 1)
        else:
            sums = torch.zeros_like(self.code_sum).index_add_(0, ids, z)  # (K, dim)
            local = torch.cat([sums, counts[:, None]], dim=1)  # (K, dim + 1)
        # a last row flags ranks whose vectors are not finite (a step about to be skipped): then no
        # rank updates anything, decided without a host sync
        nonfinite = (~torch.isfinite(z).all()).float().expand(1, local.shape[1])
        stats = all_reduce_sum_(torch.cat([local, nonfinite]))  # (K + 1, ...): one collective
        finite = stats[-1, 0] == 0

        def lerp_if_finite_(state: Tensor, target: Tensor, weight: float) -> None:
            state.copy_(torch.where(finite, state.lerp(target, weight), state))

        if self.ema_decay is None:
            lerp_if_finite_(self.code_count, stats[:-1, 0], 1 - COUNT_DECAY)
        else:
            lerp_if_finite_(self.code_sum, stats[:-1, :-1], 1 - self.ema_decay)
            lerp_if_finite_(self.code_count, stats[:-1, -1], 1 - self.ema_decay)
            # Laplace smoothing: a count near 0 divides by about LAPLACE_EPS, never by 0, and the
            # smoothed counts still add up to the total
            n = self.code_count.sum()
            smoothed = (self.code_count + LAPLACE_EPS) / (n + self.codebook_size * LAPLACE_EPS) * n  # (K,)
            self.codebook.copy_(torch.where(finite, self.code_sum / smoothed[:, None], self.codebook))
        if self.dead_code_threshold <= 0 or len(z) == 0:
            return restarted

        dead = (self.code_count < self.dead_code_threshold) & finite  # (K,), equal on every rank
        # a replacement for every code, used where it is dead: the j-th dead code takes the j-th
        # vector of a random order of the batch, distinct while the batch has enough, then random
        # ones (a twin stays unused and is restarted again next step); only rank 0's choice counts
        order = dead.cumsum(0) - 1  # (K,)
        shuffled = torch.randperm(len(z), device=z.device)[order.clamp(0, len(z) - 1)]
        pick = torch.where(order < len(z), shuffled, torch.randint(len(z), (self.codebook_size,), device=z.device))
        restarts = broadcast_from_rank0_(z[pick])  # (K, dim): 16 MB at 16,384 x 256, a few % of a 76M tokenizer's gradients
        self.codebook.copy_(torch.where(dead[:, None], restarts, self.codebook))
        # a restarted code counts as used `threshold` times, by its vector: the next step keeps it
        # only if it assigns it at least `threshold` vectors
        self.code_count.masked_fill_(dead, self.dead_code_threshold)
        if self.ema_decay is not None:
            self.code_sum.copy_(torch.where(dead[:, None], restarts * self.dead_code_threshold, self.code_sum))
        return dead.sum()

    def forward(self, z: Tensor) -> QuantizerOutput:
        B, _, H, W = z.shape
        with fp32_math(z.device.type):
            z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (B*H*W, dim)
            if self.l2_normalize:
                z_flat = F.normalize(z_flat, dim=-1)
            ids, q = self.quantize(z_flat)  # (N,), (N, dim)
            losses = {"commitment": F.mse_loss(z_flat, q.detach())}
            if self.ema_decay is None:
                losses["codebook"] = F.mse_loss(q, z_flat.detach())
                loss = losses["codebook"] + self.beta * losses["commitment"]
            else:
                loss = self.beta * losses["commitment"]
            # straight through: q's value, z's gradient; z - sg(z) is exactly 0, so z_q equals
            # ids_to_codes(ids) to the bit
            z_q = q.detach() + (z_flat - z_flat.detach())  # (N, dim)
            restarted = self.update_codebook(z_flat.detach(), ids)
        ids = ids.view(B, H, W)
        stats = self.codebook_usage(ids)
        if self.dead_code_threshold > 0:
            stats["dead_codes"] = restarted.float()
        z_q = z_q.view(B, H, W, self.dim).permute(0, 3, 1, 2).to(z.dtype)  # (B, dim, H, W)
        return QuantizerOutput(z_q=z_q, ids=ids, loss=loss, losses=losses, stats=stats)

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        with fp32_math(ids.device.type):
            return self.codes(ids).permute(0, 3, 1, 2)  # (B, H, W, dim) -> (B, dim, H, W)
