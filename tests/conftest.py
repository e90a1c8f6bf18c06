"""Shared fixtures: small shard sets written by our own writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.shapes import SyntheticShapes
from datamodules.shard_writer import write_shards


# The tests' networks are tiny: one thread is faster than two, and on a busy 2-core machine
# every multi-threaded op would wait for a descheduled thread (8 ms a kernel instead of 0.1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """120 synthetic 32px samples in uneven shards of 50, 50 and 20."""
    out = tmp_path_factory.mktemp("shapes")
    write_shards(SyntheticShapes(120, image_size=32, seed=0), out, samples_per_shard=50, image_format="png")
    return out


@pytest.fixture(scope="session")
def shapes_urls(shapes_dir) -> list[str]:
    return [str(p) for p in sorted(shapes_dir.glob("*.tar"))]


@pytest.fixture(scope="session")
def caption_tokenizer():
    from datamodules.text import CaptionTokenizer

    return CaptionTokenizer(text_length=24)


TINY_CLIP = "tessera-test-tiny-clip"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[str, Path]:
    """A small random-init open_clip architecture registered as TINY_CLIP, and a weights file of it."""
    import json

    import open_clip

    directory = tmp_path_factory.mktemp("clip")
    config = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (directory / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    weights = directory / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), weights)
    return TINY_CLIP, weights
