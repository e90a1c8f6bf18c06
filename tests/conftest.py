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
