"""Lookup-free and finite scalar quantizers: ids and their inverse, straight-through gradients, the
LFQ entropy terms against the full softmax over all codes, their memory at 2^18 codes and across
ranks, bf16 autocast, and the checkpoint spec.

Small dims and grids: the whole file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tessera.nn.finite_scalar_quantizer import FiniteScalarQuantizer
from tessera.nn.lookup_free_quantizer import LookupFreeQuantizer, bits_distribution
from tessera.nn.quantizer_base import build_quantizer, quantizer_spec
from tests.devices import DEVICES
from tests.distributed import run_distributed


def full_softmax_entropies(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MAGVIT-v2's entropy terms the direct way: p(c | z) over every code c in {-1, +1}^K as an (N, 2^K) softmax."""
    dim = z.shape[1]
    tokens = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (N, K)
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=dim)), dtype=z.dtype)  # (2^K, K)
    logits = -torch.cdist(tokens, codes) ** 2 / temperature  # (N, 2^K)
    per_sample = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    mean_probs = logits.softmax(1).mean(0)  # (2^K,)
    return per_sample, -torch.special.xlogy(mean_probs, mean_probs).sum()


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output has, forward and backward."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


# --- lookup-free quantizer -------------------------------------------------------------------


def test_lfq_ids_are_open_magvit2s_sign_bits_with_channel_0_least_significant_and_zero_counting_as_plus():
    quantizer = LookupFreeQuantizer(dim=6)
    z = torch.randn(2, 6, 3, 5)
    z[0, :, 0, 0] = torch.tensor([0.3, -1.0, -0.2, -4.0, -0.1, -0.5])  # (+, -, -, -, -, -)
    z[0, :, 0, 1] = torch.tensor([0.3, 2.0, -0.2, -4.0, -0.1, 0.0])  # (+, +, -, -, -, 0)
    out = quantizer(z)
    assert out.ids.shape == (2, 3, 5) and out.ids.dtype == torch.long
    assert int(out.ids[0, 0, 0]) == 1 and int(out.ids[0, 0, 1]) == 1 + 2 + 32
    assert out.z_q[0, :, 0, 1].tolist() == [1, 1, -1, -1, -1, 1]
    # Open-MAGVIT2's id: sum over channels i of bit_i * 2^i
    assert torch.equal(out.ids, ((z >= 0).long() * (2 ** torch.arange(6))[:, None, None]).sum(1))
    assert 0 <= out.ids.min() and out.ids.max() < quantizer.codebook_size == 64
    assert torch.equal(out.z_q, torch.where(z >= 0, 1.0, -1.0))


def test_bits_distribution_numbers_codes_as_the_ids_do():
    # bit 0 surely 1, bit 1 surely 0, bit 2 a coin: the numbers 1 and 5, half each
    p_one = torch.tensor([[1.0, 0.0, 0.5]])
    probs = bits_distribution(1 - p_one, p_one)
    assert probs.tolist() == [[0.0, 0.5, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0]]


def test_lfq_ids_to_codes_returns_forward_z_q_and_inverts_the_ids():
    quantizer = LookupFreeQuantizer(dim=5)
    out = quantizer(torch.randn(3, 5, 4, 4))
    assert torch.equal(quantizer.ids_to_codes(out.ids), out.z_q)
    every_id = torch.arange(32).view(1, 4, 8)
    assert torch.equal(quantizer(quantizer.ids_to_codes(every_id)).ids, every_id)


def test_lfq_gradient_goes_straight_through_the_sign_to_z():
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    (LookupFreeQuantizer(dim=4)(z).z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


@pytest.mark.parametrize(
    ("dim", "temperature", "scale"),
    [(1, 0.1, 0.1), (5, 0.01, 0.005), (6, 0.01, 0.01), (6, 1.0, 1.0), (7, 0.01, 0.02)],
)
def test_lfq_entropies_equal_the_full_softmax_over_all_codes_in_value_and_gradient(dim, temperature, scale):
    # scale ~ T keeps the bits' probabilities away from 0 and 1, where every gradient vanishes
    torch.manual_seed(dim)
    z = (scale * torch.randn(3, dim, 4, 4, dtype=torch.float64)).requires_grad_()
    losses = LookupFreeQuantizer(dim=dim, entropy_temperature=temperature)(z).losses
    expected = full_softmax_entropies(z, temperature)
    for name, reference in zip(["per_sample_entropy", "codebook_entropy"], expected):
        assert losses[name].dtype == torch.float32
        torch.testing.assert_close(losses[name].double(), reference, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(losses[name], z, retain_graph=True)
        (reference_grad,) = torch.autograd.grad(reference, z, retain_graph=True)
        torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-5 * reference_grad.abs().max().item())
    torch.testing.assert_close(losses["entropy"], losses["per_sample_entropy"] - losses["codebook_entropy"])


def test_lfq_at_2_18_codes_makes_no_tensor_larger_than_the_codebook_forward_or_backward():
    quantizer = LookupFreeQuantizer(dim=18)
    z = torch.randn(2, 18, 8, 8, requires_grad=True)  # 128 tokens: the full softmax is 128 x 2^18 floats
    with LargestTensor() as largest:
        quantizer(z).loss.backward()
    assert largest.numel == 2**18
    assert z.grad.isfinite().all()


def test_lfq_entropy_loss_spreads_tokens_over_the_codebook():
    torch.manual_seed(0)
    quantizer = LookupFreeQuantizer(dim=6)
    z = (0.002 + 0.001 * torch.randn(4, 6, 8, 8)).requires_grad_()  # 256 tokens, nearly all on code 63
    optimizer = torch.optim.Adam([z], lr=1e-3)
    before = quantizer(z)
    for _ in range(10):
        optimizer.zero_grad()
        quantizer(z).losses["entropy"].backward()
        optimizer.step()
    after = quantizer(z)
    assert before.ids.unique().numel() < 16 and after.ids.unique().numel() == 64
    assert after.losses["codebook_entropy"] > before.losses["codebook_entropy"]
    assert after.losses["per_sample_entropy"] < before.losses["per_sample_entropy"]


def test_lfq_loss_is_the_weighted_sum_of_entropy_and_commitment():
    quantizer = LookupFreeQuantizer(dim=4, entropy_weight=0.3, commitment_weight=0.7, codebook_entropy_weight=2.0)
    z = torch.randn(2, 4, 3, 3)
    out = quantizer(z)
    torch.testing.assert_close(out.losses["commitment"], ((z - z.sign()) ** 2).mean())
    expected_entropy = out.losses["per_sample_entropy"] - 2.0 * out.losses["codebook_entropy"]
    torch.testing.assert_close(out.losses["entropy"], expected_entropy)
    torch.testing.assert_close(out.loss, 0.3 * expected_entropy + 0.7 * out.losses["commitment"])
    assert set(out.stats) == {"usage", "perplexity"}


def test_lfq_rejects_z_with_another_channel_count():
    with pytest.raises(ValueError, match=r"dim=6.*\(2, 5, 4, 4\)"):
        LookupFreeQuantizer(dim=6)(torch.randn(2, 5, 4, 4))


def _lfq_on_ranks(rank: int, world_size: int, z_all: torch.Tensor):
    quantizer = LookupFreeQuantizer(dim=6, entropy_temperature=0.05)
    z = z_all.chunk(world_size)[rank].clone().requires_grad_()
    entropy = quantizer(z).losses["codebook_entropy"]
    (grad,) = torch.autograd.grad(entropy, z)
    quantizer.eval()
    return entropy.detach(), grad, quantizer(z.detach()).losses["codebook_entropy"]


def test_lfq_codebook_entropy_on_two_ranks_is_that_of_one_process_fed_the_whole_batch():
    torch.manual_seed(0)
    z_all = 0.05 * torch.randn(4, 6, 4, 4)
    quantizer = LookupFreeQuantizer(dim=6, entropy_temperature=0.05)
    z = z_all.clone().requires_grad_()
    entropy = quantizer(z).losses["codebook_entropy"]
    (grad,) = torch.autograd.grad(entropy, z)

    quantizer.eval()
    halves = [quantizer(half).losses["codebook_entropy"] for half in z_all.chunk(2)]

    results = run_distributed(_lfq_on_ranks, z_all)
    for rank, (rank_entropy, rank_grad, rank_eval_entropy) in enumerate(results):
        torch.testing.assert_close(rank_entropy, entropy.detach())
        # DDP averages gradients over ranks: each rank holds world_size times its share
        torch.testing.assert_close(rank_grad, 2 * grad.chunk(2)[rank])
        # eval mode runs no collective: each rank's own tokens only
        torch.testing.assert_close(rank_eval_entropy, halves[rank])
    assert halves[0] != halves[1]


# --- finite scalar quantizer -----------------------------------------------------------------


def test_fsq_codebook_is_the_product_of_the_levels_and_dim_their_count():
    quantizer = FiniteScalarQuantizer()
    assert (quantizer.dim, quantizer.codebook_size) == (6, 8 * 8 * 8 * 5 * 5 * 5)


def test_fsq_reaches_every_level_of_even_and_odd_counts_and_maps_zero_to_zero():
    levels = (2, 3, 4, 5, 8)
    quantizer = FiniteScalarQuantizer(levels)
    sweep = torch.linspace(-8, 8, 2001)
    z_q = quantizer(sweep.view(1, 1, 1, -1).expand(1, len(levels), 1, -1)).z_q  # (1, K, 1, 2001)
    for k, count in enumerate(levels):
        half = count // 2
        expected = torch.arange(-half, count - half) / half  # {-4, ..., 3} / 4 for 8 levels
        assert torch.equal(z_q[0, k].unique(), expected)
    assert torch.equal(quantizer(torch.zeros(1, len(levels), 1, 1)).z_q, torch.zeros(1, len(levels), 1, 1))


def test_fsq_ids_are_mixed_radix_with_channel_0_least_significant():
    quantizer = FiniteScalarQuantizer((3, 4, 2))
    z = torch.full((1, 3, 1, 1), 5.0)  # the top level of every channel: digits (2, 3, 1)
    assert int(quantizer(z).ids) == 2 + 3 * 3 + 1 * 3 * 4 == quantizer.codebook_size - 1


def test_fsq_ids_to_codes_returns_forward_z_q_and_maps_every_id_to_its_own_grid_point():
    levels = (3, 4, 2, 7)
    quantizer = FiniteScalarQuantizer(levels)
    out = quantizer(2 * torch.randn(4, 4, 5, 5))
    assert 0 <= out.ids.min() and out.ids.max() < quantizer.codebook_size
    assert torch.equal(quantizer.ids_to_codes(out.ids), out.z_q)
    codes = quantizer.ids_to_codes(torch.arange(quantizer.codebook_size).view(1, 12, 14))  # (1, K, 12, 14)
    grid = torch.tensor(list(itertools.product(*[[(i - n // 2) / (n // 2) for i in range(n)] for n in levels])))
    assert set(map(tuple, codes.flatten(2)[0].T.tolist())) == set(map(tuple, grid.tolist()))


def test_fsq_gradient_reaches_z_through_the_rounding():
    z = torch.randn(2, 6, 4, 4, requires_grad=True)
    FiniteScalarQuantizer()(z).z_q.sum().backward()
    assert (z.grad > 0).all()  # tanh is increasing


def test_fsq_has_no_auxiliary_loss():
    out = FiniteScalarQuantizer()(torch.randn(2, 6, 4, 4))
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0 and out.loss == 0
    assert out.losses == {} and set(out.stats) == {"usage", "perplexity"}


# --- both ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs"), [(LookupFreeQuantizer, {"dim": 6}), (FiniteScalarQuantizer, {"levels": (8, 5, 5)})]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_gives_fp32_losses_and_z_q_in_z_dtype(cls, kwargs, device):
    quantizer = cls(**kwargs).to(device)
    z = torch.randn(2, quantizer.dim, 4, 4, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = quantizer(z.bfloat16())
    assert out.z_q.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32
    assert all(loss.dtype == torch.float32 for loss in out.losses.values())
    assert torch.equal(out.ids, quantizer(z.bfloat16().float()).ids)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (LookupFreeQuantizer, dict(dim=10, entropy_weight=0.2, commitment_weight=0.5, entropy_temperature=0.05,
                                   codebook_entropy_weight=1.5, usage_window=1024)),
        (FiniteScalarQuantizer, dict(levels=(7, 5, 5, 5), usage_window=4096)),
    ],
)
def test_quantizer_spec_rebuilds_the_same_quantizer(cls, kwargs):
    quantizer = cls(**kwargs)
    spec = quantizer_spec(quantizer)
    assert spec["init_args"] == {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    rebuilt = build_quantizer(spec)
    assert type(rebuilt) is type(quantizer)
    assert quantizer_spec(rebuilt) == spec
    assert (rebuilt.dim, rebuilt.codebook_size) == (quantizer.dim, quantizer.codebook_size)
    z = torch.randn(2, quantizer.dim, 3, 3)
    assert torch.equal(rebuilt(z).ids, quantizer(z).ids)
