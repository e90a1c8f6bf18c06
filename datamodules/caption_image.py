"""CaptionImageDataModule: caption-image WebDataset shards for both stages, resumable mid-epoch.

Resume is exact: the training loader is one of Lightning's stateful loaders, so a checkpoint
holds where every rank and loader worker stood in the epoch and each rank's global RNG states
(see `EpochLoader`), and a run resumed from it trains on the same batches, in the same order,
drawing the same random numbers, as the run that was stopped.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from tessera.pixels import to_unit_range
from tessera.rng import rng_states, set_rng_states
from datamodules.images import MAX_PIXELS
from datamodules.stream import CaptionImageStream, CaptionTokenStream, check_shards, expand_urls, shard_sizes
from datamodules.text import CLIP_BPE, CaptionTokenizer

log = logging.getLogger(__name__)


class CaptionImageDataModule(L.LightningDataModule):
    """Batches of images (B, 3, H, W) in [-1, 1], caption ids (B, L), their mask, the captions and keys,
    and "valid" (B,): False on the rows that pad out a rank's last validation batches.

    Shards are local paths, `pipe:` commands (`pipe:aws s3 cp s3://bucket/00000.tar -`) or URLs,
    with brace patterns and `::` between lists. Images travel from the loader workers as uint8
    and become float on the device, which moves a quarter of the bytes through shared memory.

    Exact resume needs the Trainer to use this datamodule's hooks (`fit(datamodule=...)`, as
    LightningCLI does): `on_after_batch_transfer` is where a batch counts as trained on.
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
        max_pixels: int | None = MAX_PIXELS,
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
            val_samples: validate on the first this many samples of the val shards; every sample
                (as many as their size records count) when None. Each is seen once, over all ranks.
            seed: seeds shard order, the shuffle buffer and random crops, with the epoch, rank and worker.
            shuffle_buffer: samples held per worker for shuffling; 0 or 1 turns it off.
            random_crop: random instead of centre crops for training.
            resampled: draw training shards with replacement (open_clip's mode for very large sets).
            jpeg_draft: decode JPEGs at the smallest DCT scale that still covers `image_size`.
            max_pixels: images whose header declares more pixels are skipped, undecoded, and counted
                as "oversized_image"; None for no cap. The default, 8192 x 8192, bounds a worker's
                decoded image at 192 MiB (see datamodules/images.py).
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
        self.train_loader: EpochLoader | None = None
        self.data_stats: Counter = Counter()  # training samples skipped by reason, and truncations, on this rank

    def setup(self, stage: str | None = None) -> None:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        hp = self.hparams
        common = dict(
            captions=self.captions, image_size=hp.image_size, seed=hp.seed,
            jpeg_draft=hp.jpeg_draft, max_pixels=hp.max_pixels, rank=rank, world_size=world_size,
        )
        stream = CaptionTokenStream if hp.image_tokens else CaptionImageStream
        if stage in (None, "fit") and self.train_stream is None:
            sizes = shard_sizes(self.train_urls)
            self.train_stream = stream(
                self.train_urls, batch_size=hp.batch_size,
                samples_per_epoch=epoch_samples(self.train_urls, sizes, hp.train_samples, "train_samples"),
                sizes=sizes, shuffle=True, shuffle_buffer=hp.shuffle_buffer, random_crop=hp.random_crop,
                resampled=hp.resampled, **common,
            )
        if stage in (None, "fit", "validate") and self.val_urls and self.val_stream is None:
            sizes = shard_sizes(self.val_urls)
            self.val_stream = stream(
                self.val_urls, batch_size=hp.val_batch_size or hp.batch_size,
                samples_per_epoch=epoch_samples(self.val_urls, sizes, hp.val_samples, "val_samples"),
                sizes=sizes, validation=True, **common,
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            self.setup("fit")
        first_epoch = self.trainer.current_epoch if self.trainer else 0
        self.train_loader = EpochLoader(self.train_stream, first_epoch, **self._loader_options())
        return self.train_loader

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
            if self.train_loader is not None:
                # here, not when the loader yields it: Lightning fetches one batch ahead
                self.train_loader.trained_on(batch["position"])
        if "images" in batch:
            batch["images"] = to_unit_range(batch["images"])
        return batch


def epoch_samples(urls: list[str], sizes: list[int | None], configured: int | None, option: str) -> int:
    """Samples per epoch: the configured count, else the sum of the shards' recorded `sizes`."""
    check_shards(urls)
    if configured is not None:
        return configured
    unknown = [url for url, size in zip(urls, sizes) if size is None]
    if unknown:
        raise ValueError(
            f"cannot tell how many samples {len(unknown)} shard(s) hold (first: {unknown[0]}): "
            f"no sizes.json or img2dataset *_stats.json beside them; set `{option}`"
        )
    return sum(sizes)


class EpochLoader(DataLoader):
    """A DataLoader that tells its stream the epoch at each new iteration, and can pick up an
    epoch where a checkpoint left it.

    Lightning calls `set_epoch` on samplers only, and an IterableDataset has none, so the epoch
    that seeds shard order and shuffling is advanced here instead, starting from the trainer's
    epoch when the loader is made (which after a resume is the resumed epoch).

    Lightning saves `state_dict()` in every checkpoint and, on resume, gives it to
    `load_state_dict` before the first iteration. Each rank's part is, for the epoch under way:
    the batches trained on, per loader worker the batches trained on and the stream position
    ("items") after the last of them, and the global RNG states. Only rank 0 writes the checkpoint,
    so the parts are gathered from all ranks; each rank takes back its own:

        {"world_size": int, "workers": int (1 without worker processes),
         "ranks": [{"epoch": int, "batches": int, "workers": [{"batches": int, "items": int}] | None,
                    "rng": tessera.rng.rng_states()}, ...]}

    Resumed with another world size or worker count, the positions mean nothing to the new
    layout: the interrupted epoch's remaining batches come afresh from the start of its streams
    (some samples again, others not at all), with a warning, and the RNG states are restored only
    when the world size is the same. The RNG states are restored just before the first batch
    after a resume is trained on: random numbers drawn between the checkpoint and the next
    training batch of the uninterrupted run (by validation, say) are not replayed.
    """

    def __init__(self, stream: CaptionImageStream, first_epoch: int, **options):
        # a generator of its own for the workers' base seed (the stream needs none): making an
        # iterator then leaves the global torch RNG, which a resume restores, untouched
        generator = torch.Generator().manual_seed(stream.seed)
        super().__init__(stream, batch_size=None, generator=generator, **options)
        self.next_epoch = first_epoch
        self.logical_workers = max(1, self.num_workers)  # no worker processes read as one worker
        stream.loader_workers = self.logical_workers  # a validation stream's length depends on it
        self._start_epoch(first_epoch, resume=None)
        self._resume: dict | None = None
        self._rng_to_restore: dict | None = None

    def __iter__(self):
        resume = self._resume if self._resume is not None and self._resume["epoch"] == self.next_epoch else None
        self._resume = None
        self.dataset.set_epoch(self.next_epoch)
        self.dataset.resume = resume
        self._start_epoch(self.next_epoch, resume)
        self.next_epoch += 1
        return super().__iter__()

    def _start_epoch(self, epoch: int, resume: dict | None) -> None:
        self.epoch = epoch
        self.batches = resume["batches"] if resume else 0
        fresh = [{"batches": 0, "items": 0} for _ in range(self.logical_workers)]
        self.positions = copy.deepcopy(resume["workers"]) if resume else fresh

    def trained_on(self, position: dict) -> None:
        """Count a batch the model is about to train on, by the "position" it carries."""
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self.batches += 1
        if self.positions is not None:
            worker = self.positions[position["worker"]]
            worker["batches"] += 1
            worker["items"] = position["items"]

    def state_dict(self) -> dict:
        """Where training stands in the epoch, on every rank. A collective when a process group is
        up: Lightning calls it on every rank as it saves a checkpoint."""
        mine = {"epoch": self.epoch, "batches": self.batches, "workers": copy.deepcopy(self.positions),
                "rng": rng_states()}
        ranks = [mine]
        if dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        return {"world_size": len(ranks), "workers": self.logical_workers, "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        rank, world_size = self.dataset.rank, self.dataset.world_size
        same_layout = state["world_size"] == world_size and state["workers"] == self.logical_workers
        mine = state["ranks"][rank if state["world_size"] == world_size else 0]
        if not same_layout:
            log.warning(
                "resuming epoch %d with %d rank(s) x %d loader worker(s), but the checkpoint was saved with "
                "%d x %d: the epoch's remaining %d batches start afresh from the start of its streams, so "
                "some of its samples come again and others not at all",
                mine["epoch"], world_size, self.logical_workers, state["world_size"], state["workers"],
                max(0, len(self.dataset) - mine["batches"]),
            )
        self._resume = {"epoch": mine["epoch"], "batches": mine["batches"],
                        "workers": mine["workers"] if same_layout else None}
        self._rng_to_restore = mine["rng"] if state["world_size"] == world_size else None
