import lightning as L
import pytest
import torch

from callbacks import DataStatsMonitor
from datamodules.caption_image import CaptionImageDataModule
from tests.samples import encode, gradient_image, img2dataset_samples, write_wds_shard


class RecordingModule(L.LightningModule):
    """Trains a single scalar on the batch means and records what it was fed."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.keys_per_epoch: dict[int, list[str]] = {}
        self.image_ranges: list[tuple[float, float, torch.dtype]] = []

    def training_step(self, batch, batch_idx):
        images = batch["images"]
        self.image_ranges.append((images.min().item(), images.max().item(), images.dtype))
        self.keys_per_epoch.setdefault(self.current_epoch, []).extend(batch["keys"])
        return (self.weight - images.mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **options) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **options)


def test_fit_feeds_float_images_in_unit_range_and_reshuffles_each_epoch(tmp_path, shapes_dir):
    data = CaptionImageDataModule(str(shapes_dir / "{00000..00002}.tar"), image_size=32, batch_size=8,
                                  num_workers=0, text_length=24)
    model = RecordingModule()
    trainer(tmp_path, max_epochs=2).fit(model, datamodule=data)

    assert len(model.keys_per_epoch[0]) == len(model.keys_per_epoch[1]) == 120
    assert model.keys_per_epoch[0] != model.keys_per_epoch[1]
    low, high, dtype = min(r[0] for r in model.image_ranges), max(r[1] for r in model.image_ranges), model.image_ranges[0][2]
    assert dtype == torch.float32 and -1.0 <= low < -0.5 and 0.5 < high <= 1.0


def test_loader_starts_at_the_trainers_epoch_after_resume(shapes_dir):
    data = CaptionImageDataModule(str(shapes_dir / "00000.tar"), image_size=32, batch_size=10, num_workers=0, text_length=24)
    fresh = [b["keys"] for b in _iterate_epochs(data.train_dataloader(), 3)]

    class ResumedTrainer:  # the attributes a datamodule reads from a trainer resumed at epoch 2
        current_epoch, global_rank, world_size, training = 2, 0, 1, True

    resumed = CaptionImageDataModule(str(shapes_dir / "00000.tar"), image_size=32, batch_size=10, num_workers=0, text_length=24)
    resumed.trainer = ResumedTrainer()
    assert [b["keys"] for b in _iterate_epochs(resumed.train_dataloader(), 1)] == fresh[2 * 5:]


def _iterate_epochs(loader, epochs):
    return [batch for _ in range(epochs) for batch in loader]


def test_skipped_and_repeated_samples_are_logged_as_metrics(tmp_path):
    broken = encode(gradient_image(64, 64))[:300]
    samples = [{"__key__": f"bad{i}", "jpg": broken, "txt": "cut"} for i in range(3)] + img2dataset_samples(0, 12)
    write_wds_shard(tmp_path / "00000.tar", samples)
    # 16 samples an epoch from 12 good ones: 4 from a second reading, which meets the bad ones again
    data = CaptionImageDataModule(str(tmp_path / "00000.tar"), image_size=32, batch_size=4, num_workers=0,
                                  train_samples=16, text_length=6, shuffle_buffer=0)
    trainer(tmp_path, max_epochs=1, callbacks=[DataStatsMonitor(every_n_steps=1)]).fit(RecordingModule(), datamodule=data)

    assert data.data_stats["corrupt_image"] == 3
    assert trainer_metrics(data)["data/corrupt_image"] == 3  # once an epoch, not at every reading
    assert trainer_metrics(data)["train/repeated_samples"] == 4
    assert trainer_metrics(data)["data/truncated_captions"] == 16  # "photo number i of shard 0" needs > 6 tokens


def trainer_metrics(data) -> dict[str, float]:
    return {k: v.item() for k, v in data.trainer.callback_metrics.items()}


def test_validation_loader_reads_the_val_shards_in_order(shapes_dir):
    data = CaptionImageDataModule(str(shapes_dir / "00000.tar"), val_shards=str(shapes_dir / "00002.tar"),
                                  image_size=32, batch_size=8, val_batch_size=5, num_workers=0, text_length=24)
    keys = [k for batch in data.val_dataloader() for k in batch["keys"]]
    assert keys == [f"00002{i:02d}" for i in range(20)]


def test_shards_without_recorded_sizes_need_a_sample_count(tmp_path):
    write_wds_shard(tmp_path / "00000.tar", img2dataset_samples(0, 3))
    data = CaptionImageDataModule(str(tmp_path / "00000.tar"), num_workers=0)
    with pytest.raises(ValueError, match="train_samples"):
        data.setup("fit")
    data = CaptionImageDataModule(str(tmp_path / "00000.tar"), num_workers=0, train_samples=3, batch_size=3, image_size=32)
    data.setup("fit")
    assert len(data.train_dataloader()) == 1


def test_missing_shard_fails_at_setup_with_its_name(tmp_path, shapes_dir):
    data = CaptionImageDataModule(str(shapes_dir / "{00000..00003}.tar"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="00003.tar"):
        data.setup("fit")


def test_persistent_loader_workers_follow_the_epoch(shapes_dir):
    data = CaptionImageDataModule(str(shapes_dir / "{00000..00002}.tar"), image_size=32, batch_size=10,
                                  num_workers=2, text_length=24, shuffle_buffer=0)
    loader = data.train_dataloader()
    epochs = [[k for batch in loader for k in batch["keys"]] for _ in range(2)]

    assert loader.persistent_workers and len(epochs[0]) == len(epochs[1]) == 120
    assert epochs[0] != epochs[1]  # the workers saw the new epoch's shard order
    again = [k for batch in CaptionImageDataModule(**data.hparams).train_dataloader() for k in batch["keys"]]
    assert again == epochs[0]


def test_starting_an_epoch_leaves_the_global_torch_rng_alone(shapes_dir):
    # a resumed run restores the global RNG states: what the loaders draw must not depend on them, nor move them
    data = CaptionImageDataModule(str(shapes_dir / "00000.tar"), val_shards=str(shapes_dir / "00002.tar"),
                                  image_size=32, batch_size=10, num_workers=0, text_length=24)
    before = torch.get_rng_state()
    next(iter(data.train_dataloader())), next(iter(data.val_dataloader()))
    assert torch.equal(torch.get_rng_state(), before)
