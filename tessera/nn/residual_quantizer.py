"""
Residual quantization (RQ-VAE): D ids per position, each quantizing what the previous ones left.

Depth 1 quantizes z, depth 2 the residual z - q1, depth 3 z - q1 - q2, and so on; z_q is the
sum of the D codes, so a K-code codebook reaches K^D points while stage 2 still predicts from
a K-word vocabulary. One codebook, a `VectorQuantizer`, serves every depth: it learns the coarse
codes of depth 1 and the fine ones of depth D alike.

References:
1) Autoregressive Image Generation using Residual Quantization (RQ-VAE), Lee et al. 2022:
https://arxiv.org/abs/2203.01941 (shared codebook, commitment loss on the partial sums averaged
over depths, EMA codebook)
https://github.com/kakaobrain/rq-vae-transformer/blob/main/rqvae/models/rqvae/quantizations.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tessera.nn.quantizer_base import Quantizer, QuantizerOutput
from tessera.nn.vector_quantizer import VectorQuantizer
from tessera.precision import fp32_math


class ResidualQuantizer(Quantizer):
    """Residual quantization of z (B, dim, H, W) into ids (B, H, W, depth) with one shared codebook.

    Args:
        dim: channels of z and of every code.
        codebook_size: number of codes K, shared by all depths.
        depth: number of codes D summed per position.
        beta: weight of the commitment loss: the mean over depths d of ||z - sg(q1 + ... + qd)||^2,
            as RQ-VAE, so every partial sum, not only the last, pulls the encoder.
        ema_decay: None learns the codebook with the codebook loss (every depth's code toward the
            residual it quantized); a decay (RQ-VAE's 0.99) makes it an EMA of those residuals.
            Unlike RQ-VAE, which updates the shared codebook after each depth, the residuals of
            all depths update it once per step: one all-reduce instead of D, and every depth's
            lookup sees the same codebook.
        dead_code_threshold: restart codes used less than this per step, on random residuals of
            rank 0's batch (of any depth); see `VectorQuantizer`. 0 turns restarts off.
        usage_window: how many of the newest ids, of all depths and ranks, the `usage` and
            `perplexity` stats cover.
    """

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int = 16384,
        depth: int = 4,
        beta: float = 0.25,
        ema_decay: float | None = 0.99,
        dead_code_threshold: float = 0.0,
        usage_window: int = 65536,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dim = dim
        self.depth = depth
        self.beta = beta
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.usage_window = usage_window
        self.vq = VectorQuantizer(
            dim=dim,
            codebook_size=codebook_size,
            beta=beta,
            ema_decay=ema_decay,
            dead_code_threshold=dead_code_threshold,
            usage_window=usage_window,
        )

    @property
    def codebook_size(self) -> int:
        return self.vq.codebook_size

    def forward(self, z: Tensor) -> QuantizerOutput:
        B, _, H, W = z.shape
        with fp32_math(z.device.type):
            z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, dim), N = B*H*W
            quantized = torch.zeros_like(z_flat)  # sum of the codes so far, no gradient
            residuals, ids, codes, partial_sums = [], [], [], []
            for _ in range(self.depth):
                residual = z_flat.detach() - quantized
                ids_d, q = self.vq.quantize(residual)  # (N,), (N, dim)
                quantized = quantized + q.detach()
                residuals.append(residual)
                ids.append(ids_d)
                codes.append(q)
                partial_sums.append(quantized)
            residuals = torch.stack(residuals)  # (D, N, dim)
            ids = torch.stack(ids)  # (D, N)

            losses = {"commitment": (z_flat - torch.stack(partial_sums)).square().mean()}
            if self.ema_decay is None:
                losses["codebook"] = F.mse_loss(torch.stack(codes), residuals)
                loss = losses["codebook"] + self.beta * losses["commitment"]
            else:
                loss = self.beta * losses["commitment"]
            # straight through the sum; z - sg(z) is exactly 0, so z_q equals ids_to_codes(ids)
            z_q = quantized + (z_flat - z_flat.detach())  # (N, dim)
            restarted = self.vq.update_codebook(residuals.flatten(0, 1), ids.flatten())
        ids = ids.t().reshape(B, H, W, self.depth)
        stats = self.vq.codebook_usage(ids)  # one window over every depth's ids
        if self.dead_code_threshold > 0:
            stats["dead_codes"] = restarted.float()
        z_q = z_q.view(B, H, W, self.dim).permute(0, 3, 1, 2).to(z.dtype)  # (B, dim, H, W)
        return QuantizerOutput(z_q=z_q, ids=ids, loss=loss, losses=losses, stats=stats)

    @torch.no_grad()
    def soft_codes(
        self, z: Tensor, temperature: float, stochastic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """The RQ-Transformer's soft targets for z (B, dim, H, W): ids (B, H, W, D) and, for each
        depth, softmax(-||r - e_k||^2 / temperature) over the codes e_k for the residual r that depth
        quantizes, (B, H, W, D, K) fp32. With `stochastic` each id is drawn from its distribution
        (seeded by `generator`) instead of being the nearest code, and the residuals after it
        follow the drawn code; otherwise the ids are `forward`'s."""
        B, _, H, W = z.shape
        with fp32_math(z.device.type):
            z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, dim)
            quantized = torch.zeros_like(z_flat)
            ids, targets = [], []
            for _ in range(self.depth):
                probs = (-self.vq.distances(z_flat - quantized) / temperature).softmax(dim=-1)  # (N, K)
                if stochastic:
                    ids_d = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
                else:
                    ids_d = probs.argmax(dim=-1)
                quantized = quantized + self.vq.codes(ids_d)
                ids.append(ids_d)
                targets.append(probs)
        ids = torch.stack(ids, dim=-1).view(B, H, W, self.depth)
        return ids, torch.stack(targets, dim=1).view(B, H, W, self.depth, -1)

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        with fp32_math(ids.device.type):
            codes = self.vq.codes(ids)  # (B, H, W, D, dim)
            # depth by depth from 0, the order forward adds them in, so the two agree to the bit
            z_q = sum(codes.unbind(-2), torch.zeros_like(codes[..., 0, :]))  # (B, H, W, dim)
            return z_q.permute(0, 3, 1, 2)  # (B, dim, H, W)
