"""Pixel priors on the shapes set: bits/dim of the validation images and CPU sampling speed,
against general-purpose lossless compressors of the same images measured in the same run.

    python bench/pixel_shapes.py --priors runs/pixel_pixelcnn/checkpoints/last.ckpt \
        runs/pixel_image_transformer/checkpoints/last.ckpt --val quickstart/data/val/00000.tar

Per prior: val bits/dim from one teacher-forced pass (`subpixel_log_probs`) over every image of
the shard with its own caption, and images/s of `generate` (one batch of --sample-images prompts,
the prior's own sampling settings). References on the same images: a uniform model (8), the PNG
file (Pillow, optimize=True: headers and all), and the raw RGB bytes through zlib level 9 and
LZMA2 preset 9e (no headers).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import tarfile
import time
import zlib

import numpy as np
import torch
from PIL import Image

from lightning_modules.prior import load_prior


def read_shard(path: str) -> tuple[list[np.ndarray], list[bytes], list[str]]:
    """(H, W, 3) uint8 images, their PNG bytes and captions, in key order."""
    with tarfile.open(path) as tar:
        files = {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}
    keys = sorted(name.rsplit(".", 1)[0] for name in files if name.endswith(".png"))
    images = [np.asarray(Image.open(io.BytesIO(files[f"{key}.png"])).convert("RGB")) for key in keys]
    return images, [files[f"{key}.png"] for key in keys], [files[f"{key}.txt"].decode().strip() for key in keys]


def compressor_bits_per_dim(images: list[np.ndarray]) -> dict[str, float]:
    dims = images[0].size
    sizes = {"png": [], "zlib9_raw": [], "lzma9e_raw": []}
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG", optimize=True)
        sizes["png"].append(len(buffer.getvalue()))
        raw = image.tobytes()
        sizes["zlib9_raw"].append(len(zlib.compress(raw, 9)))
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        sizes["lzma9e_raw"].append(len(lzma.compress(raw, format=lzma.FORMAT_RAW, filters=filters)))
    return {name: round(8 * float(np.mean(bytes_)) / dims, 4) for name, bytes_ in sizes.items()}


@torch.no_grad()
def prior_bits_per_dim(prior, images: list[np.ndarray], captions: list[str], batch_size: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        subpixels = torch.from_numpy(np.stack(images[start : start + batch_size]))  # (B, H, W, 3) uint8
        log_probs = prior.subpixel_log_probs(subpixels, prior.captions(captions[start : start + batch_size]).ids)
        nll -= log_probs.gather(-1, subpixels.long()[..., None]).double().sum().item()
        count += subpixels.numel()
    return nll / count / np.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--priors", nargs="+", required=True)
    parser.add_argument("--val", required=True, help="a shard of the shapes set (PNG images)")
    parser.add_argument("--batch-size", type=int, default=32, help="images scored at once")
    parser.add_argument("--sample-images", type=int, default=4, help="images drawn in the one timed batch")
    args = parser.parse_args()
    torch.set_num_threads(1)

    images, _, captions = read_shard(args.val)
    report = {"images": len(images), "threads": torch.get_num_threads(), "uniform": 8.0, **compressor_bits_per_dim(images)}
    for path in args.priors:
        prior = load_prior(path)
        started = time.perf_counter()
        bits = prior_bits_per_dim(prior, images, captions, args.batch_size)
        scored = time.perf_counter() - started
        prompts = captions[: args.sample_images]
        started = time.perf_counter()
        prior.generate(prompts, seed=0)
        sampled = time.perf_counter() - started
        report[path] = {
            "class": type(prior).__name__, "parameters": sum(p.numel() for p in prior.transformer.parameters()),
            "val_bits_per_dim": round(bits, 4), "scoring_images_per_s": round(len(images) / scored, 2),
            "sampling_images_per_s": round(len(prompts) / sampled, 4), "sampling_seconds": round(sampled, 1),
        }
        print(json.dumps({path: report[path]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
