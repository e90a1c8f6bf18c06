"""Numerics that must stay IEEE fp32 whatever the run's speed settings: codebook distances and
statistics, FID's features. A user following Lightning's advice for H100s
(`torch.set_float32_matmul_precision("high")`) turns fp32 matmuls into TF32, 10 mantissa bits:
too few for the distance between two close codes or a 2048-wide covariance."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions, restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        saved = (matmul.allow_tf32, cudnn.allow_tf32)  # the legacy flags, unless the new API was used
    except RuntimeError:
        saved = None
    if saved is not None:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
    else:
        saved_new = (matmul.fp32_precision, cudnn.conv.fp32_precision)
        matmul.fp32_precision = cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        if saved is not None:
            matmul.allow_tf32, cudnn.allow_tf32 = saved
        else:
            matmul.fp32_precision, cudnn.conv.fp32_precision = saved_new


@contextmanager
def fp32_math(device_type: str) -> Iterator[None]:
    """Autocast off and TF32 off: what runs inside computes in IEEE fp32 on fp32 inputs."""
    with torch.autocast(device_type=device_type, enabled=False), strict_fp32():
        yield
