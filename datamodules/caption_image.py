"""CaptionImageDataModule: caption-image WebDataset shards for both stages."""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
import torch
from torch.utils.data import DataLoader

from tessera.pixels import to_unit_range
from datamodules.stream import CaptionImageStream, CaptionTokenStream, check_shards, expand_urls, shard_sizes
from datamodules.text import CLIP_BPE, CaptionTokenizer

log = logging.getLogger(__name__)


class CaptionImageDataModule(L.LightningDataModule):
    """Batches of images (B, 3, H, W) in [-1, 1], caption ids (B, L), their mask, the captions and keys.

    Shards are local paths, `pipe:` commands (`pipe:aws s3 cp s3://bucket/00000.tar -`) or URLs,
    with brace patterns and `::` between lists. Images travel from the loader workers as uint8
    and become float on the device, which moves a quarter of the bytes through shared memory.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        image_size: int = 256,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        text_tokenizer: str = CLIP_BPE,
        text_length: int = 64,
        train_samples: int | None = None,
        val_samples: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        random_crop: bool = False,
        resampled: bool = False,
        jpeg_draft: bool = True,
        pin_memory: bool = True,
        image_tokens: bool = False,
    ):
        """
        Args:
            train_shards: training shards, e.g. "/data/cc3m/{00000..00331}.tar".
            val_shards: validation shards; no validation loader when None.
            image_size: side of the square crops.
            batch_size: samples per batch on each rank.
            val_batch_size: samples per validation batch; `batch_size` when None.
            num_workers: loader worker processes per rank.
            text_tokenizer: "clip-bpe" (CLIP's BPE, offline) or a `transformers` tokenizer name or directory.
            text_length: caption tokens per sample, with start and end tokens; longer captions are cut.
            train_samples: samples per training epoch; read from sizes.json or img2dataset's stats when None.
            val_samples: samples per validation run; likewise.
            seed: seeds shard order, the shuffle buffer and random crops, with the epoch, rank and worker.
            shuffle_buffer: samples held per worker for shuffling; 0 or 1 turns it off.
            random_crop: random instead of centre crops for training.
            resampled: draw training shards with replacement (open_clip's mode for very large sets).
            jpeg_draft: decode JPEGs at the smallest DCT scale that still covers `image_size`.
            pin_memory: page-locked batches for faster copies to the GPU.
            image_tokens: the shards are token shards from `tessera tokenize`: batches carry
                "image_ids" (KEY.tokens.npy) instead of "images", and stage 2 runs no encoder.
        """
        super().__init__()
        self.save_hyperparameters()
        self.train_urls = expand_urls(train_shards)
        self.val_urls = expand_urls(val_shards) if val_shards else []
        self.captions = CaptionTokenizer(text_tokenizer, text_length)
        self.train_stream: CaptionImageStream | None = None
        self.val_stream: CaptionImageStream | None = None
        self.data_stats: Counter = Counter()  # training samples skipped by reason, and truncations, on this rank

    def setup(self, stage: str | None = None) -> None:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        hp = self.hparams
        common = dict(
            captions=self.captions, image_size=hp.image_size, seed=hp.seed,
            jpeg_draft=hp.jpeg_draft, rank=rank, world_size=world_size,
        )
        stream = CaptionTokenStream if hp.image_tokens else CaptionImageStream
        if stage in (None, "fit") and self.train_stream is None:
            self.train_stream = stream(
                self.train_urls, batch_size=hp.batch_size,
                samples_per_epoch=epoch_samples(self.train_urls, hp.train_samples, "train_samples"),
                shuffle=True, shuffle_buffer=hp.shuffle_buffer, random_crop=hp.random_crop,
                resampled=hp.resampled, **common,
            )
        if stage in (None, "fit", "validate") and self.val_urls and self.val_stream is None:
            self.val_stream = stream(
                self.val_urls, batch_size=hp.val_batch_size or hp.batch_size,
                samples_per_epoch=epoch_samples(self.val_urls, hp.val_samples, "val_samples"),
                shuffle=False, **common,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            self.setup("fit")
        first_epoch = self.trainer.current_epoch if self.trainer else 0
        return EpochLoader(self.train_stream, first_epoch, **self._loader_options())

    def val_dataloader(self) -> DataLoader | list:
        if self.val_stream is None:
            self.setup("validate")
        if self.val_stream is None:
            return []
        return EpochLoader(self.val_stream, 0, **self._loader_options())

    def _loader_options(self) -> dict:
        workers = self.hparams.num_workers
        return dict(
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            prefetch_factor=4 if workers > 0 else None,
        )

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is None or self.trainer.training:
            self.data_stats.update(batch["stats"])
        if "images" in batch:
            batch["images"] = to_unit_range(batch["images"])
        return batch


def epoch_samples(urls: list[str], configured: int | None, option: str) -> int:
    """Samples per epoch: the configured count, else the sum of the shards' recorded sizes."""
    check_shards(urls)
    if configured is not None:
        return configured
    sizes = shard_sizes(urls)
    unknown = [url for url, size in zip(urls, sizes) if size is None]
    if unknown:
        raise ValueError(
            f"cannot tell how many samples {len(unknown)} shard(s) hold (first: {unknown[0]}): "
            f"no sizes.json or img2dataset *_stats.json beside them; set `{option}`"
        )
    return sum(sizes)


class EpochLoader(DataLoader):
    """A DataLoader that tells its stream the epoch at each new iteration.

    Lightning calls `set_epoch` on samplers only, and an IterableDataset has none, so the epoch
    that seeds shard order and shuffling is advanced here instead, starting from the trainer's
    epoch when the loader is made (which after a resume is the resumed epoch).
    """

    def __init__(self, stream: CaptionImageStream, first_epoch: int, **options):
        super().__init__(stream, batch_size=None, **options)
        self.next_epoch = first_epoch

    def __iter__(self):
        self.dataset.set_epoch(self.next_epoch)
        self.next_epoch += 1
        return super().__iter__()
