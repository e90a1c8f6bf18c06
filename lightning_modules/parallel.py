"""
What each stage asks of the strategy that wraps it, applied from `configure_model`, which Lightning
calls before the strategy wraps the module: any trainer config then composes with any stage config.

DDP: Lightning's DDPStrategy keeps the keyword arguments it passes to DistributedDataParallel in
`_ddp_kwargs`; `adjust_ddp` sets them here.
FSDP2 (lightning_modules.fsdp.AtomicModelParallelStrategy): the module shards itself, `shard`, and
`shard_in_fp32` for a unit whose maths is fp32 by design and whose forward writes its parameters.
Either way a frozen helper network (the prior's tokenizer, the VQ-GAN's LPIPS) is held outside the
module tree (`FrozenModule`): neither wrapped nor sharded, and never in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import distribute_tensor

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
          compile: bool = False, methods: Iterable[str] = (), reshard_after_forward: bool | None = None) -> None:
    """FSDP2 over the strategy's data-parallel mesh: each unit (a transformer Block) sharded on its
    own, so one block's parameters are gathered at a time, then `root` holding the rest.
    `methods`: the root's entry points besides forward (FSDP2 gathers its parameters around them).
    `reshard_after_forward`: the strategy's setting unless given.

    torch.compile applies per unit in place, after sharding, keeping parameter names (checkpoints
    and optimizer groups see the module as built)."""
    options = dict(
        mesh=strategy.data_parallel_mesh,
        mp_policy=mixed_precision(strategy, precision),
        reshard_after_forward=strategy.reshard_after_forward if reshard_after_forward is None else reshard_after_forward,
    )
    for unit in units:
        fully_shard(unit, **options)
        if compile:
            unit.compile()
    fully_shard(root, **options)
    for method in methods:
        register_fsdp_forward_method(root, method)


def shard_in_fp32(unit: nn.Module, strategy: AtomicModelParallelStrategy, methods: Iterable[str] = (),
                  reshard_after_forward: bool | None = None) -> None:
    """`unit` an FSDP2 unit of its own whose parameters are gathered in fp32 under any precision (a
    quantizer: its codebook maths is fp32 by design, bf16 codes would move its nearest neighbours).

    Its forward may write into its parameters in training (dead-code restarts overwrite codebook
    rows): under FSDP2 it writes into the gathered copy, which is freed after the forward, so what it
    wrote is copied into this rank's shard first, where DDP would have it in the parameter itself."""
    fully_shard(
        unit,
        mesh=strategy.data_parallel_mesh,
        mp_policy=MixedPrecisionPolicy(),
        reshard_after_forward=strategy.reshard_after_forward if reshard_after_forward is None else reshard_after_forward,
    )
    shards = dict(unit.named_parameters())  # DTensors: what the optimizer steps and checkpoints hold

    @torch.no_grad()
    def write_through(module: nn.Module, args, output) -> None:
        if not module.training:  # no parameter is written outside training
            return
        for name, gathered in module.named_parameters():  # the gathered ones while forward runs
            shard = shards[name]
            if gathered is not shard:
                # this rank's rows of the full tensor it already holds: a local copy, no collective
                shard.copy_(distribute_tensor(gathered.detach(), shard.device_mesh, shard.placements, src_data_rank=None))

    unit.register_forward_hook(write_through, prepend=True)  # before FSDP2's own hook frees the gathered copy
    for method in methods:
        register_fsdp_forward_method(unit, method)


class FrozenModule:
    """Holds a module outside its owner's module tree, in eval mode without gradients: no strategy
    wraps or shards it, no precision plugin casts it, no checkpoint holds it (it is loaded from its
    own files)."""

    def __init__(self, module: nn.Module):
        self.module = module.requires_grad_(False).eval()

    def on(self, device: torch.device) -> nn.Module:
        """The module, moved to `device` first if it is elsewhere."""
        if next(self.module.parameters()).device != device:
            self.module.to(device)
        return self.module
