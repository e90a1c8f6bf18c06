"""Where a process sits in a multi-process job started by torchrun or SLURM's srun, without a
process group: the commands that split work by rank (tokenize, evaluate) read it from here."""

from __future__ import annotations

import os


def env_int(names: tuple[str, ...], default: int) -> int:
    """The first of `names` set in the environment (torchrun's, then SLURM's), else `default`."""
    return next((int(os.environ[name]) for name in names if name in os.environ), default)


def rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The given values, else RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS, else 0 and 1."""
    if rank is None:
        rank = env_int(("RANK", "SLURM_PROCID"), 0)
    if world_size is None:
        world_size = env_int(("WORLD_SIZE", "SLURM_NTASKS"), 1)
    return rank, world_size


def process_device(name: str | None = None) -> "torch.device":
    """`name`, else CUDA when there is one, else the CPU. An unindexed CUDA device becomes this
    process's own GPU (LOCAL_RANK or SLURM_LOCALID, modulo the GPUs visible): one GPU per process."""
    import torch  # here, so the command line starts without loading torch

    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env_int(("LOCAL_RANK", "SLURM_LOCALID"), 0) % torch.cuda.device_count())
    return device
