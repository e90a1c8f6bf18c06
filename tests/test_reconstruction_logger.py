"""ReconstructionLogger: fixed validation images above their reconstructions, where the logger can show them."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from tessera.pixels import to_uint8
from callbacks.reconstructions import ReconstructionLogger
from tests.test_vqgan import ShapesImages, loader, tiny_vqgan, trainer


def test_without_an_image_logger_grids_of_the_first_validation_images_land_as_pngs(tmp_path):
    callback = ReconstructionLogger(every_n_steps=2, num_images=4)
    run = trainer(tmp_path, max_steps=4, logger=CSVLogger(tmp_path), callbacks=[callback])
    data = L.LightningDataModule.from_datasets(ShapesImages(32, seed=1), ShapesImages(8), batch_size=8)
    run.fit(tiny_vqgan(), datamodule=data)

    pngs = sorted((tmp_path / "lightning_logs" / "version_0" / "reconstructions").glob("*.png"))
    assert [p.name for p in pngs] == ["step_00000002.png", "step_00000004.png"]
    grid = np.asarray(Image.open(pngs[0]))
    assert grid.shape == (2 * 16 + 3 * 2, 4 * 16 + 5 * 2, 3)  # 2 rows of 4 16-px images, 2-px padding
    # top row: the first validation images, exactly
    first_val = to_uint8(ShapesImages(8)[0]["images"][None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(grid[2:18, 2:18], first_val)
    assert torch.equal(callback.images, to_uint8(torch.stack([ShapesImages(8)[i]["images"] for i in range(4)])))


def test_the_fixed_images_survive_a_resume(tmp_path):
    callback = ReconstructionLogger(every_n_steps=1, num_images=2)
    run = trainer(tmp_path, max_steps=1, callbacks=[callback])
    run.fit(tiny_vqgan(), loader())
    run.save_checkpoint(tmp_path / "run.ckpt")

    resumed = ReconstructionLogger(every_n_steps=1, num_images=2)
    trainer(tmp_path, max_steps=2, callbacks=[resumed]).fit(tiny_vqgan(), loader(num_samples=16, image_size=16), ckpt_path=tmp_path / "run.ckpt")
    assert torch.equal(resumed.images, callback.images)
    assert resumed.last_logged_step == 2


def test_bf16_mixed_training_gives_finite_losses(tmp_path):
    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert all(torch.isfinite(v).all() for k, v in trainer.callback_metrics.items() if k.startswith("train/"))

    model = tiny_vqgan()
    trainer(tmp_path, max_steps=2, precision="bf16-mixed", callbacks=[Losses()]).fit(model, loader())
    assert model.global_step == 2
