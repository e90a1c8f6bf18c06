"""A rank that dies mid-run fails the whole job within seconds, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import lightning as L
import pytest
import yaml

from tests.test_vqgan import REPO


class ExitOnRank(L.Callback):
    """Kills this process without any cleanup, as an OOM kill or a node failure would, at `step` on `rank`."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(17)


@pytest.mark.slow
@pytest.mark.parametrize("dying_rank", [0, 1])
def test_a_dead_rank_fails_the_ddp_job_fast(tmp_path, shapes_dir, dying_rank):
    overlay = tmp_path / "faults.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {
        "strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                     "init_args": {"find_unused_parameters": True, "timeout": "0:01:00"}},
        "callbacks": [{"class_path": "tests.test_faults.ExitOnRank", "init_args": {"rank": dying_rank, "step": 2}}],
    }}))
    command = [
        sys.executable, "-m", "tessera.commands.cli", "fit",
        "--config", str(REPO / "configs/tokenizer/tiny_shapes.yaml"), "--config", str(overlay),
        "--model.init_args.autoencoder.image_size=32", "--model.init_args.autoencoder.ch_mult=[1,2]",
        "--data=datamodules.caption_image.CaptionImageDataModule",
        f"--data.train_shards={shapes_dir / '00000.tar'}", "--data.image_size=32", "--data.batch_size=4",
        "--data.num_workers=0", "--trainer.devices=2", "--trainer.max_steps=50", "--trainer.logger=false",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    # a hang would outlive the strategy's 60 s timeout; the peer's closed socket should end it far sooner
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.monotonic() - started
    assert result.returncode != 0, result.stderr[-3000:]
    assert seconds < 120, f"took {seconds:.0f} s to fail"
