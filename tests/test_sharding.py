"""The prior and the tokenizer sharded over 2 CPU processes (gloo): optimizer groups chosen before
wrapping, FSDP2 against DDP, its checkpoints, resume and export, and every stage config under every
trainer config through `tessera fit`."""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader

from callbacks.reconstructions import ReconstructionLogger
from callbacks.samples import SampleLogger

from lightning_modules.fsdp import AtomicModelParallelStrategy, is_sharded_checkpoint
from lightning_modules.parallel import shard_in_fp32, unwrapped_name
from lightning_modules.prior import TextImagePrior, load_prior
from tessera.commands.cli import main
from tessera.commands.fit import checkpoint_dir, newest_checkpoint
from tessera.nn.transformer import Block, TransformerConfig
from tessera.nn.vector_quantizer import VectorQuantizer
from lightning_modules.vqgan import OptimizerConfig, load_tokenizer
from tests.distributed import as_launched_rank, run_distributed
from tests.test_exact_resume import TEXT_LENGTH, prior_run, vqgan_run, write_token_shards
from tests.test_prior import Tokens, tokenizer_dir  # noqa: F401 (tokenizer_dir: a fixture)
from tests.test_vqgan import REPO
from tests.test_prior import tiny_prior as tiny_prior_with_tokenizer

PROMPTS = ["a red circle", "two blue squares"]


def tiny_prior() -> TextImagePrior:
    torch.manual_seed(0)
    config = TransformerConfig(text_length=8, image_vocab_size=16, image_grid=2, n_layer=2, n_head=2, n_embd=16)
    return TextImagePrior(transformer=config)


def group_shapes(prior: TextImagePrior) -> list[set[int]]:
    """The number of dimensions of each AdamW group's parameters, by the module as built."""
    built = {name: p.dim() for name, p in tiny_prior().transformer.named_parameters()}
    ids = {id(p): name for name, p in prior.transformer.named_parameters()}
    return [{built[unwrapped_name(ids[id(p)])] for p in group["params"]} for group in prior.parameter_groups()]


def _fsdp1_groups(rank: int, world_size: int) -> list[set[int]]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    prior = tiny_prior()
    # as Lightning's FSDPStrategy wraps it: every parameter becomes a 1-D view of a flat shard
    prior.transformer = FullyShardedDataParallel(
        prior.transformer, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu")
    )
    assert all(p.dim() == 1 for p in prior.transformer.parameters())
    return group_shapes(prior)


@pytest.mark.slow
def test_weight_decay_falls_on_the_matrices_of_an_fsdp1_wrapped_prior():
    for decayed, not_decayed in run_distributed(_fsdp1_groups):
        assert decayed == {2} and not_decayed == {1}


# --- the prior under FSDP2 --------------------------------------------------------------------


class RecordLosses(L.Callback):
    """Every training step's logged losses by name (train/loss, train/d_loss, ...)."""

    def __init__(self):
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.losses.append({name: metrics[name].item() for name in metrics if name.startswith("train/") and "loss" in name})


def fit_run(make_run, shards: str, root: Path, strategy, steps: int, ckpt_path: Path | None = None,
            callbacks: tuple[L.Callback, ...] = (), devices: int = 2):
    """(losses, model) of a run of `make_run`'s model and data (tests.test_exact_resume) on `devices`
    processes that saves a checkpoint every 2 steps, or resumes from `ckpt_path`."""
    model, data = make_run(shards)
    losses = RecordLosses()
    every_2 = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    if ckpt_path is not None:  # a fresh process's RNGs would be anywhere: resume must not depend on them
        torch.manual_seed(1234)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, default_root_dir=root,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[losses, every_2, *callbacks])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return losses.losses, model


def _prior_under_ddp_and_fsdp2(rank: int, world_size: int, root: str) -> dict:
    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)  # loader workers fork, as under a launcher
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))  # the process group is up
    root = Path(root)
    shards = write_token_shards(root) if rank == 0 else str(root / "{00000..00002}.tar")
    torch.distributed.barrier()
    # 24 samples an epoch, 12 per rank in batches of 4: step 2 is mid-epoch
    ddp, _ = fit_run(prior_run, shards, root / "ddp", DDPStrategy(), steps=4)
    fsdp2, _ = fit_run(prior_run, shards, root / "fsdp2", AtomicModelParallelStrategy(), steps=4)
    (middle,) = (root / "fsdp2" / "ckpt").glob("*step=2.ckpt")
    resumed, _ = fit_run(prior_run, shards, root / "resumed", AtomicModelParallelStrategy(), steps=4, ckpt_path=middle)
    return {"ddp": ddp, "fsdp2": fsdp2, "resumed": resumed}


@pytest.mark.slow
def test_the_prior_under_fsdp2_trains_as_under_ddp_and_resumes_mid_epoch_bitwise_and_on_one_process(tmp_path):
    ranks = run_distributed(_prior_under_ddp_and_fsdp2, str(tmp_path))
    for rank in ranks:
        torch.testing.assert_close(rank["fsdp2"], rank["ddp"])
        assert rank["resumed"] == rank["fsdp2"][2:]
    ddp, fsdp2, resumed = (exported(tmp_path, run) for run in ("ddp", "fsdp2", "resumed"))
    assert ddp.keys() == fsdp2.keys() == resumed.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp2[name], ddp[name], msg=name)
        assert torch.equal(resumed[name], fsdp2[name]), name

    # on another world size DCP reshards: the 2-process step-2 checkpoint loads whole into one
    # process, which trains on to step 4 (the interrupted epoch's remaining batches afresh, as documented)
    (one,) = run_distributed(_resume_fsdp2_on_one_process, str(tmp_path), world_size=1)
    middle = exported(tmp_path, "fsdp2", step=2)
    assert one["start"].keys() == middle.keys()
    for name, weight in middle.items():
        assert torch.equal(one["start"][name], weight), name
    assert len(one["losses"]) == 2 and all(math.isfinite(v) for step in one["losses"] for v in step.values())


class RecordStartingWeights(L.Callback):
    """The whole weights (DTensors gathered) the model starts training with, after any restore."""

    def on_train_start(self, trainer, pl_module):
        state = pl_module.transformer.state_dict()
        self.weights = {name: getattr(w, "full_tensor", lambda w=w: w)().detach().clone() for name, w in state.items()}


def _resume_fsdp2_on_one_process(rank: int, world_size: int, root: str) -> dict:
    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))
    root = Path(root)
    (middle,) = (root / "fsdp2" / "ckpt").glob("*step=2.ckpt")
    start = RecordStartingWeights()
    losses, _ = fit_run(prior_run, str(root / "{00000..00002}.tar"), root / "one", AtomicModelParallelStrategy(), steps=4,
                        ckpt_path=middle, callbacks=(start,), devices=1)
    return {"losses": losses, "start": start.weights}


def exported(root: Path, run: str, step: int = 4) -> dict[str, torch.Tensor]:
    """The weights `tessera export` writes from the step-`step` checkpoint of `root / run`."""
    (checkpoint,) = (root / run / "ckpt").glob(f"*step={step}.ckpt")
    out = root / run / f"export-{step}"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return load_file(out / "model.safetensors")


# --- the tokenizer under FSDP2 ----------------------------------------------------------------


def _codebook_restarted_under_fsdp2(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # 15 codes over 2 ranks: shards of 8 and 7 rows; a threshold of 2 restarts every code at the first step
    quantizer = VectorQuantizer(dim=4, codebook_size=15, dead_code_threshold=2.0)
    unsharded, initial = copy.deepcopy(quantizer), quantizer.codebook.detach().clone()
    strategy = SimpleNamespace(data_parallel_mesh=init_device_mesh("cpu", (world_size,)), reshard_after_forward=True)
    shard_in_fp32(quantizer, strategy)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(rank))
    for module in (quantizer, unsharded):  # the same collectives, in the same order, on both ranks
        torch.manual_seed(1)
        module(z)
    return {"initial": initial, "sharded": quantizer.codebook.detach().full_tensor(), "unsharded": unsharded.codebook.detach()}


def test_dead_code_restarts_in_a_forward_reach_the_codebooks_shards():
    for rank in run_distributed(_codebook_restarted_under_fsdp2):
        assert not torch.equal(rank["unsharded"], rank["initial"])
        assert torch.equal(rank["sharded"], rank["unsharded"])



def tokenizer_run(shards: str):
    """The exact-resume tests' tokenizer (dropout, dead-code restarts into a learned codebook, the
    adaptive GAN weight from step 0), with an EMA and a clip that binds, by the norm over all shards."""
    return vqgan_run(shards, ema_decay=0.9, optimizer=OptimizerConfig(lr=1e-3, gradient_clip_val=0.05))


IMAGES = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)


def _tokenizer_under_ddp_and_fsdp2(rank: int, world_size: int, shards: str, root: str) -> dict:
    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)  # loader workers fork, as under a launcher
    as_launched_rank(rank, world_size)
    root = Path(root)
    # 40 samples an epoch, 20 per rank in batches of 4: step 2 is mid-epoch
    ddp, _ = fit_run(tokenizer_run, shards, root / "ddp", DDPStrategy(), steps=4)
    # reconstructions logged mid-run: every rank joins the gathers, in eval mode, changing no training step
    reconstructions = ReconstructionLogger(every_n_steps=2, num_images=2)
    fsdp2, model = fit_run(tokenizer_run, shards, root / "fsdp2", AtomicModelParallelStrategy(), steps=4,
                           callbacks=(reconstructions,))
    (middle,) = (root / "fsdp2" / "ckpt").glob("*step=2.ckpt")
    resumed, _ = fit_run(tokenizer_run, shards, root / "resumed", AtomicModelParallelStrategy(), steps=4, ckpt_path=middle)
    ids = model.encode(IMAGES)  # every rank, the sharded EMA tokenizer
    return {"ddp": ddp, "fsdp2": fsdp2, "resumed": resumed, "ids": ids, "images": model.decode(ids)}



@pytest.mark.slow
def test_the_tokenizer_under_fsdp2_trains_as_under_ddp_resumes_mid_epoch_bitwise_and_exports(tmp_path, shapes_dir):
    ranks = run_distributed(_tokenizer_under_ddp_and_fsdp2, str(shapes_dir / "{00000..00002}.tar"), str(tmp_path))
    for rank in ranks:
        assert {"train/loss", "train/d_loss", "train/g_loss"} <= rank["fsdp2"][0].keys()
        # fp32 to its rounding: a reduce-scatter sums the ranks' gradients in another order than an
        # all-reduce. (The weights are not compared: a conv bias before a per-channel GroupNorm has a
        # zero gradient up to that rounding, which Adam divides by its own tiny moment into whole steps.)
        torch.testing.assert_close(rank["fsdp2"], rank["ddp"], rtol=1e-5, atol=1e-6)
        assert rank["resumed"] == rank["fsdp2"][2:]
    fsdp2, resumed = exported(tmp_path, "fsdp2"), exported(tmp_path, "resumed")
    assert fsdp2.keys() == resumed.keys()
    assert not [name for name in fsdp2 if not torch.equal(resumed[name], fsdp2[name])]
    assert (tmp_path / "fsdp2" / "reconstructions" / "step_00000004.png").is_file()
    (checkpoint,) = (tmp_path / "fsdp2" / "ckpt").glob("*step=4.ckpt")
    unsharded = load_tokenizer(checkpoint)  # the EMA weights, as the export holds them
    for rank in ranks:
        assert torch.equal(unsharded.encode(IMAGES), rank["ids"])
        torch.testing.assert_close(unsharded.decode(rank["ids"]), rank["images"])


class Killed(BaseException):
    """The process killed mid-save: no `except Exception` on the way stops it."""


def _sample_save_and_die_under_fsdp2(rank: int, world_size: int, root: str, tokenizer_dir: str) -> dict:
    import lightning.pytorch.strategies.model_parallel as model_parallel

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))  # the process group is up
    root = Path(root)
    prior = tiny_prior_with_tokenizer(tokenizer_dir)
    samples = SampleLogger(PROMPTS, every_n_steps=2, images_per_prompt=1, top_k=8)
    fit = L.Trainer(accelerator="cpu", devices=2, strategy=AtomicModelParallelStrategy(), max_steps=2, default_root_dir=root,
                    logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[samples])
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=4))
    fit.save_checkpoint(root / "last.ckpt")
    images = prior.generate(PROMPTS, seed=0)  # every rank, the sharded model

    written = model_parallel._distributed_checkpoint_save

    def save_then_die(*args, **kwargs):  # every rank's shards written, then the job dies before the swap
        written(*args, **kwargs)
        raise Killed

    model_parallel._distributed_checkpoint_save = save_then_die
    try:
        fit.save_checkpoint(root / "last.ckpt")
    except Killed:
        pass
    return {"images": images}


@pytest.mark.slow
def test_fsdp2_samples_on_every_rank_and_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, tokenizer_dir):
    ranks = run_distributed(_sample_save_and_die_under_fsdp2, str(tmp_path), str(tokenizer_dir))
    assert (tmp_path / "lightning_logs" / "version_0" / "samples" / "step_00000002.png").is_file()
    assert (tmp_path / ".last.ckpt.tmp").is_dir()  # the killed save's shards, never swapped in
    assert main(["export", "--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "export")]) == 0
    unsharded = load_prior(tmp_path / "export").generate(PROMPTS, seed=0)
    for rank in ranks:
        torch.testing.assert_close(rank["images"], unsharded)


# --- every stage config under every trainer config ----------------------------------------------

STAGE_CONFIGS = sorted((REPO / "configs" / "tokenizer").glob("*.yaml")) + sorted((REPO / "configs" / "prior").glob("*.yaml"))
TRAINER_CONFIGS = sorted((REPO / "configs" / "trainer").glob("*.yaml"))
# the one pair refused at start-up, with this message: FSDP2 does not run taming's BatchNorm discriminator
REFUSED = {("taming_f16_16384.yaml", "fsdp.yaml"): "discriminator.norm 'batch' is not supported under FSDP2"}
RQ_DEPTH = 2  # codes per position of the RQ priors' token shards


def tiny_fit_arguments(stage: Path, trainer: Path, images: str, tokens: str, root: Path) -> list[str]:
    """Overrides that shrink a stage config's model to a few thousand parameters and run it for a
    step on two CPU processes, on the tests' 32 px shapes (tokenizer) or token shards (prior); with
    the GAN on from the first step, so both optimizers step."""
    arguments = [
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.num_nodes=1", "--trainer.precision=32",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}", "--data.batch_size=2", "--data.num_workers=0",
    ]
    model = yaml.safe_load(stage.read_text())["model"]["init_args"]
    if "quantizer" in model:
        if model.get("discriminator", {}).get("norm") == "batch" and trainer.name == "ddp.yaml":
            # SyncBatchNorm runs on GPUs only: on two CPU processes taming's discriminator takes GroupNorm
            arguments.append("--model.init_args.discriminator.norm=group")
        if model["loss"].get("disc_start", 0) is not None:  # a GAN-less config (DALL-E's dVAE) stays one
            arguments.append("--model.init_args.loss.disc_start=0")
        small = {"dim": 4, "codebook_size": 32, "depth": 2}
        quantizer = model["quantizer"]["init_args"]
        return arguments + [
            "--model.init_args.autoencoder.ch=8", "--model.init_args.autoencoder.ch_mult=[1,2]",
            "--model.init_args.autoencoder.num_res_blocks=1", "--model.init_args.autoencoder.z_channels=8",
            "--model.init_args.autoencoder.image_size=32", "--model.init_args.discriminator.ndf=8",
            "--model.init_args.discriminator.n_layers=1", "--model.init_args.loss.pretrained_lpips=false",
            *(f"--model.init_args.quantizer.init_args.{name}={value}" for name, value in small.items() if name in quantizer),
            f"--data.train_shards={images}", "--data.image_size=32",
        ]
    if "code_depth" in model["transformer"]:  # the RQ-Transformer: (h, w, D) ids
        tokens, depth = str(Path(tokens).parent / "rq" / "{00000..00002}.tar"), [
            f"--model.init_args.transformer.code_depth={RQ_DEPTH}", "--model.init_args.transformer.depth_n_layer=1"]
    else:
        depth = []
    return arguments + depth + [
        "--model.init_args.tokenizer=null", "--model.init_args.transformer.n_layer=1", "--model.init_args.transformer.n_head=2",
        "--model.init_args.transformer.n_embd=16", f"--model.init_args.transformer.text_length={TEXT_LENGTH}",
        "--model.init_args.transformer.image_vocab_size=64", "--model.init_args.transformer.image_grid=4",
        f"--data.train_shards={tokens}", "--data.train_samples=24", "--data.image_tokens=true",
        f"--data.text_length={TEXT_LENGTH}",
    ]


def _every_stage_under_every_trainer(rank: int, world_size: int, images: str, root: str) -> list[tuple[str, str]]:
    torch.set_num_threads(1)
    as_launched_rank(rank, world_size)
    root = Path(root)
    if rank == 0:
        (root / "rq").mkdir()
        write_token_shards(root / "rq", id_shape=(4, 4, RQ_DEPTH))
    tokens = write_token_shards(root) if rank == 0 else str(root / "{00000..00002}.tar")
    torch.distributed.barrier()
    trained = []
    for stage in STAGE_CONFIGS:
        for trainer in TRAINER_CONFIGS:
            run = root / f"{stage.parent.name}-{stage.stem}-{trainer.stem}"
            argv = ["fit", "--config", str(stage), "--config", str(trainer), *tiny_fit_arguments(stage, trainer, images, tokens, run)]
            refused = REFUSED.get((stage.name, trainer.name))
            if refused:
                with pytest.raises(ValueError, match=refused):
                    main(argv)
                continue
            assert main(argv) == 0
            trained.append((stage.name, trainer.name))
    return trained


@pytest.mark.slow
def test_every_stage_config_trains_under_every_trainer_config_on_two_processes(tmp_path, shapes_dir):
    """README: `configs/tokenizer/*.yaml` and `configs/prior/*.yaml` with `configs/trainer/ddp.yaml` or
    `fsdp.yaml`; every pair starts and takes its steps, but the refused one, which says why at start-up."""
    ranks = run_distributed(_every_stage_under_every_trainer, str(shapes_dir / "00000.tar"), str(tmp_path))
    pairs = {(stage.name, trainer.name) for stage in STAGE_CONFIGS for trainer in TRAINER_CONFIGS}
    assert ranks[0] == ranks[1] and set(ranks[0]) == pairs - set(REFUSED)
    for stage in STAGE_CONFIGS:
        run = tmp_path / f"{stage.parent.name}-{stage.stem}-fsdp"
        if (stage.name, "fsdp.yaml") not in REFUSED:
            assert is_sharded_checkpoint(newest_checkpoint(checkpoint_dir(run))), stage.name
