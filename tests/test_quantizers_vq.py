"""VectorQuantizer and ResidualQuantizer: lookup, gradients, losses, EMA, restarts, ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from tessera.nn.quantizer_base import build_quantizer, quantizer_spec
from tessera.nn.residual_quantizer import ResidualQuantizer
from tessera.nn.vector_quantizer import VectorQuantizer
from tests.devices import DEVICES
from tests.distributed import run_distributed


def flat(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), the order of the flattened ids."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def rows_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether every row of a is, to the bit, a row of b."""
    return bool((a[:, None] == b[None]).all(-1).any(1).all())


def test_ids_are_nearest_codes_in_range_and_decode_to_z_q():
    torch.manual_seed(0)
    for l2_normalize in (False, True):
        vq = VectorQuantizer(dim=4, codebook_size=16, l2_normalize=l2_normalize, usage_window=64)
        z = torch.randn(2, 4, 3, 5)
        out = vq(z)
        assert out.ids.shape == (2, 3, 5) and out.ids.dtype == torch.long
        assert 0 <= out.ids.min() and out.ids.max() < 16
        codebook = F.normalize(vq.codebook, dim=-1) if l2_normalize else vq.codebook
        vectors = F.normalize(flat(z), dim=-1) if l2_normalize else flat(z)
        assert torch.equal(out.ids.flatten(), torch.cdist(vectors, codebook, compute_mode="donot_use_mm_for_euclid_dist").argmin(1))
        assert torch.equal(out.z_q, vq.ids_to_codes(out.ids))
        assert set(out.stats) == {"usage", "perplexity"}


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) angles between the rows of a and b."""
    return torch.rad2deg(torch.arccos(F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)))


def test_l2_normalized_codebook_starts_on_the_sphere_and_one_adam_step_turns_a_code_a_little():
    # taming's U(-1/K, 1/K) rows have norm ~1e-4 at K = 16384: a first Adam step (~lr per coordinate)
    # would turn them by tens of degrees; unit rows (LlamaGen normalises at init) turn by hundredths
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=16384, l2_normalize=True)
    assert_close(vq.codebook.norm(dim=1), torch.ones(16384))
    out = vq(torch.randn(2, 8, 4, 4))
    before = vq.codebook.detach().clone()
    optimizer = torch.optim.Adam(vq.parameters(), lr=1e-4)
    out.loss.backward()
    optimizer.step()
    used = out.ids.unique()
    assert angle_degrees(vq.codebook.detach()[used], before[used]).max() < 0.1
    # without l2_normalize the codes keep taming's init
    assert VectorQuantizer(dim=8, codebook_size=16384).codebook.abs().max() <= 1 / 16384


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 4, 1)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    for quantizer in (VectorQuantizer(dim=4, codebook_size=16), ResidualQuantizer(dim=4, codebook_size=16, depth=2)):
        weight = torch.randn(2, 4, 4, 4)
        h = encoder(z)
        h.retain_grad()
        (quantizer(h).z_q * weight).sum().backward()
        assert torch.equal(h.grad, weight)  # the identity, straight through
        assert encoder.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
        encoder.zero_grad()
        z.grad = None


def test_beta_weights_the_commitment_term_not_the_codebook_term():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=16, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    assert_close(out.loss, out.losses["codebook"] + 0.25 * out.losses["commitment"])
    out.loss.backward()
    q = vq.ids_to_codes(out.ids).detach()
    # d/dz of beta * mean((z - q)^2) and d/de of mean((q - z)^2): only the encoder side carries beta
    assert_close(z.grad, 0.25 * 2 * (z - q).detach() / z.numel())
    expected = torch.zeros_like(vq.codebook).index_add_(0, out.ids.flatten(), flat(2 * (q - z).detach() / z.numel()))
    assert_close(vq.codebook.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_codebook_math_is_fp32_and_z_q_follows_z_dtype_under_bf16_autocast(device):
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=64).to(device)
    with torch.no_grad():
        # codes 1e-3 apart: bf16 (8 mantissa bits) cannot tell them apart, fp32 can
        vq.codebook.copy_(1 + 1e-3 * torch.randn(64, 4))
    z = (1 + 1e-3 * torch.randn(2, 4, 4, 4)).bfloat16().to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = vq(z)
    reference = vq(z.float())
    assert torch.equal(out.ids, reference.ids)
    assert out.z_q.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert vq.ids_to_codes(out.ids).dtype == torch.float32
    assert torch.equal(out.z_q, vq.ids_to_codes(out.ids).bfloat16())


def test_ema_moves_assigned_codes_toward_their_mean_and_eval_leaves_it_alone():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, ema_decay=0.9)
    assert not vq.codebook.requires_grad
    z = torch.randn(2, 4, 4, 4)
    before = vq.codebook.clone()
    out = vq(z)
    assert set(out.losses) == {"commitment"}
    assert_close(out.loss, 0.25 * out.losses["commitment"])
    ids, vectors = out.ids.flatten(), flat(z)
    for code in ids.unique():
        mean = vectors[ids == code].mean(0)
        assert (vq.codebook[code] - mean).norm() < (before[code] - mean).norm()
    for code in set(range(8)) - set(ids.tolist()):
        assert_close(vq.codebook[code], before[code], rtol=1e-3, atol=0)  # only Laplace smoothing

    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(torch.randn(2, 4, 4, 4))
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in state.items())


def test_unused_codes_restart_on_batch_vectors():
    torch.manual_seed(0)
    for ema_decay in (None, 0.5):
        # every code starts at a count of 1; a code not assigned this step drops below 1
        vq = VectorQuantizer(dim=4, codebook_size=32, ema_decay=ema_decay, dead_code_threshold=1.0)
        z = torch.randn(1, 4, 2, 4)  # 8 vectors: at least 24 codes unused
        out = vq(z)
        unused = sorted(set(range(32)) - set(out.ids.flatten().tolist()))
        assert out.stats["dead_codes"] == len(unused)
        assert rows_of(vq.codebook[unused], flat(z))
        # the next step finds them as codes again
        assert (vq(z).ids.flatten()[:, None] == torch.tensor(unused)).any()


def _two_ranks(rank: int, world_size: int, z: torch.Tensor) -> dict:
    torch.manual_seed(0)  # the same initial codebooks on every rank
    ema = VectorQuantizer(dim=4, codebook_size=32, ema_decay=0.9, usage_window=48)
    rq = ResidualQuantizer(dim=4, codebook_size=32, depth=2, ema_decay=0.9, usage_window=48)
    restarts = VectorQuantizer(dim=4, codebook_size=32, ema_decay=0.9, dead_code_threshold=1.0)
    torch.manual_seed(rank)  # different random picks on each rank: rank 0's must win
    half = z.chunk(world_size)[rank]
    for _ in range(2):
        stats = ema(half).stats
        rq_stats = rq(half).stats
    restarted = restarts(half)
    return {
        "ema": ema.state_dict(),
        "stats": stats,
        "rq": rq.state_dict(),
        "rq_stats": rq_stats,
        "restarts": restarts.state_dict(),
        "restarted_ids": restarted.ids,
        "dead_codes": restarted.stats["dead_codes"],
    }


def test_two_ranks_agree_with_each_other_and_with_one_process_fed_the_whole_batch():
    torch.manual_seed(1)
    z = torch.randn(4, 4, 3, 3)
    ranks = run_distributed(_two_ranks, z)

    torch.manual_seed(0)
    ema = VectorQuantizer(dim=4, codebook_size=32, ema_decay=0.9, usage_window=48)
    rq = ResidualQuantizer(dim=4, codebook_size=32, depth=2, ema_decay=0.9, usage_window=48)
    for _ in range(2):
        stats = ema(z).stats
        rq_stats = rq(z).stats

    for rank in ranks:
        for name in ("ema", "rq", "restarts"):
            for key, value in rank[name].items():
                assert torch.equal(value, ranks[0][name][key]), (name, key)  # the ranks agree to the bit
        # the ring of ids must match exactly, the all-reduced sums up to rounding
        assert_close(rank["ema"], ema.state_dict())
        assert_close(rank["rq"], rq.state_dict())
        assert_close(rank["stats"], stats)
        assert_close(rank["rq_stats"], rq_stats)
    # the codes neither rank used were restarted, on vectors of rank 0's half of the batch
    unused = sorted(set(range(32)) - {int(i) for rank in ranks for i in rank["restarted_ids"].flatten()})
    assert ranks[0]["dead_codes"] == ranks[1]["dead_codes"] == len(unused) > 0
    assert rows_of(ranks[0]["restarts"]["codebook"][unused], flat(z.chunk(2)[0]))


def test_spec_rebuilds_the_same_quantizer():
    for quantizer in (
        VectorQuantizer(dim=8, codebook_size=32, beta=0.5, l2_normalize=True, ema_decay=0.95, dead_code_threshold=0.5),
        ResidualQuantizer(dim=8, codebook_size=32, depth=3, ema_decay=None, usage_window=128),
    ):
        spec = quantizer_spec(quantizer)
        rebuilt = build_quantizer(spec)
        assert type(rebuilt) is type(quantizer) and quantizer_spec(rebuilt) == spec
        assert rebuilt.codebook_size == 32


def test_residual_quantizer_ids_per_depth_and_error_shrinks_with_depth():
    torch.manual_seed(0)
    rq = ResidualQuantizer(dim=4, codebook_size=64, depth=3, ema_decay=0.5, dead_code_threshold=1.0)
    z = torch.randn(4, 4, 4, 4)
    for _ in range(20):  # fit the shared codebook to z's residuals at every depth
        rq(z)
    rq.eval()
    out = rq(z)
    assert out.ids.shape == (4, 4, 4, 3) and out.ids.dtype == torch.long
    assert 0 <= out.ids.min() and out.ids.max() < 64
    assert torch.equal(out.z_q, rq.ids_to_codes(out.ids))
    errors = [(z - rq.ids_to_codes(out.ids[..., : d + 1])).square().mean() for d in range(3)]
    assert errors[0] < z.square().mean() and errors[1] < errors[0] and errors[2] < errors[1]
    assert_close(out.losses["commitment"], torch.stack(errors).mean())


def quantizers():
    from tessera.nn.gumbel_quantizer import GumbelQuantizer
    from tessera.nn.lookup_free_quantizer import LookupFreeQuantizer
    from tessera.nn.residual_quantizer import ResidualQuantizer

    return {
        "vq": VectorQuantizer(dim=4, codebook_size=16, l2_normalize=True),
        "vq_ema": VectorQuantizer(dim=4, codebook_size=16, ema_decay=0.9),
        "rq": ResidualQuantizer(dim=4, codebook_size=16, depth=2),
        "lfq": LookupFreeQuantizer(dim=4),  # its entropy terms' matmuls
        "gumbel": GumbelQuantizer(dim=4, codebook_size=16),  # its logits and the sample's mix of codes
    }  # FSQ rounds each channel alone: no matmul to pin


@pytest.mark.parametrize("name", ["vq", "vq_ema", "rq", "lfq", "gumbel"])
def test_codebook_matmuls_run_without_tf32_when_the_user_allows_it(name):
    """`torch.set_float32_matmul_precision("high")` (TF32) is common advice for H100s; the
    quantizers' distances and statistics must not follow it."""
    from torch.overrides import TorchFunctionMode

    class RecordTF32(TorchFunctionMode):
        flags: list[bool] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm", "addmm", "bmm", "cdist", "einsum", "linear"):
                self.flags.append(torch.backends.cuda.matmul.allow_tf32)
            return func(*args, **(kwargs or {}))

    quantizer = quantizers()[name]
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with RecordTF32() as recorder:
            out = quantizer(torch.randn(2, 4, 3, 3))
            quantizer.ids_to_codes(out.ids)
        assert torch.backends.cuda.matmul.allow_tf32  # the user's setting is back afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert recorder.flags and not any(recorder.flags), recorder.flags
