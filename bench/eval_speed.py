"""Evaluation speed: Inception feature images/s, CLIP images/s, PNG read-back images/s, and the
projected wall time of `tessera evaluate coco` (FID-30K) for the "300m" prior.

Goal: FID-30K of a 300M prior in under 10 minutes on one H100; reference figures:
Inception feature extraction at ~4.5k images/s on an H100 with TF32, ~2.2k in strict fp32.

- inception: 256 px uint8 batches already on the device through the FID Inception (torchmetrics'
  torch-fidelity port, resize to 299 like TF1) when --inception-weights is given (needs
  torch-fidelity); else torchvision's Inception v3 architecture with random weights fed the same
  way, a same-FLOPs stand-in (`inception` in the output says which). Timed in strict fp32 (TF32
  off, as reported FIDs are) and with TF32 on.
- clip: `ClipScorer` (open_clip, --clip-model, random weights unless --clip-weights), images and
  captions of 16 tokens, on the device.
- read_back: PNGs of 256 px decoded, resized and cropped by --workers loader processes, as rank 0
  reads the samples back (datamodules.image_folder.image_batches).
- projection: sampling (--sampling-images-per-s, e.g. from bench/sampling_speed.py at the 300m
  preset, per GPU, times --gpus) + read-back, Inception and CLIP of 30K images on rank 0. The
  reference statistics of val2014 (40,504 images) are computed once and cached; their one-off
  cost is given apart.

    python bench/eval_speed.py --sampling-images-per-s 60             # one GPU
    python bench/eval_speed.py --tiny                                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from tessera.clip_rerank import ClipScorer
from datamodules.image_folder import image_batches
from tessera.fid import FrechetDistance
from tessera.precision import strict_fp32
from tessera.pixels import to_unit_range

VAL2014_IMAGES = 40_504


class InceptionStandIn(nn.Module):
    """torchvision's Inception v3 (random weights) fed uint8 images as the FID Inception is: same FLOPs."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.net.fc = nn.Identity()  # pool3, 2048 features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
        return self.net((x - 128) / 128)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def images_per_s(fn, batch: torch.Tensor, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(batch)
    synchronize(batch.device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn(batch)
    synchronize(batch.device)
    return len(batch) * repeats / (time.perf_counter() - started)


def read_back_per_s(count: int, workers: int, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
        files = []
        for index in range(count):
            path = Path(directory) / f"{index:06d}.png"
            Image.fromarray(np.random.default_rng(index).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
            files.append(path)
        started = time.perf_counter()
        for _ in image_batches(files, 256, batch_size, workers):
            pass
        return count / (time.perf_counter() - started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: batch 2, one timed batch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--inception-weights", default=None, help="the FID Inception weights (needs torch-fidelity)")
    parser.add_argument("--clip-model", default="ViT-B-32-quickgelu")
    parser.add_argument("--clip-weights", default=None)
    parser.add_argument("--workers", type=int, default=8, help="PNG decoding processes")
    parser.add_argument("--read-back-images", type=int, default=2000)
    parser.add_argument("--sampling-images-per-s", type=float, default=None, help="the prior's sampling speed per GPU")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=30_000)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch_size, args.repeats, args.read_back_images, args.workers = 2, 1, 8, 0
    return args


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warmup = 1 if args.tiny else 3

    if args.inception_weights:
        inception, which = FrechetDistance(inception_weights=args.inception_weights).inception, "fid-inception (torch-fidelity)"
    else:
        inception, which = InceptionStandIn().eval(), "torchvision inception_v3, random weights (same FLOPs)"
    inception = inception.to(device)
    batch = torch.randint(0, 256, (args.batch_size, 3, 256, 256), dtype=torch.uint8, device=device)
    with strict_fp32():
        inception_fp32 = images_per_s(inception, batch, warmup, args.repeats)
    tf32 = {"allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    inception_tf32 = images_per_s(inception, batch, warmup, args.repeats)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32["allow_tf32"], tf32["cudnn"]
    del inception

    scorer = ClipScorer(args.clip_model, args.clip_weights, device)
    captions = ["a photo of a red double-decker bus on a city street"] * args.batch_size
    clip_per_s = images_per_s(lambda images: scorer(to_unit_range(images), captions), batch, warmup, args.repeats)
    read_back = read_back_per_s(args.read_back_images, args.workers, min(64, args.batch_size))

    n = args.num_samples
    measure_seconds = n / read_back + n / inception_fp32 + n / clip_per_s
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "inception": which,
        "batch_size": args.batch_size,
        "inception_images_per_s_fp32": round(inception_fp32, 1),
        "inception_images_per_s_tf32": round(inception_tf32, 1),
        "clip_model": args.clip_model,
        "clip_images_per_s": round(clip_per_s, 1),
        "png_read_back_images_per_s": round(read_back, 1),
        "read_back_workers": args.workers,
        f"measure_seconds_{n}": round(measure_seconds, 1),
        "reference_stats_seconds_once": round(VAL2014_IMAGES / read_back + VAL2014_IMAGES / inception_fp32, 1),
    }
    if args.sampling_images_per_s:
        sampling_seconds = n / (args.sampling_images_per_s * args.gpus)
        report |= {"sampling_images_per_s_per_gpu": args.sampling_images_per_s, "gpus": args.gpus,
                   f"sampling_seconds_{n}": round(sampling_seconds, 1),
                   f"projected_fid_{n}_minutes": round((sampling_seconds + measure_seconds) / 60, 2),
                   "goal_minutes_one_h100": 10}
    return report


def main() -> None:
    print(json.dumps(run(parse_args()), indent=1))


if __name__ == "__main__":
    main()
