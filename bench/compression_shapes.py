"""Lossless image coding on the shapes set: PNG, WebP and JPEG XL against a model's likelihood.

On the renders of the first `--images` scenes of `tessera shards synthetic` (datamodules/shapes.py,
`--seed`: 0 as the quickstart's training split, 1 as its validation split), in bits per subpixel
(8 x bytes / (H x W x 3)), each file decoded again and checked equal:
  - PNG (Pillow, optimize=True), lossless WebP (method 6) and lossless JPEG XL (pillow-jxl-plugin,
    effort 9: `pip install -e '.[bench]'`; without it the row says so), and the raw RGB bytes
    through zlib (level 9) and LZMA2 (preset 9e), general-purpose compressors without headers;
  - with --prior, a model `load_prior` reads: its -log2 p of what it codes given each image's
    caption, and the size of the `tessera compress` file, header apart; for a pixel model that is
    the image itself, for a prior over tokenizer ids its tokenizer's (lossy) ids, whose pixels are
    only the tokenizer's reconstruction (its PSNR is given); and its sampling speed, one batch of
    `--sample-images` of the captions with its own sampling settings;
  - the range coder's own overhead over -log2 p (tessera/coding.py, 24-bit probabilities) on
    categoricals over K = 256 and 16,384 symbols of several entropies, beside what a 16-bit
    quantization giving every symbol at least one count (a 16-bit CDF's floor) would cost.

    python bench/compression_shapes.py --images 100
    python bench/compression_shapes.py --images 32 --image-size 32 --seed 1 --prior runs/pixel_image_transformer/checkpoints/last.ckpt
    python bench/compression_shapes.py --images 4 --image-size 32 --coder-symbols 64   # a quick check
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import lzma
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules.images import resize_and_crop
from datamodules.shapes import SyntheticShapes
from lightning_modules.prior import load_prior
from tessera.coding import encode
from tessera.commands.compress import compress, decompress, image_symbols
from tessera.pixels import psnr, to_unit_range

JXL = "JPEG XL lossless (effort 9)"
JXL_INSTALL = "pip install -e '.[bench]' (pillow-jxl-plugin)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100, help="scenes of the shapes set, from the first")
    parser.add_argument("--image-size", type=int, default=64, help="render size")
    parser.add_argument("--seed", type=int, default=0, help="scenes of SyntheticShapes(images, image_size, seed): 0 the "
                        "quickstart's training split, 1 its validation split")
    parser.add_argument("--prior", type=Path, default=None, help="a prior or pixel model checkpoint or export to code with")
    parser.add_argument("--tokenizer", type=Path, default=None, help="the prior's stage-1 tokenizer, if not where it says")
    parser.add_argument("--batch-size", type=int, default=16, help="images coded together")
    parser.add_argument("--sample-images", type=int, default=4, help="images the prior draws in its one timed batch")
    parser.add_argument("--coder-symbols", type=int, default=16384, help="symbols coded per categorical setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


LZMA_9E = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
GENERAL_PURPOSE: dict[str, Callable[[bytes], bytes]] = {
    "zlib level 9, raw RGB": lambda raw: zlib.compress(raw, 9),
    "LZMA2 preset 9e, raw RGB": lambda raw: lzma.compress(raw, format=lzma.FORMAT_RAW, filters=LZMA_9E),
}


def jxl_installed() -> bool:
    try:
        import pillow_jxl  # noqa: F401 (registers the JXL format with Pillow)
    except ImportError:
        return False
    return True


def codec_sizes(images: list[Image.Image]) -> dict[str, int]:
    """Total bytes of every image in each lossless codec, every one decoded and checked equal."""
    codecs: dict[str, Callable[[Image.Image, io.BytesIO], None]] = {
        "PNG (optimize)": lambda image, out: image.save(out, "PNG", optimize=True),
        "WebP lossless (method 6)": lambda image, out: image.save(out, "WEBP", lossless=True, quality=100, method=6),
    }
    if jxl_installed():
        codecs[JXL] = lambda image, out: image.save(out, "JXL", lossless=True, effort=9)
    sizes = {}
    for name, squeeze in GENERAL_PURPOSE.items():
        sizes[name] = sum(len(squeeze(np.asarray(image).tobytes())) for image in images)
    for name, save in codecs.items():
        total = 0
        for image in images:
            buffer = io.BytesIO()
            save(image, buffer)
            if not np.array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), np.asarray(image)):
                raise RuntimeError(f"{name} did not give the image back: not lossless")
            total += buffer.tell()
        sizes[name] = total
    return sizes


def model_rows(args: argparse.Namespace, images: list[Image.Image], captions: list[str]) -> list[dict]:
    """-log2 p and the real coded size of `args.prior` on the images; their PSNR for tokenizer ids."""
    prior = load_prior(args.prior, tokenizer=args.tokenizer)
    symbols = torch.stack([image_symbols(prior, image) for image in images])
    started = time.perf_counter()
    compressed = compress(prior, symbols, captions, batch_size=args.batch_size)
    coded_seconds = time.perf_counter() - started
    started = time.perf_counter()
    if not torch.equal(decompress(prior, compressed.data).symbols, symbols):
        raise RuntimeError("decompress did not give the symbols back")
    decoded_seconds = time.perf_counter() - started
    name = f"{type(prior).__name__} over {prior.coded_kind} ({args.prior.name})"
    row = {"coded_s_per_image": coded_seconds / len(images), "decoded_s_per_image": decoded_seconds / len(images)}
    if prior.coded_kind == "tokens":
        tokenizer = prior.image_tokenizer.module
        with torch.no_grad():
            decoded = tokenizer.decode(symbols)  # (B, 3, S, S) in [-1, 1]
        originals = torch.stack([torch.tensor(resize_and_crop(image, tokenizer.config.image_size)) for image in images])
        originals = originals.permute(0, 3, 1, 2)  # (B, 3, S, S): what the tokenizer encoded
        row["psnr_db"] = float(psnr(to_unit_range(originals), decoded).mean())
        name += ": lossy pixels, lossless ids"
    prompts = (captions * args.sample_images)[: args.sample_images]
    started = time.perf_counter()
    prior.generate(prompts, seed=0)
    row["sampling_images_per_s"] = len(prompts) / (time.perf_counter() - started)
    coded_bytes = len(compressed.data) - compressed.header_bytes
    return [
        {"coder": f"{name}: -log2 p", "bytes": float(compressed.information_bits.sum()) / 8, **row},
        {"coder": f"{name}: coded, header apart", "bytes": coded_bytes, **row},
        {"coder": f"{name}: coded file", "bytes": len(compressed.data), **row},
    ]


def coder_overhead(symbols: int, batch: int = 64) -> list[dict]:
    """The range coder's bits against -log2 p over categoricals of logits N(0, scale^2), `symbols`
    of each (rows of `batch`, one stream), and the cost of a 16-bit quantization with a one-count
    floor per symbol (computed, not coded). Each step's logits are drawn from a seed of their own,
    so the coder's pass and the drawing pass see the same ones without holding them all."""
    rows = []
    for alphabet in (256, 16384):
        for scale in (1.0, 4.0, 8.0, 16.0):
            steps = max(1, symbols // batch)

            def logits_at(step: int) -> torch.Tensor:
                return torch.randn(batch, alphabet, generator=torch.Generator().manual_seed(step)) * scale

            drawn, cost_16 = torch.empty(batch, steps, dtype=torch.long), 0.0
            for step in range(steps):
                probs = logits_at(step).softmax(-1).double()
                drawn[:, step] = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(-step - 1)).squeeze(-1)
                counts = torch.floor(probs * (2**16 - alphabet)) + 1  # every symbol >= 1 of 2**16
                cost_16 -= float(torch.log2(counts.gather(-1, drawn[:, step, None]) / counts.sum(-1, keepdim=True)).sum())
            coded = encode((logits_at(step) for step in range(steps)), drawn, alphabet)
            information = float(coded.information_bits.sum())
            rows.append({
                "alphabet": alphabet, "logit_scale": scale, "symbols": drawn.numel(),
                "information_bits_per_symbol": information / drawn.numel(),
                "coded_bits_per_symbol": coded.bits / drawn.numel(),
                "excess_bits": coded.bits - information,
                "overhead": coded.bits / information - 1,
                "cdf16_floor_bits_per_symbol": cost_16 / drawn.numel(),
                "cdf16_floor_overhead": cost_16 / information - 1,
            })
    return rows


def run(args: argparse.Namespace) -> Iterator[dict]:
    """The setup, then a record per coder of the images (bytes, bits per subpixel), then one per
    categorical setting of the range coder's overhead."""
    torch.set_num_threads(args.threads)
    shapes = SyntheticShapes(args.images, image_size=args.image_size, seed=args.seed)
    samples = [shapes[i] for i in range(args.images)]
    images, captions = [s.image.convert("RGB") for s in samples], [s.caption for s in samples]
    subpixels = args.images * args.image_size**2 * 3
    yield {"bench": "compression_shapes", "images": args.images, "image_size": args.image_size, "seed": args.seed,
           "subpixels": subpixels, "torch": torch.__version__, "threads": args.threads,
           "constriction": importlib.metadata.version("constriction"),
           "missing": None if jxl_installed() else f"{JXL}: not installed, {JXL_INSTALL}"}

    rows = [{"coder": "raw uint8", "bytes": subpixels}]
    rows += [{"coder": name, "bytes": size} for name, size in codec_sizes(images).items()]
    if args.prior is not None:
        rows += model_rows(args, images, captions)
    for row in rows:
        yield {**row, "bits_per_subpixel": 8 * row["bytes"] / subpixels}
    yield from coder_overhead(args.coder_symbols)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    header, *records = run(args)
    images = [record for record in records if "coder" in record]
    overhead = [record for record in records if "alphabet" in record]
    print(f"## {args.images} shapes renders of {args.image_size} px (seed {args.seed}): {header['subpixels']:,} subpixels\n")
    print("| coder | bytes | bits per subpixel |\n|---|---:|---:|")
    if header["missing"]:
        print(f"| {header['missing']} | | |")
    for row in images:
        extra = f" (PSNR {row['psnr_db']:.2f} dB)" if "psnr_db" in row else ""
        print(f"| {row['coder']}{extra} | {row['bytes']:,.0f} | {row['bits_per_subpixel']:.4f} |")
    sampled = next((row for row in images if "sampling_images_per_s" in row), None)
    if sampled is not None:
        print(f"\nsampling: {sampled['sampling_images_per_s']:.3f} images/s ({args.sample_images} at once)")

    print("\n## range coder (24-bit) against -log2 p\n")
    print("| K | logit scale | symbols | -log2 p bits/symbol | coded bits/symbol | coded - (-log2 p), bits | overhead | "
          "16-bit floor bits/symbol | its overhead |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in overhead:
        print(f"| {row['alphabet']:,} | {row['logit_scale']:g} | {row['symbols']:,} | {row['information_bits_per_symbol']:.4f} | "
              f"{row['coded_bits_per_symbol']:.4f} | {row['excess_bits']:.1f} | {100 * row['overhead']:.3f}% | "
              f"{row['cdf16_floor_bits_per_symbol']:.4f} | {100 * row['cdf16_floor_overhead']:.2f}% |")
    if args.json is not None:
        args.json.write_text(json.dumps({"images": images, "coder": overhead}, indent=2) + "\n")
    print(f"\ntorch {torch.__version__}, constriction {header['constriction']}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
