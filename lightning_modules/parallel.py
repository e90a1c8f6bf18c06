"""
What each stage asks of the strategy that wraps it, applied from `configure_model`, which Lightning
calls before the strategy wraps the module: any trainer config then composes with any stage config.

DDP: Lightning's DDPStrategy keeps the keyword arguments it passes to DistributedDataParallel in
`_ddp_kwargs`; `adjust_ddp` sets them here.
FSDP2 (lightning_modules.fsdp.AtomicModelParallelStrategy): the module shards itself, `shard`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from lightning_modules.fsdp import AtomicModelParallelStrategy


def adjust_ddp(strategy: Strategy | None, find_unused_parameters: bool = False) -> None:
    """Under DDP: no buffer broadcast in every forward, and unused parameters found when asked.

    Every Tessera buffer is the same on every rank by construction (codebook EMA statistics,
    usage counts and LeCAM anchors are all-reduced, dead-code restarts broadcast from rank 0,
    the rest constant), so DDP's broadcast of rank 0's buffers before each forward only costs
    time; they are still synced once when DDP wraps the module (`forward_sync_buffers=False`).
    find_unused_parameters: the VQ-GAN's alternating generator and discriminator steps each
    leave the other network without gradients, which DDP otherwise stops on.
    """
    if not isinstance(strategy, DDPStrategy):
        return
    strategy._ddp_kwargs["forward_sync_buffers"] = False
    if find_unused_parameters:
        strategy._ddp_kwargs["find_unused_parameters"] = True


# what wrappers insert into parameter names: FSDP1, activation checkpointing, torch.compile of a module
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name in the module as built, before any wrapper renamed it."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def mixed_precision(strategy: AtomicModelParallelStrategy, precision: str) -> MixedPrecisionPolicy:
    """bf16 parameters for compute and fp32 gradient reduction under bf16-mixed on GPUs, fp32 elsewhere.

    Block inputs are not cast (`cast_forward_inputs=False`): the residual stream stays fp32 between
    blocks, as under DDP's autocast, while autocast runs each block's matmuls in bf16."""
    if precision != "bf16-mixed" or strategy.root_device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard(root: nn.Module, units: Iterable[nn.Module], strategy: AtomicModelParallelStrategy, precision: str,
          compile: bool = False, methods: Iterable[str] = ()) -> None:
    """FSDP2 over the strategy's data-parallel mesh: each unit (a transformer Block) sharded on its
    own, so one block's parameters are gathered at a time, then `root` holding the rest.
    `methods`: the root's entry points besides forward (FSDP2 gathers its parameters around them).

    torch.compile applies per unit in place, after sharding, keeping parameter names (checkpoints
    and optimizer groups see the module as built)."""
    options = dict(
        mesh=strategy.data_parallel_mesh,
        mp_policy=mixed_precision(strategy, precision),
        reshard_after_forward=strategy.reshard_after_forward,
    )
    for unit in units:
        fully_shard(unit, **options)
        if compile:
            unit.compile()
    fully_shard(root, **options)
    for method in methods:
        register_fsdp_forward_method(root, method)
