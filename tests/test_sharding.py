"""The prior and the tokenizer sharded over 2 CPU processes (gloo): optimizer groups chosen before
wrapping, FSDP2 against DDP, its checkpoints, resume and export."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.parallel import unwrapped_name
from lightning_modules.prior import TextImagePrior
from tessera.nn.transformer import Block, TransformerConfig
from tests.distributed import run_distributed


def tiny_prior() -> TextImagePrior:
    torch.manual_seed(0)
    config = TransformerConfig(text_length=8, image_vocab_size=16, image_grid=2, n_layer=2, n_head=2, n_embd=16)
    return TextImagePrior(transformer=config)


def group_shapes(prior: TextImagePrior) -> list[set[int]]:
    """The number of dimensions of each AdamW group's parameters, by the module as built."""
    built = {name: p.dim() for name, p in tiny_prior().transformer.named_parameters()}
    ids = {id(p): name for name, p in prior.transformer.named_parameters()}
    return [{built[unwrapped_name(ids[id(p)])] for p in group["params"]} for group in prior.parameter_groups()]


def _fsdp1_groups(rank: int, world_size: int) -> list[set[int]]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    prior = tiny_prior()
    # as Lightning's FSDPStrategy wraps it: every parameter becomes a 1-D view of a flat shard
    prior.transformer = FullyShardedDataParallel(
        prior.transformer, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu")
    )
    assert all(p.dim() == 1 for p in prior.transformer.parameters())
    return group_shapes(prior)


@pytest.mark.slow
def test_weight_decay_falls_on_the_matrices_of_an_fsdp1_wrapped_prior():
    for decayed, not_decayed in run_distributed(_fsdp1_groups):
        assert decayed == {2} and not_decayed == {1}
