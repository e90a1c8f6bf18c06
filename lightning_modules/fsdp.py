"""
FSDP strategies whose sharded checkpoints are written atomically, and read back without a process group.

Lightning's ModelParallelStrategy (FSDP2, `AtomicModelParallelStrategy`, configs/trainer/fsdp.yaml)
and FSDPStrategy (FSDP1, with `state_dict_type="sharded"`) write a checkpoint as a directory named
like a file (`last.ckpt/`): torch.distributed.checkpoint (DCP) files, one per rank plus `.metadata`,
holding {"state_dict": ..., "optimizer_0": ...} (FSDP2) or {"model": ..., "optimizer_0": ...}
(FSDP1), and `meta.pt`, a torch.save of everything else (hyper_parameters, loop and callback
states). Both write into an existing directory in place, so a crash in the middle leaves old and
new shards mixed: a checkpoint neither run can load. Here every rank's shards go into a staging
directory beside the target, swapped in once all ranks have finished.
"""

from __future__ import annotations

import os
import pickle
import shutil
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, ParallelStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.constants import default_pg_timeout

# Lightning's name for the non-tensor rest of a sharded checkpoint, beside the DCP files
SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory as FSDPStrategy's sharded save writes it (Lightning's own test for one)."""
    return (Path(path) / SHARDED_METADATA).is_file()


def sharded_weights_key(path: str | Path) -> str:
    """Where a sharded checkpoint keeps the module's weights: "state_dict" (FSDP2) or "model" (FSDP1)."""
    entries = FileSystemReader(path).read_metadata().state_dict_metadata  # flattened: "state_dict.transformer..."
    return "state_dict" if any(name.startswith("state_dict.") for name in entries) else "model"


def load_sharded_state(path: str | Path, prefix: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries `prefix + name` of a sharded checkpoint's module weights, for every name of `like`
    (a module's state dict), each whole, read into `like`'s own tensors (no second copy of a model).

    DCP reads into the tensors it is given, each from the shards of every rank that saved one; only
    these entries are asked for, so the optimizer's shards and the other networks stay on disk.
    no_dist: this process alone, even where a process group exists (after a fit)."""
    key = sharded_weights_key(path)
    state = {key: {prefix + name: tensor for name, tensor in like.items()}}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state[key]


def checkpoint_hyperparameters(path: str | Path) -> dict[str, Any]:
    """The `hyper_parameters` a Lightning checkpoint was saved with: a .ckpt file or an FSDP
    sharded directory (whose meta.pt holds them), read without loading any weights."""
    path = Path(path)
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise ValueError(f"{path} is a directory but not an FSDP sharded checkpoint: it has no {SHARDED_METADATA}")
        path = path / SHARDED_METADATA
    elif not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # mmap: a file's tensors (weights, optimizer state) stay on disk, only the small rest is read
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is not a Lightning checkpoint: torch.load cannot read it") from error
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint of a Tessera model: it has no hyper_parameters")
    return checkpoint["hyper_parameters"]


def swap_in(staging: Path, target: Path) -> None:
    """Put the complete checkpoint directory `staging` at `target`, replacing what is there.

    A directory cannot be renamed over a non-empty one, so the old checkpoint is renamed aside
    first and deleted only once the new one is in place; each rename is atomic. Between the two
    renames (microseconds) `target` is missing and the old checkpoint is whole under the trash
    name; at any other moment `target` is the old checkpoint or the new one, never a mix.
    """
    trash = target.with_name(f".{target.name}.old")
    _remove(trash)  # left by a crash between the swap and the deletion below
    if target.exists():
        target.rename(trash)  # a file as well: a `full` checkpoint written under the same name
    staging.rename(target)
    fsync(target.parent)  # makes both renames durable
    _remove(trash)


def save_atomically(strategy: ParallelStrategy, filepath, save: Callable[[Path], None]) -> None:
    """Every rank's `save(staging)` into `.NAME.tmp` beside the target, then swapped in by rank 0.

    A barrier after the writes lets rank 0 swap only a complete directory in (`swap_in`), and a
    last one keeps any rank from reading the checkpoint before it is there.
    """
    target = Path(strategy.broadcast(filepath))  # rank 0's path on every rank, as Lightning's saves do
    staging = target.with_name(f".{target.name}.tmp")
    if strategy.global_rank == 0:
        _remove(staging)  # a crashed save's partial shards must not mix with this one's
    strategy.barrier("save_atomically: staging directory clean")
    save(staging)
    strategy.barrier("save_atomically: every rank's shards written")
    if strategy.global_rank == 0:
        # DCP fsyncs the shard files it writes; meta.pt and the directory entries are ours
        fsync(staging / SHARDED_METADATA)
        fsync(staging)
        swap_in(staging, target)
    strategy.barrier("save_atomically: swapped in")


class AtomicFSDPStrategy(FSDPStrategy):
    """FSDPStrategy (FSDP1) whose sharded checkpoints replace the previous ones atomically
    (`save_atomically`). `full` state dicts are one file, written by rank 0 through the
    CheckpointIO plugin (tessera.commands.fit.AtomicCheckpointIO under `tessera fit`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save_atomically(self, filepath, partial(super().save_checkpoint, checkpoint, storage_options=storage_options))


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """FSDP2: Lightning's ModelParallelStrategy over one data-parallel mesh of every process, its
    distributed checkpoints replacing the previous ones atomically (`save_atomically`).

    The module shards itself in `configure_model` (lightning_modules.parallel.shard: `fully_shard`
    over `data_parallel_mesh`), reading `reshard_after_forward` here; under `bf16-mixed` on GPUs the
    sharded parameters are gathered in bf16 and gradients reduced in fp32. Activation
    checkpointing is the transformer's own option (`activation_checkpointing` in its config).
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ):
        """
        Args:
            reshard_after_forward: free each block's gathered parameters after its forward and
                gather them again for the backward (less memory, one more all-gather per block).
            save_distributed_checkpoint: one file per rank in a directory (no rank gathers the
                model); False gathers one .ckpt file on rank 0.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process shards the one model
        super().setup_environment()

    @property
    def data_parallel_mesh(self):
        return self.device_mesh["data_parallel"]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save_atomically(self, filepath, partial(super().save_checkpoint, checkpoint, storage_options=storage_options))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
