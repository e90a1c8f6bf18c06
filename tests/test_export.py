"""FSDP sharded checkpoints and `tessera export` of a prior: AtomicFSDPStrategy's staging swap
(a crash while saving leaves the previous checkpoint whole), export of a sharded directory or a
.ckpt file to model.safetensors + config.json, and `load_prior` on all three giving the same samples.

On CPU the sharded checkpoints are written by Lightning's own sharded save (FSDPStrategy's, reached
through AtomicFSDPStrategy) in one process, from the checkpoint a CPU fit would save. The test that
trains under FSDP2 (AtomicModelParallelStrategy) in bf16 on one GPU is marked `gpu`; two-process
FSDP2 runs on CPU are in tests/test_sharding.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.strategies.fsdp import _METADATA_FILENAME
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.utils.data import DataLoader

import lightning.pytorch.strategies.fsdp
import lightning_modules.fsdp
from lightning_modules.fsdp import SHARDED_METADATA, AtomicFSDPStrategy, AtomicModelParallelStrategy, swap_in
from lightning_modules.prior import TextImagePrior, build_prior, load_prior, load_transformer_weights
from tessera.commands.cli import main
from tessera.nn.transformer import TextImageTransformer
from tessera.commands.fit import newest_checkpoint
from tests.test_prior import Tokens, tiny_config, tiny_prior, tokenizer_dir  # noqa: F401 (tokenizer_dir: a fixture)
from tests.test_vqgan import trainer

PROMPTS = ["a red circle", "two blue squares"]


class Killed(BaseException):
    """The process killed mid-save: no `except Exception` on the way stops it."""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tokenizer_dir) -> L.Trainer:
    """A tiny prior one step into training on CPU: its optimizer has state to save."""
    prior = tiny_prior(tokenizer_dir)
    fit = trainer(tmp_path_factory.mktemp("fit"), max_steps=1)
    fit.fit(prior, DataLoader(Tokens(prior), batch_size=8))
    return fit


def checkpoint_of(fit: L.Trainer) -> dict:
    """The dict `fit.save_checkpoint` hands to its strategy (Lightning has no public accessor)."""
    return fit._checkpoint_connector.dump_checkpoint()


def save_sharded(checkpoint: dict, path: Path) -> Path:
    """What `save_checkpoint` writes in a one-GPU FSDP run with sharded state dicts."""
    AtomicFSDPStrategy(state_dict_type="sharded").save_checkpoint(checkpoint, path)
    return path


def transformer_weights(path: Path) -> dict[str, torch.Tensor]:
    transformer = TextImageTransformer(tiny_config())
    load_transformer_weights(transformer, path)
    return transformer.state_dict()


def assert_weights_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, fitted) -> Path:
    return save_sharded(checkpoint_of(fitted), tmp_path_factory.mktemp("run") / "last.ckpt")


# --- the atomic sharded save --------------------------------------------------------------


def test_a_sharded_save_writes_lightnings_layout_with_no_staging_left(sharded, fitted):
    entries = {path.name for path in sharded.parent.iterdir()}
    assert entries == {"last.ckpt"}  # no .last.ckpt.tmp, no .last.ckpt.old
    assert SHARDED_METADATA == _METADATA_FILENAME
    stored = FileSystemReader(sharded).read_metadata().state_dict_metadata
    module_state = set(fitted.lightning_module.state_dict())
    assert {name.removeprefix("model.") for name in stored if name.startswith("model.")} == module_state
    assert any(name.startswith("optimizer_0.") for name in stored)
    meta = torch.load(sharded / SHARDED_METADATA, weights_only=True)
    assert meta["global_step"] == 1 and meta["hyper_parameters"]["transformer"]["n_layer"] == 2
    assert "state_dict" not in meta and "optimizer_states" not in meta
    assert newest_checkpoint(sharded.parent) == sharded  # what `tessera fit` resumes from


def test_a_crash_while_saving_leaves_the_previous_sharded_checkpoint_whole(tmp_path, fitted, monkeypatch):
    target = save_sharded(checkpoint_of(fitted), tmp_path / "last.ckpt")
    old = transformer_weights(target)

    def newer() -> dict:
        checkpoint = checkpoint_of(fitted)
        checkpoint["state_dict"] = {name: tensor + 1 for name, tensor in checkpoint["state_dict"].items()}
        return checkpoint

    def killed(*args, **kwargs):
        raise Killed

    def killed_after(save):
        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            raise Killed

        return save_then_die

    # killed with the shards written, before meta.pt: the staging directory is half written
    with monkeypatch.context() as patch:
        shards = "lightning.pytorch.strategies.fsdp._distributed_checkpoint_save"
        patch.setattr(shards, killed_after(lightning.pytorch.strategies.fsdp._distributed_checkpoint_save))
        with pytest.raises(Killed):
            save_sharded(newer(), target)
    staging = tmp_path / ".last.ckpt.tmp"
    assert (staging / ".metadata").is_file() and not (staging / SHARDED_METADATA).exists()
    assert_weights_equal(transformer_weights(target), old)

    # killed with the new checkpoint complete, before the swap
    with monkeypatch.context() as patch:
        patch.setattr(lightning_modules.fsdp, "swap_in", killed)
        with pytest.raises(Killed):
            save_sharded(newer(), target)
    assert_weights_equal(transformer_weights(target), old)
    assert torch.load(target / SHARDED_METADATA, weights_only=True)["global_step"] == 1

    save_sharded(newer(), target)
    assert_weights_equal(transformer_weights(target), {name: tensor + 1 for name, tensor in old.items()})
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]


def test_swap_in_replaces_a_directory_or_a_file_and_clears_a_crashed_swaps_trash(tmp_path):
    def staged(content: str) -> Path:
        staging = tmp_path / ".last.ckpt.tmp"
        staging.mkdir()
        (staging / "shard").write_text(content)
        return staging

    target = tmp_path / "last.ckpt"
    target.write_text("a full checkpoint")
    swap_in(staged("first"), target)
    assert (target / "shard").read_text() == "first"

    (tmp_path / ".last.ckpt.old").mkdir()  # a crash between the swap and the deletion of the old one
    (tmp_path / ".last.ckpt.old" / "shard").write_text("older")
    swap_in(staged("second"), target)
    assert (target / "shard").read_text() == "second"
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]


# --- export and load_prior ----------------------------------------------------------------


def test_a_sharded_checkpoint_exports_the_models_weights_bitwise_and_its_config(tmp_path, sharded, fitted, capsys):
    prior = fitted.lightning_module
    assert main(["export", "--checkpoint", str(sharded), "--out", str(tmp_path / "export")]) == 0
    assert "[export] prior, 2 blocks of width 64" in capsys.readouterr().out
    weights = load_file(tmp_path / "export" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert_weights_equal(weights, prior.transformer.state_dict())
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config == json.loads(json.dumps(dict(prior.hparams)))
    assert config["class_path"] == "lightning_modules.prior.TextImagePrior"
    rebuilt = build_prior(config)  # the config is the class and its constructor's arguments
    assert type(rebuilt) is TextImagePrior and rebuilt.config == prior.config and rebuilt.hparams == prior.hparams


def test_an_export_a_sharded_checkpoint_and_a_ckpt_file_sample_the_same_images(tmp_path, sharded, fitted):
    fitted.save_checkpoint(tmp_path / "prior.ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "prior.ckpt"), "--out", str(tmp_path / "export")]) == 0
    expected = fitted.lightning_module.eval().generate(PROMPTS, seed=0)
    for path in (tmp_path / "export", sharded, tmp_path / "prior.ckpt"):
        prior = load_prior(path)
        assert not prior.training
        torch.testing.assert_close(prior.generate(PROMPTS, seed=0), expected, rtol=0, atol=0, msg=str(path))


def test_sample_command_reads_an_export_directory_and_another_tokenizer(tmp_path, sharded, tokenizer_dir):
    assert main(["export", "--checkpoint", str(sharded), "--out", str(tmp_path / "export")]) == 0
    argv = ["sample", "--prior", str(tmp_path / "export"), "--prompt", *PROMPTS, "--num-images", "2", "--top-k", "8"]
    assert main([*argv, "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples" / "images").glob("000*_0*.png"))) == 4
    assert json.loads((tmp_path / "samples" / "settings.json").read_text())["prior"] == str(tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="elsewhere"):  # --tokenizer replaces the tokenizer the export names
        main([*argv, "--tokenizer", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "none")])


def test_export_of_something_that_is_no_checkpoint_says_what_it_is(tmp_path, tokenizer_dir):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "notes.txt", ValueError, "notes.txt is not a Lightning checkpoint"),
        (tmp_path / "empty", ValueError, "is a directory but not an FSDP sharded checkpoint: it has no meta.pt"),
        (tmp_path / "missing.ckpt", FileNotFoundError, "no checkpoint at"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="not a TextImagePrior checkpoint or export"):
        load_prior(tokenizer_dir)  # a tokenizer's export
    assert not (tmp_path / "out").exists()


# --- a real FSDP2 run ---------------------------------------------------------------------


@pytest.fixture
def process_group_torn_down():
    """Lightning keeps the process group of a sharded fit until the interpreter exits: the GPU tests
    after this one run as a plain one-GPU job, without it."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a bf16 FSDP2 run on a CUDA device")
def test_a_one_gpu_fsdp2_fit_resumes_from_its_sharded_last_ckpt_and_exports_it(
    tmp_path, tokenizer_dir, process_group_torn_down
):
    from tessera.commands.fit import checkpoint_dir, prepare_trainer, resume_checkpoint

    class SaveAtTrainStart(L.Callback):
        """Saves the state the resumed run starts from, after Lightning has restored it."""

        def on_train_start(self, trainer, pl_module):
            assert trainer.global_step == 2
            trainer.save_checkpoint(tmp_path / "restored.ckpt")

    def fsdp_trainer(max_steps: int, callbacks: list[L.Callback]) -> L.Trainer:
        fit = L.Trainer(
            accelerator="gpu", devices=1, strategy=AtomicModelParallelStrategy(), precision="bf16-mixed", max_steps=max_steps,
            default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[ModelCheckpoint(save_top_k=0, save_last=True, every_n_train_steps=2), *callbacks],
        )
        prepare_trainer(fit)  # what `tessera fit` does: checkpoints in RUN_DIR/checkpoints
        return fit

    first = tiny_prior(tokenizer_dir)
    fsdp_trainer(2, []).fit(first, DataLoader(Tokens(first), batch_size=4))
    last = checkpoint_dir(tmp_path / "run") / "last.ckpt"
    assert last.is_dir() and (last / SHARDED_METADATA).is_file()
    assert [path.name for path in last.parent.iterdir()] == ["last.ckpt"]
    assert main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "step2")]) == 0

    resumed = tiny_prior(tokenizer_dir)
    resumer = fsdp_trainer(4, [SaveAtTrainStart()])
    assert resume_checkpoint(tmp_path / "run", None) == last
    resumer.fit(resumed, DataLoader(Tokens(resumed), batch_size=4), ckpt_path=last)
    assert resumer.global_step == 4
    assert_weights_equal(transformer_weights(tmp_path / "restored.ckpt"), load_file(tmp_path / "step2" / "model.safetensors"))
    assert torch.load(last / SHARDED_METADATA, weights_only=True)["global_step"] == 4

    assert main(["export", "--checkpoint", str(last), "--out", str(tmp_path / "step4")]) == 0
    assert_weights_equal(load_file(tmp_path / "step4" / "model.safetensors"), transformer_weights(last))
    samples = [load_prior(path, "cuda").generate(PROMPTS, seed=0) for path in (last, tmp_path / "step4")]
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=0)
