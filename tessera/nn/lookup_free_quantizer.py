"""
Lookup-free quantization (LFQ, MAGVIT-v2): every channel of z is one bit, its sign.

z (B, K, H, W) quantizes to q = sign(z) in {-1, +1}^K (0 counts as +1; Open-MAGVIT2 makes it -1, a
tie of probability zero): one of 2^K codes, with no codebook to look up or learn. An id holds channel
k's bit (1 for +1) at place value 2^k, id = sum_k bit_k 2^k: channel 0 is the least significant bit,
as in Open-MAGVIT2 (its `mask = 2 ** arange(K)`), so ids and its checkpoints' ids mean the same codes.

Nothing in the rounding pulls the encoder towards using all 2^K codes, so MAGVIT-v2 adds an entropy
penalty on the soft assignment p(c | z) ∝ exp(-||z - c||^2 / T) of every token z_n to every code c:
the per-sample entropy mean_n H(p(. | z_n)) goes down (each token confidently one code) and the
codebook entropy H(mean_n p(. | z_n)) goes up (the batch spread over all codes). Open-MAGVIT2
materialises p as an (N, 2^K) tensor, 2 GB per fp32 tensor for 2^18 codes at 8 x 256 tokens. Both
terms are computed here, exactly, without it:

- For c in {-1, +1}^K, ||z - c||^2 = ||z||^2 + K - 2 z.c, so p(c | z) = prod_k p(c_k | z_k): the bits
  are independent, each +1 with probability sigmoid(4 z_k / T). The per-sample entropy is the sum of
  the K binary entropies, O(N K).
- Split the K bits into a high and a low half: p(c | z) = p(high bits | z) p(low bits | z), so the sum
  over tokens of p(c | z_n), for all 2^K codes at once, is one matmul of the halves' distributions,
  (2^(K/2), N) @ (N, 2^(K/2)), whose (row, column) is the code's (high, low) bits: flattened, the
  code's id. That is
  O(N 2^(K/2) + 2^K) memory in forward and backward (no tensor over 4 MB but the 1 MB sum, for 2^18
  codes at 8 x 256 tokens), N 2^K multiply-adds in one GEMM, and no exp over (N, 2^K).
- Each half's distribution is built as an outer product of its bits' probabilities, not as the exp
  of a matmul of log-probabilities: under TF32 such a matmul errs by tenths on logits of size 1/T,
  while TF32's 1e-3 relative error on probabilities is harmless to an entropy.

Under DDP the codebook entropy is that of all ranks' tokens together: the summed probabilities are
all-reduced in training mode (in eval mode each rank reports its own, and no collective runs).

References:
1) Language Model Beats Diffusion -- Tokenizer is Key to Visual Generation (MAGVIT-v2), Yu et al.
2023: https://arxiv.org/abs/2310.05737 (LFQ, the entropy penalty)
2) Open-MAGVIT2: An Open-Source Project Toward Democratizing Auto-regressive Visual Generation, Luo
et al. 2024: https://arxiv.org/abs/2409.04410 https://github.com/TencentARC/Open-MAGVIT2 (2^18 codes,
entropy weight 0.1, temperature 0.01, commitment 0.25: our defaults)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from tessera.nn.quantizer_base import CodebookUsage, Quantizer, QuantizerOutput, all_reduce_sum_, distributed
from tessera.precision import fp32_math


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks, whose backward sums the ranks' gradients too.

    Every rank's codebook entropy depends on every rank's tokens, so a rank's tokens get the sum of
    all ranks' gradients; DDP's mean over ranks then is the gradient of the one codebook entropy of
    the global batch. (torch.distributed.nn.functional.all_reduce does the same but warns as
    deprecated in torch 2.14, and its replacement in torch.distributed._functional_collectives is
    private.)
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce writes in place
        dist.all_reduce(grad)
        return grad


def bits_distribution(p_zero: Tensor, p_one: Tensor) -> Tensor:
    """(N, m) probabilities that each of m independent bits is 0 and 1 -> (N, 2^m) distribution of
    the m-bit numbers they spell, bit 0 the least significant (as in the ids)."""
    probs = p_zero.new_ones(p_zero.shape[0], 1)  # (N, 1): zero bits spell one number for sure
    for zero, one in zip(p_zero.unbind(1), p_one.unbind(1)):
        # bit j doubles the numbers: each number i below 2^j, then i + 2^j
        probs = torch.cat([probs * zero[:, None], probs * one[:, None]], dim=1)  # (N, 2 * before)
    return probs


def entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of a probability vector.

    Codes whose probability underflows to 0 add 0 log 0 = 0 and, through the clamp, a finite
    gradient (xlogy's would be nan there).
    """
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum()


class LookupFreeQuantizer(Quantizer):
    """z (B, dim, H, W) -> sign(z), 2^dim codes, with MAGVIT-v2's entropy penalty and a commitment loss.

    loss = entropy_weight * (per-sample entropy - codebook_entropy_weight * codebook entropy)
    + commitment_weight * mse(z, sign(z)). The ids' usage counts hold one long per code: 2 MB at
    dim 18, 8 GB at dim 30.
    """

    def __init__(
        self,
        dim: int = 18,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        entropy_temperature: float = 0.01,
        codebook_entropy_weight: float = 1.0,
        usage_window: int = 65536,
    ):
        """
        Args:
            dim: channels of z, one bit each: 2^dim codes.
            entropy_weight: weight of the entropy penalty in `loss`.
            commitment_weight: weight of mse(z, sign(z)) in `loss`.
            entropy_temperature: T of p(c | z) ∝ exp(-||z - c||^2 / T); smaller is closer to the hard
                assignment, and the entropy gradients vanish sooner: once |z| >> T / 4.
            codebook_entropy_weight: weight of the codebook entropy against the per-sample entropy
                (Open-MAGVIT2's and vector-quantize-pytorch's `diversity_gamma`).
            usage_window: ids in the usage and perplexity window (see `CodebookUsage`).
        """
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.entropy_weight = entropy_weight
        self.commitment_weight = commitment_weight
        self.entropy_temperature = entropy_temperature
        self.codebook_entropy_weight = codebook_entropy_weight
        self.usage_window = usage_window
        self.codebook_usage = CodebookUsage(self.codebook_size, usage_window)

    @property
    def codebook_size(self) -> int:
        return 2**self.dim

    def bit_positions(self, device: torch.device) -> Tensor:
        """(dim, 1, 1) position of each channel's bit in an id: channel k at place value 2^k."""
        return torch.arange(self.dim, device=device)[:, None, None]

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"LookupFreeQuantizer(dim={self.dim}) takes z (B, {self.dim}, H, W), got {tuple(z.shape)}")
        with fp32_math(z.device.type):
            z32 = z.float()
            positive = z32 >= 0  # (B, K, H, W) the bits
            q = torch.where(positive, 1.0, -1.0)  # (B, K, H, W)
            z_q = q + (z32 - z32.detach())  # exactly q, and the gradient goes straight through to z
            ids = (positive.long() << self.bit_positions(z.device)).sum(1)  # (B, H, W)

            tokens = z32.permute(0, 2, 3, 1).reshape(-1, self.dim)  # (N, K)
            per_sample_entropy, codebook_entropy = self.entropies(tokens)
            entropy_loss = per_sample_entropy - self.codebook_entropy_weight * codebook_entropy
            commitment = F.mse_loss(z32, q)
            loss = self.entropy_weight * entropy_loss + self.commitment_weight * commitment
        losses = {
            "entropy": entropy_loss,
            "per_sample_entropy": per_sample_entropy,
            "codebook_entropy": codebook_entropy,
            "commitment": commitment,
        }
        return QuantizerOutput(z_q.to(z.dtype), ids, loss, losses, self.codebook_usage(ids))

    def entropies(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 tokens (N, K) -> (per-sample entropy, codebook entropy) of p(c | z), exact, in nats."""
        logits = 4 * tokens / self.entropy_temperature  # (N, K) log-odds of each bit being +1
        log_one, log_zero = F.logsigmoid(logits), F.logsigmoid(-logits)
        p_one, p_zero = log_one.exp(), log_zero.exp()  # both from logsigmoid: 1 - p loses the tail
        per_sample = -(p_one * log_one + p_zero * log_zero).sum() / len(tokens)

        low = self.dim // 2  # channels 0 .. low - 1 are the ids' low bits; the high half takes the odd bit
        p_low = bits_distribution(p_zero[:, :low], p_one[:, :low])  # (N, 2^low)
        p_high = bits_distribution(p_zero[:, low:], p_one[:, low:])  # (N, 2^high)
        summed = (p_high.T @ p_low).flatten()  # (2^K,) sum over tokens of p(c | z_n), at c's id = high * 2^low + low
        count = tokens.new_full((), len(tokens))  # a fill, not a host-to-device copy
        if self.training and distributed():
            summed = AllReduceSum.apply(summed)
            all_reduce_sum_(count)
        return per_sample, entropy(summed / count)

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        bits = (ids[:, None] >> self.bit_positions(ids.device)) & 1  # (B, K, H, W)
        return bits.float() * 2 - 1
