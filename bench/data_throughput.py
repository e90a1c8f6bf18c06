"""Data-loader throughput: decoded, resized, centre-cropped 256x256 images per second.

Writes shards of photo-like ~512px JPEGs (smooth colour fields plus fine texture, so they
decode like photographs, not flat synthetic shapes), then times, for 1..N loader workers:
  - tessera: CaptionImageStream (JPEG draft decode, uint8 batches, tokenized captions);
  - tessera-no-draft: the same with full-size JPEG decoding;
  - reference: webdataset's own pipeline as its docs show it, `.decode("pil")` and torchvision's
    Resize + CenterCrop + ToTensor + Normalize, batched by the DataLoader.

    python bench/data_throughput.py --workers 1 2 --images 2048
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from datamodules.caption_image import epoch_samples
from datamodules.shard_writer import SourceSample, write_shards
from datamodules.stream import CaptionImageStream, shard_sizes
from datamodules.text import CaptionTokenizer


class PhotoLike:
    """~512px JPEG-worthy images: low-frequency colour fields and high-frequency texture."""

    def __init__(self, count: int, seed: int = 0):
        self.count, self.seed = count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> SourceSample:
        rng = np.random.default_rng([self.seed, index])
        width, height = (512, int(rng.integers(384, 769))) if index % 2 else (int(rng.integers(512, 769)), 512)
        coarse = rng.random((height // 32 + 1, width // 32 + 1, 3))
        field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC), np.float32)
        texture = rng.normal(0, 18, (height, width, 1)).astype(np.float32)
        pixels = np.clip(field + texture, 0, 255).astype(np.uint8)
        return SourceSample(caption=f"a photo-like test image number {index}", image=Image.fromarray(pixels))


def reference_loader(urls: list[str], batch_size: int, workers: int) -> DataLoader:
    transform = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(256), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
               .decode("pil").to_tuple("jpg", "txt").map_tuple(transform, lambda caption: caption))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def tessera_loader(urls, samples: int, batch_size: int, workers: int, jpeg_draft: bool) -> DataLoader:
    stream = CaptionImageStream(urls, CaptionTokenizer(text_length=64), samples_per_epoch=samples, batch_size=batch_size,
                                image_size=256, shuffle_buffer=0, jpeg_draft=jpeg_draft)
    return DataLoader(stream, batch_size=None, num_workers=workers)


def images_per_second(loader: DataLoader, warmup_batches: int = 2) -> float:
    iterator = iter(loader)
    for _ in range(warmup_batches):  # worker start-up and first shard opens are not throughput
        next(iterator)
    images, started = 0, time.perf_counter()
    for batch in iterator:
        images += len(batch["keys"] if isinstance(batch, dict) else batch[1])
    return images / (time.perf_counter() - started)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", type=Path, default=None, help="where to write the shards (a temporary directory by default)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Iterator[dict]:
    """The shards' description, then one result per (workers, pipeline) as it is measured."""
    torch.set_num_threads(1)
    data = args.data or Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    write_shards(PhotoLike(args.images), data, samples_per_shard=256, image_format="jpg", quality=90,
                 workers=os.cpu_count() or 1)
    urls = [str(p) for p in sorted(data.glob("[0-9]*.tar"))]
    samples = epoch_samples(urls, shard_sizes(urls), None, "images")
    yield {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
           "images": samples, "mean_kb": round(sum(Path(u).stat().st_size for u in urls) / samples / 1024, 1),
           "shards": len(urls), "batch_size": args.batch_size}
    for workers in args.workers:
        results = {
            "tessera": tessera_loader(urls, samples, args.batch_size, workers, jpeg_draft=True),
            "tessera-no-draft": tessera_loader(urls, samples, args.batch_size, workers, jpeg_draft=False),
            "webdataset+torchvision": reference_loader(urls, args.batch_size, workers),
        }
        for name, loader in results.items():
            rate = images_per_second(loader)
            yield {"workers": workers, "pipeline": name, "images_per_s": round(rate, 1),
                   "per_worker": round(rate / workers, 1)}


def main() -> None:
    records = run(parse_args())
    shards = next(records)
    print(f"# {shards['cpu']}, {shards['cores']} cores, torch {shards['torch']}; "
          f"{shards['images']} JPEGs (~512px shorter side, {shards['mean_kb']:.0f} KB each) in {shards['shards']} shards; "
          f"batch {shards['batch_size']}")
    print(f"{'workers':>7} {'pipeline':>18} {'images/s':>9} {'per worker':>10}")
    for r in records:
        print(f"{r['workers']:>7} {r['pipeline']:>18} {r['images_per_s']:>9.0f} {r['per_worker']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
