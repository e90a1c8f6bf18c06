"""Run a function on several CPU processes joined by a gloo process group, as DDP ranks would be."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def as_launched_rank(rank: int, world_size: int) -> None:
    """Makes a Trainer(devices=world_size) in this process join the process group already up as rank
    `rank`, as under torchrun or srun, instead of launching processes of its own."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size))


def run_distributed(fn: Callable, *args, world_size: int = 2) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` spawned processes; their return values in rank order.

    fn must be importable (a module-level function) and return picklable values (move tensors
    to CPU). A failure on any rank fails the call.
    """
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world_size, _free_port(), fn, args, results), nprocs=world_size, join=True)
        return [results[rank] for rank in range(world_size)]
