"""What each stage's `compile` option compiles, and that its training steps then trace without graph
breaks, the prior's under FSDP2 too: on the CPU with the "aot_eager" backend (Dynamo's tracing and
AOT autograd, no code generation), in place of Inductor, which the GPU tests run."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tessera.nn.lookup_free_quantizer import LookupFreeQuantizer
from tessera.nn.vector_quantizer import VectorQuantizer
from tests.distributed import as_launched_rank, run_distributed
from tests.test_prior import RecordLoss, Tokens, tiny_prior, tokenizer_dir  # noqa: F401 (tokenizer_dir: a fixture)
from tests.test_vqgan import loader, tiny_vqgan, trainer


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile (and so nn.Module.compile) with the aot_eager backend; Dynamo's caches and counters emptied."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def compiled(module: torch.nn.Module) -> bool:
    return module._compiled_call_impl is not None


def test_the_prior_compiles_its_blocks_and_its_head_losses_and_trains_without_graph_breaks(tmp_path, tokenizer_dir, aot_eager):
    prior = tiny_prior(tokenizer_dir, compile=True)
    trainer(tmp_path, max_steps=2).fit(prior, DataLoader(Tokens(prior), batch_size=4))
    assert all(compiled(block) for block in prior.transformer.blocks)
    assert hasattr(prior.transformer.head_losses, "_torchdynamo_orig_callable")  # what torch.compile returns
    assert not compiled(prior.transformer)  # the embeddings stay eager
    assert dict(aot_eager["graph_break"]) == {}
    assert aot_eager["stats"]["unique_graphs"] >= 2  # the blocks' and the heads'


@pytest.mark.parametrize(
    "quantizer", [VectorQuantizer(dim=4, codebook_size=32, ema_decay=0.9, dead_code_threshold=1.0), LookupFreeQuantizer(dim=4)],
    ids=["vq_ema_restarts", "lfq"],
)
def test_the_tokenizer_compiles_its_networks_but_not_its_quantizer_and_trains_without_graph_breaks(tmp_path, quantizer, aot_eager):
    torch.manual_seed(0)
    model = tiny_vqgan(quantizer=quantizer, compile=True)
    trainer(tmp_path, max_steps=3).fit(model, loader(num_samples=24))
    tokenizer = model.tokenizer
    assert compiled(tokenizer.encoder) and compiled(tokenizer.decoder) and compiled(model.discriminator)
    assert not compiled(tokenizer) and not compiled(tokenizer.quantizer)
    assert dict(aot_eager["graph_break"]) == {}
    assert aot_eager["stats"]["unique_graphs"] >= 3
    assert not [name for name in model.state_dict() if "_orig_mod" in name]  # in place: checkpoints keep their keys


def _fsdp2_prior_eager_and_compiled(rank: int, world_size: int, tokenizer_dir: str, root: str) -> dict:
    from lightning_modules.fsdp import AtomicModelParallelStrategy

    torch.set_num_threads(1)
    as_launched_rank(rank, world_size)
    torch.compile = functools.partial(torch.compile, backend="aot_eager")  # this process's only
    losses = {}
    for compile in (False, True):
        prior, record = tiny_prior(tokenizer_dir, compile=compile), RecordLoss()
        run = trainer(Path(root) / str(compile), max_steps=2, devices=2, strategy=AtomicModelParallelStrategy(),
                      callbacks=[record])
        run.fit(prior, DataLoader(Tokens(prior), batch_size=2))
        losses[compile] = record.losses
    compiled_blocks = all(compiled(block) for block in prior.transformer.blocks)
    return {"losses": losses, "graph_breaks": dict(torch._dynamo.utils.counters["graph_break"]), "compiled": compiled_blocks}


@pytest.mark.slow
def test_the_prior_sharded_by_fsdp2_compiles_each_block_after_sharding_and_trains_as_eager(tmp_path, tokenizer_dir):  # noqa: F811
    for rank in run_distributed(_fsdp2_prior_eager_and_compiled, str(tokenizer_dir), str(tmp_path)):
        assert rank["compiled"] and rank["graph_breaks"] == {}
        assert rank["losses"][True] == pytest.approx(rank["losses"][False], rel=1e-5)
