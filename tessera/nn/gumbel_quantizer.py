"""
Gumbel-softmax quantization: DALL-E's discrete VAE bottleneck.

Every position of z (B, dim, H, W) gets K logits from a 1x1 projection: a categorical posterior
q(id | x) over the K codes. Training draws a relaxed one-hot sample from it with Gumbel-softmax,
softmax((logits + g) / tau) with g ~ Gumbel(0, 1), and hands the decoder its mix of codebook rows,
soft @ codebook (K x dim): a sample that is differentiable in the logits, so the decoder's gradient
reaches the encoder without a straight-through estimate. As tau falls towards 0 the sample tends to
a one-hot; evaluation, `encode` and stage 2 take the argmax of the logits, one code per position.
`straight_through` instead gives the decoder the sample's argmax code in the forward pass, still with
the relaxed sample's gradient.

The ELBO's second term is the KL of q to the uniform prior over the K codes, log K - H(q) per
position, computed from the logits themselves whatever tau (as DALL-E does). Its weight and tau both
follow cosine schedules of the training step, which the training loop hands over through `set_step`
and which is kept in a buffer, so a checkpoint resumes at its schedule position:
    kl_weight(step) = kl_weight * (1 - cos(pi * min(step / kl_warmup_steps, 1))) / 2    0 -> kl_weight
    tau(step) = tau_end + (tau_start - tau_end) * (1 + cos(pi * min(step / temperature_steps, 1))) / 2

DALL-E's recipe: 8,192 codes, tau from 1 to 1/16 over 150,000 updates, the KL weight beta raised from
0 to 6.6 over the first 5,000 updates and held there. Its loss is the ELBO divided by the image's
3 x 256 x 256 values, so a per-pixel reconstruction term sits beside beta / 192 times the KL per
position of its 32 x 32 grid (192 = 3 x 8^2 values per position at f8): `kl_weight` is that
beta / (3 f^2), as this quantizer's KL is the mean over positions.

References:
1) Zero-Shot Text-to-Image Generation (DALL-E), Ramesh et al. 2021: https://arxiv.org/abs/2102.12092
(appendix A: the dVAE, its schedules and loss scaling); https://github.com/openai/DALL-E issues #8
(the KL weight held at 6.6 after 5,000 updates) and #26 (the KL from the encoder's logits)
2) Categorical Reparameterization with Gumbel-Softmax, Jang, Gu & Poole 2016:
https://arxiv.org/abs/1611.01144 (the relaxation, its straight-through variant)
3) The Concrete Distribution, Maddison, Mnih & Teh 2016: https://arxiv.org/abs/1611.00712
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tessera.nn.quantizer_base import CodebookUsage, Quantizer, QuantizerOutput
from tessera.precision import fp32_math


def cosine_ramp(step: Tensor, steps: int) -> Tensor:
    """fp32 0 at step 0 rising along a half cosine to 1 at `steps`, and 1 from there on (at once for
    steps <= 0). A tensor function of a tensor step: no host sync, no recompilation per step."""
    if steps <= 0:
        return torch.ones_like(step, dtype=torch.float32)
    progress = (step.float() / steps).clamp(0.0, 1.0)
    return (1.0 - torch.cos(math.pi * progress)) / 2


def kl_to_uniform(logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(logits) || uniform over the K columns) = log K - H, in nats, for
    fp32 logits (N, K). 0 for uniform rows, log K for one-hot ones."""
    log_probs = logits.log_softmax(-1)  # (N, K)
    neg_entropy = (log_probs.exp() * log_probs).sum(-1)  # (N,) a code of probability 0 adds 0 * finite
    return neg_entropy.mean() + math.log(logits.shape[-1])


class GumbelQuantizer(Quantizer):
    """z (B, dim, H, W) -> K logits per position -> Gumbel-softmax codes (training) or argmax ids.

    Args:
        dim: channels of z and of every code.
        codebook_size: number of codes K (DALL-E: 8,192).
        straight_through: in training, decode the argmax of the relaxed sample (its codebook row,
            exactly) with the relaxed sample's gradient, instead of the relaxed mix itself.
        temperature_start: tau at step 0.
        temperature_end: tau from `temperature_steps` on (DALL-E: 1/16).
        temperature_steps: training steps of the cosine from `temperature_start` to `temperature_end`.
        kl_weight: weight of the mean KL per position to the uniform prior once warmed up (DALL-E's
            beta 6.6 over the 192 pixel values per position of its f8 grid: 0.034375).
        kl_warmup_steps: training steps of the cosine rise of the KL weight from 0.
        usage_window: ids in the usage and perplexity window (see `CodebookUsage`).

    In training, `ids` are the argmax of the relaxed sample and `stats` add the step's `temperature`
    and `kl_weight`; `ids_to_codes(ids)` equals z_q in eval mode and with `straight_through`, while
    the relaxed z_q is a mix of codes that no id names.
    """

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int = 8192,
        straight_through: bool = False,
        temperature_start: float = 1.0,
        temperature_end: float = 1 / 16,
        temperature_steps: int = 150_000,
        kl_weight: float = 6.6 / 192,
        kl_warmup_steps: int = 5000,
        usage_window: int = 65536,
    ):
        super().__init__()
        if not 0.0 < temperature_end <= temperature_start:
            raise ValueError(
                f"the temperature must anneal down to a positive end: 0 < temperature_end <= temperature_start, "
                f"got start {temperature_start} and end {temperature_end}"
            )
        self.dim = dim
        self._codebook_size = codebook_size
        self.straight_through = straight_through
        self.temperature_start = temperature_start
        self.temperature_end = temperature_end
        self.temperature_steps = temperature_steps
        self.kl_weight = kl_weight
        self.kl_warmup_steps = kl_warmup_steps
        self.usage_window = usage_window

        # the 1x1 projection to logits, applied to (N, dim) rows: no permuted copy of a (B, K, H, W) tensor
        self.to_logits = nn.Linear(dim, codebook_size)
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))  # (K, dim): N(0, 1), as taming's GumbelQuantize
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # the schedules' position, saved
        self.codebook_usage = CodebookUsage(codebook_size, usage_window)

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    def set_step(self, step: int) -> None:
        self.step.fill_(step)

    def temperature(self) -> Tensor:
        """fp32 tau at the current step."""
        annealed = cosine_ramp(self.step, self.temperature_steps)
        return self.temperature_end + (self.temperature_start - self.temperature_end) * (1.0 - annealed)

    def current_kl_weight(self) -> Tensor:
        """fp32 weight of the KL term at the current step."""
        return self.kl_weight * cosine_ramp(self.step, self.kl_warmup_steps)

    def logits(self, z: Tensor) -> Tensor:
        """fp32 vectors z (N, dim) -> fp32 logits (N, K) of the posterior over the codes."""
        return F.linear(z, self.to_logits.weight.float(), self.to_logits.bias.float())

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"GumbelQuantizer(dim={self.dim}) takes z (B, {self.dim}, H, W), got {tuple(z.shape)}")
        B, _, H, W = z.shape
        with fp32_math(z.device.type):
            z_flat = z.float().permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, dim), N = B*H*W
            logits = self.logits(z_flat)  # (N, K)
            codebook = self.codebook.float()
            if self.training:
                tau = self.temperature()
                soft = F.gumbel_softmax(logits, tau=tau, dim=-1)  # (N, K) rows on the simplex
                ids = soft.argmax(-1)  # (N,) the code the sample is nearest to
                if self.straight_through:
                    # the argmax row exactly (soft - soft is exactly 0), with the soft sample's gradient
                    z_q = codebook[ids] + (soft - soft.detach()) @ codebook  # (N, dim)
                else:
                    z_q = soft @ codebook  # (N, dim)
                kl = kl_to_uniform(logits)
                weight = self.current_kl_weight()
                loss, losses = weight * kl, {"kl": kl}
                extra = {"temperature": tau, "kl_weight": weight}
            else:
                # no KL: nothing trains on it here, and at 8,192 codes it would triple the memory of the logits
                ids = logits.argmax(-1)  # (N,)
                z_q = codebook[ids]  # (N, dim)
                loss, losses, extra = z_flat.new_zeros(()), {}, {}
        ids = ids.view(B, H, W)
        stats = {**self.codebook_usage(ids), **extra}
        z_q = z_q.view(B, H, W, self.dim).permute(0, 3, 1, 2).to(z.dtype)  # (B, dim, H, W)
        return QuantizerOutput(z_q=z_q, ids=ids, loss=loss, losses=losses, stats=stats)

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        with fp32_math(ids.device.type):
            return self.codebook[ids].float().permute(0, 3, 1, 2)  # (B, H, W, dim) -> (B, dim, H, W)
