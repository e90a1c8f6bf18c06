"""What the quickstart's tokenizer gives the prior: reconstruction fidelity and token noise.

Trains configs/tokenizer/tiny_shapes.yaml through `tessera fit` for a wall-clock budget on the
synthetic shapes (written at the data config's size), with any extra `tessera fit` arguments,
then reports on the last weights:
  - PSNR and the shapes analyser's verdicts on reconstructions of 150 seen scenes (colour, kind,
    size, both colour and kind): what the prior could at best draw;
  - the entropy of the ids of 2,048 training scenes, over all positions and, per position, over
    the tokens whose patch is plain background: the noise the prior must learn. A tokenizer
    whose background ids vary with far-away shapes makes every sequence unpredictable.

    python bench/shapes_tokenizer.py --seconds 330
    python bench/shapes_tokenizer.py --seconds 330 --threads 1 -- --config my_quantizer.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from datamodules.shapes import BACKGROUND, SyntheticShapes, render, sample_scene
from datamodules.shard_writer import write_shards
from lightning_modules.vqgan import load_tokenizer
from tessera.commands.evaluate_shapes import evaluation_scenes, fractions, judge
from tessera.pixels import psnr, to_uint8, to_unit_range
from tessera.commands.quickstart import CONFIGS, DATA_CONFIG, shapes_image_size

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_CONFIG = CONFIGS / "tokenizer" / "tiny_shapes.yaml"


def renders(scenes, image_size: int) -> torch.Tensor:
    """(N, 3, S, S) renders in [-1, 1]."""
    pixels = np.stack([np.asarray(render(scene, image_size).convert("RGB")) for scene in scenes])
    return to_unit_range(torch.from_numpy(pixels).permute(0, 3, 1, 2))


def entropy(ids: torch.Tensor, vocabulary: int) -> float:
    """Entropy in nats of the empirical distribution of `ids`."""
    counts = torch.bincount(ids.flatten(), minlength=vocabulary).float()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def token_noise(tokenizer, image_size: int, num_scenes: int = 2048) -> dict:
    images = renders([sample_scene(random.Random(f"0:{i}")) for i in range(num_scenes)], image_size)
    with torch.no_grad():
        ids = torch.cat([tokenizer.encode(images[i : i + 256]) for i in range(0, num_scenes, 256)])  # (N, h, w)
    N, h, w = ids.shape
    f = image_size // h
    background = to_unit_range(torch.tensor(BACKGROUND, dtype=torch.uint8)).view(1, 3, 1, 1)
    patches = (images - background).abs().reshape(N, 3, h, f, w, f).amax(dim=(1, 3, 5))  # (N, h, w)
    plain = (patches < 1e-3).reshape(N, h * w)  # (N, h*w): the patch is all background
    ids = ids.reshape(N, h * w)
    per_position = [entropy(ids[plain[:, j], j], tokenizer.codebook_size) for j in range(h * w) if plain[:, j].sum() >= 16]
    return {
        "background_share": round(float(plain.float().mean()), 3),
        "ids_used": int(ids.unique().numel()),
        "entropy_nats": round(entropy(ids, tokenizer.codebook_size), 2),
        "background_entropy_per_position_nats": round(float(np.mean(per_position)), 2),
        "background_ids_used": int(ids[plain].unique().numel()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=330, help="training budget (the quickstart's is 6.6 min)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    parser.add_argument("--samples", type=int, default=4096, help="training scenes, as the quickstart's")
    parser.add_argument("fit_args", nargs="*", help="further `tessera fit` arguments, after --")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    image_size = shapes_image_size()
    work = Path(tempfile.mkdtemp(prefix="tessera-shapes-tokenizer-"))
    try:
        for split, count, seed in (("train", args.samples, 0), ("val", 256, 1)):
            write_shards(SyntheticShapes(count, image_size, seed), work / split, samples_per_shard=512, image_format="png")
        shards = sorted((work / "train").glob("[0-9]*.tar"))
        minutes, seconds = divmod(args.seconds, 60)
        command = [
            sys.executable, "-m", "tessera.commands.cli", "fit", "--config", str(TOKENIZER_CONFIG), "--config", str(DATA_CONFIG),
            f"--data.init_args.train_shards={work}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar",
            f"--data.init_args.val_shards={work}/val/00000.tar",
            f"--trainer.max_time=00:00:{minutes:02d}:{seconds:02d}", f"--trainer.default_root_dir={work}/run",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            *args.fit_args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(command, check=True, cwd=REPO, env=env)

        torch.set_num_threads(args.threads)
        checkpoint = work / "run" / "checkpoints" / "last.ckpt"
        tokenizer = load_tokenizer(checkpoint)
        scenes = evaluation_scenes(150)["seen"]
        images = renders(scenes, image_size)
        with torch.no_grad():
            reconstructions = torch.cat([tokenizer.decode(tokenizer.encode(images[i : i + 50])) for i in range(0, 150, 50)])
        verdicts = fractions(judge(scenes, list(to_uint8(reconstructions).permute(0, 2, 3, 1).numpy())))
        report = {
            "steps": torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"],
            "fit_args": args.fit_args,
            "psnr_db": round(float(psnr(images, reconstructions).mean()), 2),
            "reconstructions": {k: round(verdicts[k], 3) for k in ("color", "shape", "size", "color_and_shape")},
            **token_noise(tokenizer, image_size),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> None:
    print(json.dumps(run(parse_args()), indent=1))


if __name__ == "__main__":
    main()
