"""
What each stage asks of the strategy that wraps it, applied from `configure_model`, which Lightning
calls before the strategy wraps the module: any trainer config then composes with any stage config.

DDP: Lightning's DDPStrategy keeps the keyword arguments it passes to DistributedDataParallel in
`_ddp_kwargs`; `adjust_ddp` sets them here.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, Strategy


def adjust_ddp(strategy: Strategy, find_unused_parameters: bool = False) -> None:
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
