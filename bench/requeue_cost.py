"""What a requeue costs: seconds from SIGUSR1 to a written checkpoint, and from the restarted
process's start to its first new training step, for the "300m" prior (configs/prior/300m.yaml)
trained by `tessera fit` on random token shards (64 caption + 16x16 image tokens).

Launch 1 trains; at step --signal-step a probe callback sends its own process SIGUSR1, as SLURM's
`--signal=USR1@90` would; callbacks.preemption.Requeue checkpoints at the next step boundary and
stops (outside SLURM it requeues nothing). Launch 2 is the same command, as the requeued job
would run it: it resumes from requeue.ckpt and trains --steps-after more steps. Reported:
  - signal -> checkpoint written (s), and the write alone (s), with the checkpoint's size;
  - process start -> first new step finished (s) in launch 2: imports, model build, loading the
    checkpoint, data loader start, the first step (compilation included when the config compiles);
  - the same for launch 1, a cold start without a checkpoint, as the reference.

    python bench/requeue_cost.py                                   # one GPU, 300m, batch 16
    python bench/requeue_cost.py --tiny                            # CPU smoke run, tiny config
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


class RequeueProbe(L.Callback):
    """Prints the process's age at its first finished step; signals itself after `signal_step`."""

    def __init__(self, signal_step: int):
        self.signal_step = signal_step
        self.first = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from callbacks.preemption import process_age_s

        if self.first:
            self.first = False
            print(f"[probe] first step {trainer.global_step} done {process_age_s():.2f} s after the process", flush=True)
        if trainer.global_step == self.signal_step and trainer.ckpt_path is None:
            os.kill(os.getpid(), signal.SIGUSR1)


def write_token_shards(directory: Path, samples: int, grid: int, codes: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with tarfile.open(directory / "00000.tar", "w") as tar:
        for index in range(samples):
            ids = io.BytesIO()
            np.save(ids, rng.integers(0, codes, (grid, grid), dtype=np.int16))
            for suffix, data in (("tokens.npy", ids.getvalue()), ("txt", f"a photo of thing {index}".encode())):
                member = tarfile.TarInfo(f"{index:06d}.{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    (directory / "sizes.json").write_text(json.dumps({"00000.tar": samples}))
    return str(directory / "00000.tar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with configs/prior/tiny_shapes.yaml")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--signal-step", type=int, default=20)
    parser.add_argument("--steps-after", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="run directory (a temporary one by default)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    config = REPO / "configs/prior" / ("tiny_shapes.yaml" if args.tiny else "300m.yaml")
    transformer = yaml.safe_load(config.read_text())["model"]["init_args"]["transformer"]
    work = args.out or Path(tempfile.mkdtemp(prefix="requeue-cost-"))
    shards = write_token_shards(work / "tokens", 64 * args.batch_size, transformer["image_grid"], transformer["image_vocab_size"])
    overlay = work / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {
        "accelerator": "cpu" if args.tiny else "gpu", "devices": 1, "logger": False, "enable_progress_bar": False,
        "limit_val_batches": 0, "default_root_dir": str(work / "run"),
        **({} if args.tiny else {"precision": "bf16-mixed"}),
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1000}},
            {"class_path": "callbacks.preemption.Requeue"},
            {"class_path": "bench.requeue_cost.RequeueProbe", "init_args": {"signal_step": args.signal_step}},
        ],
    }}))
    command = [
        sys.executable, "-m", "tessera.commands.cli", "fit", "--config", str(config), "--config", str(overlay),
        "--model.init_args.tokenizer=null",
        "--data=datamodules.caption_image.CaptionImageDataModule", f"--data.train_shards={shards}",
        "--data.image_tokens=true", f"--data.batch_size={args.batch_size}", "--data.num_workers=2",
        f"--data.text_length={transformer['text_length']}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def launch(max_steps: int) -> tuple[str, float]:
        started = time.perf_counter()
        result = subprocess.run(command + [f"--trainer.max_steps={max_steps}"], env=env, capture_output=True, text=True)
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise SystemExit(output[-4000:])
        return output, time.perf_counter() - started

    first, first_wall = launch(max_steps=10_000)
    written = re.search(r"\[requeue\] step (\d+): (\S+) written in ([\d.]+) s, ([\d.]+) s after the signal", first)
    if written is None:
        raise SystemExit(f"launch 1 wrote no requeue checkpoint:\n{first[-4000:]}")
    step, checkpoint = int(written.group(1)), Path(written.group(2))
    second, second_wall = launch(max_steps=step + args.steps_after)
    cold = float(re.search(r"\[probe\] first step \d+ done ([\d.]+) s", first).group(1))
    warm = re.search(r"\[probe\] first step (\d+) done ([\d.]+) s", second)
    if warm is None or int(warm.group(1)) != step + 1:
        raise SystemExit(f"launch 2 did not resume at step {step + 1}:\n{second[-4000:]}")
    return {
        "config": config.name, "batch_size": args.batch_size, "checkpoint_step": step,
        "checkpoint_gb": round(checkpoint.stat().st_size / 1e9, 3),
        "signal_to_checkpoint_s": float(written.group(4)), "checkpoint_write_s": float(written.group(3)),
        "restart_to_first_new_step_s": float(warm.group(2)), "cold_start_to_first_step_s": cold,
        "launch_wall_s": [round(first_wall, 1), round(second_wall, 1)],
    }


def main() -> None:
    print(json.dumps(run(parse_args()), indent=1))


if __name__ == "__main__":
    main()
