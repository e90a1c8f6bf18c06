"""What a user reads on the terminal: each line once, no noise about choices made on purpose."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_lightning_and_tessera_log_lines_are_printed_once(tmp_path):
    script = (
        "import logging\n"
        "from tessera.commands.cli import configure_logging\n"
        "configure_logging(); configure_logging()\n"
        "from lightning.pytorch.utilities import rank_zero_info\n"
        "rank_zero_info('a line from lightning')\n"
        "logging.getLogger('datamodules.stream').info('a line from tessera')\n"
    )
    output = run([sys.executable, "-c", script], tmp_path)
    assert output.count("a line from lightning") == 1
    assert output.count("a line from tessera") == 1


@pytest.mark.slow
def test_fit_prints_a_summary_and_progress_without_noise(tmp_path, shapes_dir):
    output = run([
        sys.executable, "-m", "tessera.commands.cli", "fit",
        "--config", str(REPO / "configs/tokenizer/tiny_shapes.yaml"),
        "--model.init_args.autoencoder.image_size=32", "--model.init_args.autoencoder.ch_mult=[1,2]",
        "--data=datamodules.caption_image.CaptionImageDataModule",
        f"--data.train_shards={shapes_dir / '00000.tar'}", "--data.image_size=32", "--data.batch_size=4",
        "--data.num_workers=0", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=true",
        f"--trainer.default_root_dir={tmp_path}",
    ], tmp_path)

    assert "parameters:" in output and "trainable" in output  # the summary
    assert "step 2/2" in output  # the progress bar counts steps
    for noise in ("FLOPs", "/-2", "args parameter is intended", "tensorboardX", "litlogger", "in eval mode",
                  "No seed found"):
        assert noise not in output, f"{noise!r} printed:\n{output[-3000:]}"
    assert output.count("Seed set to 0") == 1
    assert (tmp_path / "lightning_logs").is_dir()  # metrics still go somewhere without TensorBoard
