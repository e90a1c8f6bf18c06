"""What `tessera fit` does with a run directory (trainer.default_root_dir), so the same command
can be launched into it again and again (a requeued SLURM job, a crashed run restarted):

    RUN_DIR/config.yaml          the resolved config (LightningCLI, overwritten on every launch)
    RUN_DIR/checkpoints/*.ckpt   every ModelCheckpoint without a dirpath, and requeue.ckpt

- resume: with no `--ckpt_path`, the newest checkpoint in RUN_DIR/checkpoints (by modification
  time: last.ckpt, step checkpoints, requeue.ckpt alike) is resumed from. A fresh run needs a
  fresh directory.
- atomic writes: a checkpoint is written to a temporary file beside it, flushed to disk, then
  renamed over the old one, so a crash or a kill while writing leaves the previous checkpoint
  whole. (Lightning's own writer serialises the whole checkpoint in memory, then copies it from
  /tmp, which is neither atomic across filesystems nor cheap for a 16 GB optimizer state.)
- under SLURM: Lightning's signal handler is replaced by callbacks.preemption.Requeue.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from callbacks.console import replace_default_console_callbacks
from callbacks.loggers import RunDirWandbLogger, SaveAndLogConfig
from callbacks.preemption import Requeue
from lightning_modules.fsdp import fsync
from tessera.commands.submit import check_slurm_layout

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def newest_checkpoint(directory: str | Path) -> Path | None:
    """The most recently written `*.ckpt` (a file, or an FSDP sharded-checkpoint directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [path for path in directory.glob("*.ckpt") if not path.name.startswith(".")]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the target's directory, fsync, rename over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # object stores: Lightning's writer, whose upload is all-or-nothing
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        fsync(path.parent)  # makes the rename itself durable


class SaveOnTrainEnd(L.Callback):
    """Writes last.ckpt when training ends (max_steps, max_time) after the last scheduled save.

    ModelCheckpoint(save_last=True, every_n_train_steps=N) saves last.ckpt at end only if it never
    saved before, so a run ending between two saves would lose its last steps, and a relaunch
    with a larger max_steps would redo them.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        keepers = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.save_last]
        requeue = [c for c in trainer.callbacks if isinstance(c, Requeue) and c.checkpoint is not None]
        if not keepers or requeue:
            return  # no last.ckpt wanted, or requeue.ckpt holds this very state
        if trainer.global_step > max(c._last_global_step_saved for c in keepers):
            keeper = keepers[0]
            trainer.save_checkpoint(Path(keeper.dirpath) / f"{keeper.CHECKPOINT_NAME_LAST}{keeper.FILE_EXTENSION}")


def prepare_trainer(trainer: L.Trainer) -> None:
    """Point checkpoints at RUN_DIR/checkpoints, write them atomically and at the end of training,
    and handle SLURM's signal ourselves."""
    directory = checkpoint_dir(trainer.default_root_dir)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(directory)
            # a relaunch resumed from requeue.ckpt does not know last.ckpt as its own: overwrite it, no last-v1.ckpt
            callback._enable_version_counter = False
    trainer.callbacks.append(SaveOnTrainEnd())
    replace_default_console_callbacks(trainer)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own plugin alone
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    # the object Lightning's signal connector reads (no public accessor covers single-device runs)
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment):
        # Lightning's handler would save in the middle of a step, and would ignore SIGTERM (scancel)
        environment.auto_requeue = False
        if not any(isinstance(callback, Requeue) for callback in trainer.callbacks):
            trainer.callbacks.append(Requeue(directory))


def resume_checkpoint(run_dir: str | Path, ckpt_path: str | Path | None) -> str | Path | None:
    """The checkpoint `fit` resumes from: the one asked for, else the newest in RUN_DIR/checkpoints."""
    if ckpt_path is not None:
        return ckpt_path
    newest = newest_checkpoint(checkpoint_dir(run_dir))
    if newest is not None:
        log.info("resuming from %s, the newest checkpoint of %s (--ckpt_path picks another)", newest, run_dir)
    return newest


# warnings Lightning gives on every Tessera run, about choices made on purpose
EXPECTED_WARNINGS = (
    # frozen parts (LPIPS, the EMA copy, a prior's tokenizer) stay in eval mode while training
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # the shard stream's length is exact per rank: every rank yields the same number of batches
    r"Your `IterableDataset` has `__len__` defined",
    # a relaunch into its run directory resumes from the checkpoints there
    r"Checkpoint directory .* exists and is not empty",
    # Lightning 2.6's own use of a torch API that torch deprecated: nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def not_an_advertisement(record: logging.LogRecord) -> bool:
    """False for Lightning's tip to install its hosted logger, printed at the start of every run."""
    return "litlogger" not in record.getMessage()


class TesseraCLI(LightningCLI):
    """LightningCLI that prepares every trainer for the run directory and resumes into it."""

    def __init__(self, *args, **kwargs):
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_an_advertisement)
        # a fixed default seed, recorded in config.yaml (Lightning's default draws 0 and warns that it did)
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        # `tessera` always hands LightningCLI the arguments after its verb, so Lightning's warning
        # about getting both `args` and sys.argv would be printed on every launch
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = config.trainer.default_root_dir or os.getcwd()
        if config.trainer.logger in (None, True):
            # Lightning's own fallback without TensorBoard installed, without its warning
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=str(run_dir))
            )
        # one run directory, one W&B run: the logger keeps its run id there unless told otherwise
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", None) == f"{RunDirWandbLogger.__module__}.{RunDirWandbLogger.__name__}":
                if logger.init_args.get("save_dir") is None:
                    logger.init_args.save_dir = str(run_dir)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        check_slurm_layout(trainer.num_nodes, trainer.num_devices)
        prepare_trainer(trainer)
        return trainer

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resume_checkpoint(self.trainer.default_root_dir, config.get("ckpt_path"))


def lightning_cli(argv: list[str]):
    """Run a LightningCLI subcommand (fit, validate, ...); returns the LightningCLI, trainer included."""
    return TesseraCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        # a requeued SLURM job starts again in the same directory, where config.yaml already is
        save_config_callback=SaveAndLogConfig,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )
