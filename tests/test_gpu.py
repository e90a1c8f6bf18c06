"""What only a GPU can check, with the CPU tests' tiny networks and data: both stages a few steps in
bf16-mixed, under torch.compile and under FSDP2 (bf16 gathers, an fp32 codebook), the host syncs of
their training steps, KV-cached sampling against the full forward, the prior's attention on SDPA's
fused kernels, and exact stop-and-resume on one GPU with deterministic algorithms, CUDA RNG states
included. The prior's FSDP2 fit, resume and
export are in test_export.py; the quantizers' fp32 maths under CUDA autocast in the quantizer tests.

Every test is marked `gpu` (`pytest -m gpu`) and skips without CUDA. Most of the run's time goes
to compiling.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

# deterministic cuBLAS wants this workspace setting in place before the process's first CUDA matmul
# (an earlier test's); Trainer(deterministic=True) sets it only when it starts
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_modules.fsdp import AtomicModelParallelStrategy  # noqa: E402
from tessera.nn.transformer import TextImageTransformer  # noqa: E402
from tessera.sampling import SamplingConfig, sample_image_tokens  # noqa: E402
from tests.devices import NEEDS_CUDA  # noqa: E402
from tests.test_export import process_group_torn_down  # noqa: E402, F401 (a fixture)
from tests.test_exact_resume import (  # noqa: E402
    assert_resumed_exactly,
    fit,
    prior_run,
    straight_and_resumed,
    vqgan_run,
    write_token_shards,
)
from tests.test_prior import Tokens, shapes_data, tiny_config, tiny_prior, tokenizer_dir  # noqa: E402, F401 (a fixture)
from tests.test_vqgan import loader, tiny_vqgan, trainer  # noqa: E402

pytestmark = NEEDS_CUDA

REPO = Path(__file__).parents[1]
CUDA = torch.device("cuda")
STEPS = 3  # training steps per run: enough for both optimizers' state and a step after it
TEST_SECONDS = 240  # each test's limit, well above what the slowest (compiling both VQ-GAN networks) should take
ON_ONE_GPU = dict(accelerator="gpu", devices=1, precision="bf16-mixed", deterministic=True)


@pytest.fixture(autouse=True)
def time_limit():
    """Fails a test that runs past TEST_SECONDS, so one that hangs cannot eat a GPU session."""

    def expire(signum, frame):
        raise TimeoutError(f"the test ran past its {TEST_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def deterministic():
    """Trainer(deterministic=True) turns deterministic algorithms on for the whole process: off again after."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark


class CheckMixedPrecision(L.Callback):
    """bf16-mixed as designed, at every step: fp32 weights and gradients on the GPU, finite losses."""

    def __init__(self):
        self.losses: list[float] = []
        self.backwards = 0

    def on_after_backward(self, trainer, pl_module):
        self.backwards += 1
        for name, param in pl_module.named_parameters():
            assert param.is_cuda and param.dtype == torch.float32, name
            assert param.grad is None or param.grad.dtype == torch.float32, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs:  # the prior's training_step returns its loss; the VQ-GAN optimizes by hand
            assert outputs["loss"].dtype == torch.float32
        self.losses.append(trainer.callback_metrics["train/loss"].item())
        assert math.isfinite(self.losses[-1]), self.losses


def gpu_trainer(tmp_path, callbacks: list[L.Callback], **options) -> L.Trainer:
    return trainer(tmp_path, max_steps=STEPS, accelerator="gpu", precision="bf16-mixed", callbacks=callbacks, **options)


# --- bf16-mixed -----------------------------------------------------------------------------


def test_tokenizer_trains_in_bf16_mixed_with_fp32_weights_and_codebook_maths(tmp_path):
    model, check = tiny_vqgan(), CheckMixedPrecision()
    seen = []

    def quantizer_in_fp32(quantizer, args, out):
        (z,) = args
        seen.append(z.dtype)
        assert out.z_q.dtype == z.dtype and out.loss.dtype == torch.float32
        assert all(loss.dtype == torch.float32 for loss in out.losses.values())
        # the ids of the same z quantized without autocast: the lookup already ran in fp32
        with torch.autocast("cuda", enabled=False), torch.no_grad():
            quantizer.eval()
            reference = quantizer.forward(z.float())
            quantizer.train()
        assert torch.equal(out.ids, reference.ids)

    model.tokenizer.quantizer.register_forward_hook(quantizer_in_fp32)
    gpu_trainer(tmp_path, [check]).fit(model, loader())
    assert model.global_step == STEPS and len(check.losses) == STEPS
    assert check.backwards == 2 * STEPS  # generator and discriminator
    assert seen == [torch.bfloat16] * STEPS  # autocast reached the quantizer's input


def test_prior_trains_in_bf16_mixed_on_images_its_frozen_tokenizer_encodes(tmp_path, tokenizer_dir, shapes_dir):
    prior, check = tiny_prior(tokenizer_dir), CheckMixedPrecision()
    logits = []
    prior.transformer.image_head.register_forward_hook(lambda module, args, out: logits.append(out.dtype))
    gpu_trainer(tmp_path, [check]).fit(prior, datamodule=shapes_data(shapes_dir))
    assert prior.global_step == STEPS and check.backwards == STEPS
    assert logits == [torch.bfloat16] * STEPS  # the loss, fp32, comes from bf16 logits
    frozen = prior.image_tokenizer.module  # outside the module tree: no precision plugin casts it
    assert {(p.device.type, p.dtype, p.requires_grad) for p in frozen.parameters()} == {("cuda", torch.float32, False)}


# --- FSDP2 on one GPU ----------------------------------------------------------------------


def record_gathered_dtype(module: torch.nn.Module, name: str, seen: dict[str, set]) -> None:
    """Notes the dtype of `module`'s first parameter in each of its forwards: under FSDP2 the gathered
    one (this hook, registered before sharding, runs before FSDP2 frees the gathered parameters)."""
    module.register_forward_hook(lambda m, args, out: seen.setdefault(name, set()).add(next(m.parameters()).dtype))


def test_tokenizer_trains_under_fsdp2_with_bf16_gathers_and_an_fp32_codebook(tmp_path, process_group_torn_down):
    model, check, seen = tiny_vqgan(ema_decay=0.9), CheckMixedPrecision(), {}
    for name in ("decoder", "quantizer"):
        record_gathered_dtype(getattr(model.tokenizer, name), name, seen)
    record_gathered_dtype(model.discriminator, "discriminator", seen)
    gpu_trainer(tmp_path, [check], strategy=AtomicModelParallelStrategy()).fit(model, loader())
    assert model.global_step == STEPS and check.backwards == 2 * STEPS
    assert seen == {"decoder": {torch.bfloat16}, "quantizer": {torch.float32}, "discriminator": {torch.bfloat16}}


def test_prior_trains_under_fsdp2_with_bf16_gathers(tmp_path, tokenizer_dir, process_group_torn_down):
    prior, check, seen = tiny_prior(tokenizer_dir), CheckMixedPrecision(), {}
    record_gathered_dtype(prior.transformer.blocks[0], "block", seen)
    gpu_trainer(tmp_path, [check], strategy=AtomicModelParallelStrategy()).fit(prior, DataLoader(Tokens(prior), batch_size=4))
    assert prior.global_step == STEPS and check.backwards == STEPS
    assert seen == {"block": {torch.bfloat16}}


# --- torch.compile --------------------------------------------------------------------------


def losses(model: L.LightningModule, data, tmp_path) -> list[float]:
    check = CheckMixedPrecision()
    gpu_trainer(tmp_path, [check]).fit(model, data)
    return check.losses


def assert_compiled_like_eager(compiled: list[float], eager: list[float], graphs_before: int) -> None:
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # Inductor did compile
    assert len(compiled) == len(eager) == STEPS
    # the first step's loss is the same network's forward, in kernels fused otherwise
    assert compiled[0] == pytest.approx(eager[0], rel=5e-2)


def test_tokenizer_compiled_in_place_trains_as_eager_does(tmp_path):
    torch.manual_seed(0)
    eager = losses(tiny_vqgan(), loader(), tmp_path / "eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    model = tiny_vqgan(compile=True)
    compiled = losses(model, loader(), tmp_path / "compiled")
    assert_compiled_like_eager(compiled, eager, graphs)
    assert not [name for name in model.state_dict() if "_orig_mod" in name]  # in place: checkpoints keep their keys


def test_prior_with_compiled_blocks_trains_as_eager_does(tmp_path, tokenizer_dir):
    eager_prior = tiny_prior(tokenizer_dir)
    eager = losses(eager_prior, DataLoader(Tokens(eager_prior), batch_size=4), tmp_path / "eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prior = tiny_prior(tokenizer_dir, compile=True)
    compiled = losses(prior, DataLoader(Tokens(prior), batch_size=4), tmp_path / "compiled")
    assert_compiled_like_eager(compiled, eager, graphs)
    assert prior.state_dict().keys() == eager_prior.state_dict().keys()


# --- host syncs -----------------------------------------------------------------------------


def test_training_steps_of_both_stages_sync_the_host_only_where_designed(tmp_path, monkeypatch):
    """bench/host_syncs.py's count, from torch.cuda.set_sync_debug_mode("warn"): per step, the
    non-finite guard's decision and Lightning's progress-bar read-back of the loss, nothing else."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import host_syncs

    args = host_syncs.parse_args([])
    for setting in host_syncs.SETTINGS:
        (tmp_path / setting).mkdir()
        record = host_syncs.measure(setting, args, tmp_path / setting)
        assert record["measured_steps"] == args.steps, record
        assert "nonfinite.py:55" in record["sites"], record  # the designed sync is seen: the count works
        assert record["syncs_per_step"] <= host_syncs.DESIGNED_SYNCS_PER_STEP, record


# --- sampling and attention -----------------------------------------------------------------


def test_kv_cached_sampling_draws_the_tokens_of_uncached_sampling_on_cuda(caption_tokenizer):
    torch.manual_seed(0)
    model = TextImageTransformer(tiny_config()).to(CUDA)
    captions = caption_tokenizer(["a red circle", "two blue squares", "a small green triangle above a square"])
    null = caption_tokenizer([""]).ids[0]
    for sampling in (SamplingConfig(top_k=16), SamplingConfig(top_p=0.9, temperature=0.8, cfg_scale=3.0)):
        drawn = [
            sample_image_tokens(model, captions.ids, sampling, torch.Generator(CUDA).manual_seed(7), null, use_cache)
            for use_cache in (True, False)
        ]
        assert drawn[0].is_cuda and drawn[0].shape == (3, 16)
        assert torch.equal(drawn[0], drawn[1])


def test_kv_cached_logits_match_the_full_forward_under_bf16_autocast(caption_tokenizer):
    torch.manual_seed(0)
    model = TextImageTransformer(tiny_config()).to(CUDA).eval()
    text_ids = caption_tokenizer(["a red circle", "two blue squares"]).ids.to(CUDA)
    image_ids = torch.randint(64, (2, 16), device=CUDA)
    with torch.autocast("cuda", torch.bfloat16), torch.no_grad():
        _, full = model(text_ids, image_ids)  # (2, 16, 64)
        cache = model.make_kv_cache(2)
        assert cache.k[0].dtype == torch.bfloat16
        steps = [model.prefill(text_ids, cache)]
        positions = torch.arange(24, 24 + 15, device=CUDA)
        steps += [model.decode_step(image_ids[:, i], positions[i], cache) for i in range(15)]
    # flash attention over the whole sequence against masked attention over the cache, both in bf16
    torch.testing.assert_close(torch.stack(steps, dim=1).float(), full.float(), rtol=2e-2, atol=2e-2)


def test_prior_attention_runs_on_fused_sdpa_kernels_in_training_and_sampling(caption_tokenizer):
    torch.manual_seed(0)
    model = TextImageTransformer(tiny_config(n_head=1, dropout=0.1)).to(CUDA)  # head width 64, as every preset's
    captions = caption_tokenizer(["a red circle", "two blue squares"])
    text_ids, text_mask = captions.ids.to(CUDA), captions.mask.to(CUDA)
    # the math backend is left out: a shape or dtype no fused kernel takes raises instead of falling back to it
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model.loss(text_ids, text_mask, torch.randint(64, (2, 16), device=CUDA))["loss"]  # causal, dropout
            loss.backward()
            null = caption_tokenizer([""]).ids[0]
            tokens = sample_image_tokens(model, text_ids, SamplingConfig(top_k=16, cfg_scale=2.0), null_text_ids=null)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks.parameters())
    assert tokens.shape == (2, 16) and tokens.max() < 64


# --- exact resume on one GPU ----------------------------------------------------------------


class RecordCudaRng(L.Callback):
    """The CUDA RNG state each training batch starts from (after the loader's restore, if any)."""

    def __init__(self):
        self.states: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(torch.cuda.get_rng_state())


def test_tokenizer_resumed_mid_epoch_on_one_gpu_ends_with_the_uninterrupted_weights(tmp_path, shapes_dir, deterministic):
    # as on the CPU: stopped after 5 of 10 batches an epoch, run on into the next; dropout and
    # dead-code restarts draw from the CUDA RNG here
    shards = str(shapes_dir / "{00000..00002}.tar")
    straight, resumed = straight_and_resumed(vqgan_run, shards, tmp_path, steps=13, stop=5, **ON_ONE_GPU)
    assert_resumed_exactly(straight, resumed, stop=5)


def test_prior_resumed_on_one_gpu_restores_the_cuda_rng_and_ends_with_the_uninterrupted_weights(tmp_path, deterministic):
    shards, stop = write_token_shards(tmp_path), 4
    rng = {"straight": RecordCudaRng(), "resumed": RecordCudaRng()}
    straight = fit(prior_run, shards, tmp_path / "straight", steps=7, checkpoint_at=stop, callbacks=(rng["straight"],),
                   **ON_ONE_GPU)
    (checkpoint,) = (tmp_path / "straight" / "ckpt").glob(f"*step={stop}.ckpt")
    # fit seeds every RNG, CUDA's too, elsewhere before resuming: only the checkpoint can bring the state back
    resumed = fit(prior_run, shards, tmp_path / "resumed", steps=7, ckpt_path=checkpoint, callbacks=(rng["resumed"],),
                  **ON_ONE_GPU)

    (loader_state,) = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["ranks"][0]["rng"]["cuda"] is not None
    expected = rng["straight"].states[stop:]
    assert len(rng["resumed"].states) == len(expected) == 3
    assert all(torch.equal(a, b) for a, b in zip(rng["resumed"].states, expected))
    assert_resumed_exactly(straight, resumed, stop=stop)  # attention and residual dropout draw from it
