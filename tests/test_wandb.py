"""Weights & Biases for cluster runs, offline: `tessera fit` with configs/logger/wandb_offline.yaml
writes metrics, reconstruction grids and the config into W&B's offline files; a relaunch into the
same run directory continues the same run; the API key is written nowhere; other ranks start no run.

The offline run files are read back with a small reader of W&B's transaction log (`run-ID.wandb`:
LevelDB-log framing around `wandb_internal_pb2.Record` protobufs), since wandb 0.31 ships none.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from callbacks.loggers import RUN_ID_FILE, RunDirWandbLogger, SaveAndLogConfig

# a skip, not a collection error, where wandb is not installed (a GPU node running `pytest -m gpu`)
wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

REPO = Path(__file__).parents[1]
# the shape of a W&B Server key ("local-" + 40 hex), distinctive enough to search every file for
FAKE_KEY = "local-" + "f4ce" * 10

OVERLAY = """
trainer:
  callbacks:
    - class_path: callbacks.reconstructions.ReconstructionLogger
      init_args: {every_n_steps: 2, num_images: 4}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 2}
"""


def fit(run_dir: Path, shards: list[str]) -> subprocess.CompletedProcess:
    """One launch of the tiny tokenizer at 32 px for 4 steps, W&B offline, into `run_dir`."""
    overlay = run_dir.parent / "overlay.yaml"
    overlay.write_text(OVERLAY)
    command = [
        sys.executable, "-m", "tessera.commands.cli", "fit",
        "--config", str(REPO / "configs/tokenizer/tiny_shapes.yaml"),
        "--config", str(REPO / "configs/logger/wandb_offline.yaml"),
        "--config", str(overlay),
        "--model.init_args.autoencoder.image_size=32",
        "--data=datamodules.caption_image.CaptionImageDataModule",
        f"--data.train_shards={shards[0]}", f"--data.val_shards={shards[2]}",
        "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
        "--trainer.max_steps=4", "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run_dir}",  # the logger's save_dir follows it
    ]
    # each launch a fresh process as a requeued job is: not attached to a W&B service an earlier
    # in-process test (the quickstart) started and advertised in WANDB_SERVICE, which would still
    # hold the first launch's run open when the second resumes it
    inherited = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}
    env = {**inherited, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def launches(tmp_path_factory, shapes_urls) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """A run directory after two launches of the same command, as a requeued job makes them."""
    run_dir = tmp_path_factory.mktemp("wandb_fit") / "run"
    return run_dir, [fit(run_dir, shapes_urls), fit(run_dir, shapes_urls)]


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a `.wandb` transaction log: a 7-byte file header, then 32 KiB blocks of
    chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if (length, kind) == (0, 0):  # zero padding up to the next block
            position += room
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def key(item) -> str:
    # wandb-core writes "train/loss" as the nested key ["train/loss"], an image's fields as ["reconstructions", "count"]
    return item.key or "/".join(item.nested_key)


def history(records) -> list[dict]:
    return [{key(item): json.loads(item.value_json) for item in r.history.item} for r in records if r.HasField("history")]


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_an_offline_fit_logs_the_metrics_the_reconstruction_grids_and_the_config(launches):
    run_dir, _ = launches
    first = offline_runs(run_dir)[0]
    records = read_records(next(first.glob("run-*.wandb")))
    rows = history(records)

    losses = {row["trainer/global_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert sorted(losses) == [0, 1, 2, 3]  # log_every_n_steps=1, 4 steps
    assert all(math.isfinite(loss) and loss > 0 for loss in losses.values())
    assert any("val/psnr" in row for row in rows)

    grids = [row for row in rows if row.get("reconstructions/_type") == "images/separated"]
    assert [row["trainer/global_step"] for row in grids] == [2, 4]
    for row in grids:
        assert (first / "files" / row["reconstructions/filenames"][0]).is_file()
        assert row["reconstructions/captions"][0].startswith(f"step {row['trainer/global_step']}:")

    # the whole resolved config, as config.yaml has it, is the run's config
    config = {key(item): json.loads(item.value_json) for r in records if r.HasField("config") for item in r.config.update}
    assert config["model"]["class_path"] == "lightning_modules.vqgan.VQGAN"
    assert config["model"]["init_args"]["autoencoder"]["image_size"] == 32
    assert config["data"]["init_args"]["batch_size"] == 4
    assert config["trainer"]["logger"]["class_path"] == "callbacks.loggers.RunDirWandbLogger"
    assert (run_dir / "config.yaml").is_file()


def test_a_relaunch_into_the_run_directory_continues_the_same_run(launches):
    run_dir, _ = launches
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    runs = offline_runs(run_dir)
    # one offline directory per launch, all of the one run; `wandb sync` uploads them in order
    assert len(runs) == 2
    assert all(path.name.endswith(f"-{run_id}") for path in runs)
    for path in runs:
        (run,) = [r.run for r in read_records(next(path.glob("run-*.wandb"))) if r.HasField("run")]
        assert run.run_id == run_id


def test_the_api_key_is_written_nowhere(launches):
    run_dir, results = launches
    secret = FAKE_KEY.split("-", 1)[1].encode()
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert {"config.yaml", "last.ckpt", "debug.log", "debug-internal.log", "output.log"} <= {p.name for p in files}
    assert [path for path in files if secret in path.read_bytes()] == []
    assert all(FAKE_KEY not in result.stdout + result.stderr for result in results)


def test_launches_print_no_warning_about_the_anonymous_setting(launches):
    _, results = launches
    # WandbLogger passes `anonymous` whatever its value, and W&B warns that the setting is gone
    assert all("anonymous" not in result.stdout + result.stderr for result in results)


def test_other_ranks_start_no_run_and_write_no_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = RunDirWandbLogger(save_dir=str(tmp_path), project="tessera")
    assert type(logger.experiment).__name__ == "_DummyExperiment"
    logger.log_hyperparams({"lr": 1e-3})
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.log_image(key="samples", images=[[[0, 0, 0]]], step=1)
    assert logger.version is None
    assert list(tmp_path.iterdir()) == []


def test_keys_in_the_logger_arguments_are_refused_without_repeating_them(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    for arguments, where in [
        ({"settings": {"api_key": "anything"}}, "settings.api_key"),
        ({"notes": f"key {FAKE_KEY}"}, "notes"),  # the key in use, inside any text
        ({"tags": ["tiny", "0123456789abcdef0123456789abcdef01234567"]}, "tags[1]"),  # a classic 40-hex key
        ({"name": "x" * 86}, "name"),  # today's 86-character keys
    ]:
        with pytest.raises(ValueError, match="WANDB_API_KEY") as refused:
            RunDirWandbLogger(save_dir=str(tmp_path), **arguments)
        assert f"`{where}`" in str(refused.value) and "f4cef4ce" not in str(refused.value)
    RunDirWandbLogger(save_dir=str(tmp_path), name="tokenizer-f16-laion-256px", tags=["3f54bec"], settings={"identity_token_file": "/run/token"})


def test_a_config_holding_the_key_is_refused_before_the_trainer_exists(tmp_path, monkeypatch, shapes_urls):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    with pytest.raises(ValueError, match="`data.init_args.val_shards` is or looks like a W&B API key"):
        LightningCLI(
            L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            auto_configure_optimizers=False, save_config_callback=SaveAndLogConfig, run=False, args=[
                "--config", str(REPO / "configs/tokenizer/tiny_shapes.yaml"),
                "--data=datamodules.caption_image.CaptionImageDataModule",
                f"--data.train_shards={shapes_urls[0]}", f"--data.val_shards=/data/{FAKE_KEY}/00000.tar",
                f"--trainer.default_root_dir={tmp_path}",
            ],
        )
    assert list(tmp_path.iterdir()) == []


def test_the_run_directory_is_required(tmp_path):
    with pytest.raises(ValueError, match="save_dir, the run directory"):
        RunDirWandbLogger(project="tessera")
