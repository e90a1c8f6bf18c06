"""Folders of images for FID: files decoded as the training reader decodes them (datamodules.images),
resized and centre-cropped, in batches from worker processes, into a `FrechetDistance`'s statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.images import decode_image, resize_and_crop
from tessera.fid import FeatureStats, FrechetDistance

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_files(directory: str | Path) -> list[Path]:
    """The image files directly in `directory`, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory {directory} does not exist")
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_eval_image(path: str | Path, image_size: int) -> np.ndarray:
    """(S, S, 3) uint8: fully decoded RGB, shorter side resized to S with PIL bicubic, centre crop."""
    try:
        image = decode_image(Path(path).read_bytes())
    except OSError as error:
        raise OSError(f"cannot read image {path}: {error}") from error
    return resize_and_crop(image, image_size)


class ImageFiles(Dataset):
    """(3, S, S) uint8 tensors of a list of files, as `load_eval_image` prepares them."""

    def __init__(self, files: list[Path], image_size: int):
        self.files, self.image_size = list(files), image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        pixels = load_eval_image(self.files[index], self.image_size).copy()  # PIL hands over a read-only array
        return index, torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def image_batches(files: list[Path], image_size: int, batch_size: int = 64, workers: int = 4):
    """Yields (indices into `files`, (B, 3, S, S) uint8) in order, decoded by `workers` processes."""
    loader = DataLoader(ImageFiles(files, image_size), batch_size=batch_size, num_workers=workers, shuffle=False)
    yield from loader


def add_images(metric: FrechetDistance, files: list[Path], real: bool, batch_size: int = 64, workers: int = 4,
               rank: int = 0, world_size: int = 1) -> int:
    """Adds this rank's share of `files` (every world_size-th from `rank`); returns how many it read."""
    device = metric.device
    mine = files[rank::world_size]
    image_size = metric.preprocessing["image_size"]
    for _, images in image_batches(mine, image_size, batch_size, workers):
        metric.update(images.to(device), real=real)
    return len(mine)


def folder_statistics(metric: FrechetDistance, directory: str | Path, batch_size: int = 64, workers: int = 4,
                      rank: int = 0, world_size: int = 1) -> FeatureStats:
    """Feature statistics of every image in `directory`; with several ranks each reads its share (a collective)."""
    files = image_files(directory)
    if len(files) < 2:
        raise ValueError(f"{directory} holds {len(files)} images; FID statistics need at least 2")
    metric.reset()
    add_images(metric, files, True, batch_size, workers, rank, world_size)
    stats = metric.statistics(real=True)
    stats.source = str(Path(directory).resolve())
    metric.reset()
    return stats


def reference_statistics(metric: FrechetDistance, directory: str | Path, cache: str | Path | None,
                         batch_size: int = 64, workers: int = 4) -> FeatureStats:
    """The cached statistics of `directory` when `cache` holds them, refused unless made with this
    metric's extractor, weights and preprocessing; else computed (in this process) and written to `cache`."""
    if cache is not None and Path(cache).is_file():
        stats = metric.load_statistics(cache)
        count = len(image_files(directory)) if directory is not None and Path(directory).is_dir() else stats.count
        if count != stats.count:
            raise ValueError(f"reference statistics {cache} are of {stats.count} images but {directory} holds {count}: "
                             "delete the cache file or pass another --reference-stats")
        return stats
    stats = folder_statistics(metric, directory, batch_size, workers)
    if cache is not None:
        stats.save(cache)
    return stats
