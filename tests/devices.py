"""Tests that need CUDA: the `gpu` marker with a skip where there is no device, and a device
parameter that runs a CPU test on CUDA as well (its CUDA case is a `gpu` test)."""

from __future__ import annotations

import pytest
import torch

NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
