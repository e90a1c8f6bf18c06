"""
FSDP sharded checkpoints: written atomically, read back without a process group.

With `state_dict_type="sharded"`, Lightning's FSDPStrategy writes a checkpoint as a directory
named like a file (`last.ckpt/`): torch.distributed.checkpoint (DCP) files holding
{"model": state_dict, "optimizer_0": ...}, one per rank plus `.metadata`, and `meta.pt`, a
torch.save of everything else (hyper_parameters, loop and callback states). It writes into an
existing directory in place, so a crash in the middle leaves old and new shards mixed: a
checkpoint neither run can load. `AtomicFSDPStrategy` writes every rank's shards into a staging
directory beside the target and swaps it in once all ranks have finished.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy

# Lightning's name for the non-tensor rest of a sharded checkpoint, beside the DCP files
SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory as FSDPStrategy's sharded save writes it (Lightning's own test for one)."""
    return (Path(path) / SHARDED_METADATA).is_file()


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


class AtomicFSDPStrategy(FSDPStrategy):
    """FSDPStrategy whose sharded checkpoints replace the previous ones atomically.

    Every rank writes its shards into `.NAME.tmp` beside the target; after a barrier rank 0 swaps
    the staging directory in (`swap_in`), and a second barrier keeps any rank from reading the
    checkpoint before it is there. `full` state dicts are one file, written by rank 0 through the
    CheckpointIO plugin (tessera.commands.fit.AtomicCheckpointIO under `tessera fit`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(filepath))  # rank 0's path on every rank, as the parent does
        staging = target.with_name(f".{target.name}.tmp")
        if self.global_rank == 0:
            _remove(staging)  # a crashed save's partial shards must not mix with this one's
        self.barrier("AtomicFSDPStrategy.save_checkpoint: staging directory clean")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("AtomicFSDPStrategy.save_checkpoint: every rank's shards written")
        if self.global_rank == 0:
            # DCP fsyncs the shard files it writes; meta.pt and the directory entries are ours
            fsync(staging / SHARDED_METADATA)
            fsync(staging)
            swap_in(staging, target)
        self.barrier("AtomicFSDPStrategy.save_checkpoint: swapped in")


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
