"""Every stage-2 family on the shapes set: the same data, the same steps, scored the same way.

For each family (FAMILIES below: the flat prior over FSQ codes, the RQ-Transformer over residual
codes, the multi-scale tokens with their fine stage, the flat prior over DALL-E's Gumbel dVAE
codes, and the RQ-Transformer again with the paper's soft labels and stochastic codes on the RQ
family's tokenizer), through the commands a user runs: `tessera fit` of its tokenizer config, export,
`tessera tokenize` of both splits, `tessera fit` of its fine stage where it has one, `tessera fit`
of its prior on the token shards. Every tokenizer trains `--tokenizer-steps`, every prior (and
fine stage) `--prior-steps`, each cosine ending at its last step. Then, per family:

  - caption fidelity of generated images (`tessera evaluate shapes`: colour and kind, and all
    attributes, for seen and held-out prompts), with the sampling each prior config sets;
  - the prior's validation loss in bits per image (its last validation's nats per token, times the
    tokens of an image, over ln 2; with a fine stage, plus its bits for the fine map): what the
    model knows of the tokenizer's codes, not of the pixels (the tokenizers are lossy);
  - the tokenizer's reconstruction PSNR on 64 validation images;
  - sequence length (caption tokens + the prior's positions per image; the RQ-Transformer's spatial
    positions each run a depth loop over their codes), parameters of the stage-2 networks (less the
    caption word table, the same in all);
  - CPU sampling images per second, batch 32, median of `--repeats` timed batches, and its ratio to
    the flat prior's in the same run.

Writes OUT/families.json and OUT/families.md (the table). `--jitter` writes the harder set, shapes
anywhere in their cells. The numbers depend on the steps and seeds only, not on the machine's
load; the times do.

    python bench/families_shapes.py --out runs/families
    python bench/families_shapes.py --out runs/families_jitter --jitter --tokenizer-steps 1000 --prior-steps 1500
    python bench/families_shapes.py --out /tmp/f --families flat rq --tokenizer-steps 2 --prior-steps 2 --num-samples 64 --fidelity-samples 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from datamodules.caption_image import CaptionImageDataModule
from datamodules.shapes import caption
from datamodules.token_shards import tokenize_shards
from lightning_modules.fine_stage import FineStage
from lightning_modules.prior import TextImagePrior, load_prior
from lightning_modules.vqgan import load_tokenizer
from tessera.commands.evaluate_shapes import evaluate_shapes, evaluation_scenes
from tessera.commands.quickstart import CONFIGS, DATA_CONFIG, FINAL, Stage, StageLog, fit, overlay, shapes_image_size, write_data
from tessera.pixels import psnr

FLAT = "flat"


@dataclass(frozen=True)
class Family:
    """A stage-2 family as its configs, relative to configs/: the tokenizer, the prior over its
    codes, and the fine stage for a multi-scale tokenizer; with `prior_args` over the prior config's
    own, and `tokenizer_of` another family whose tokenizer (and token shards) it reuses when that
    family's directory has them."""

    tokenizer: str
    prior: str
    fine_stage: str | None = None
    prior_args: dict = field(default_factory=dict)
    tokenizer_of: str | None = None

    @property
    def from_images(self) -> bool:
        """Soft labels are made from the images by the frozen tokenizer: that prior trains on images."""
        return self.prior_args.get("soft_label_temperature") is not None


FAMILIES = {
    FLAT: Family("tokenizer/tiny_shapes.yaml", "prior/tiny_shapes.yaml"),
    "rq": Family("tokenizer/rq_tiny_shapes.yaml", "prior/rq_tiny_shapes.yaml"),
    "multiscale": Family("tokenizer/tiny_shapes_multiscale.yaml", "prior/tiny_shapes.yaml", "fine_stage/tiny_shapes.yaml"),
    "dvae": Family("tokenizer/dvae_tiny_shapes.yaml", "prior/tiny_shapes.yaml"),
    # the RQ-Transformer paper's training refinements, on the RQ family's tokenizer
    "rq_soft": Family("tokenizer/rq_tiny_shapes.yaml", "prior/rq_tiny_shapes.yaml", tokenizer_of="rq",
                      prior_args={"soft_label_temperature": 0.5, "stochastic_codes": True}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--jitter", action="store_true", help="shapes anywhere in their cells' slack, not centred")
    parser.add_argument("--num-samples", type=int, default=16384, help="training scenes (validation: a 64th, at least 64)")
    parser.add_argument("--tokenizer-steps", type=int, default=1425, help="every tokenizer's steps (the quickstart's)")
    parser.add_argument("--prior-steps", type=int, default=2546, help="every prior's and fine stage's steps (the quickstart's)")
    parser.add_argument("--fidelity-samples", type=int, default=200, help="images per group, seen and held out")
    parser.add_argument("--repeats", type=int, default=3, help="timed sampling batches; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for training and sampling")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="DIR",
                        help="train nothing: join the families.json of runs into OUT (families trained in parallel "
                             "processes) and time every prior's sampling again here, side by side")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Iterator[dict]:
    """The setup, then one record per family as it is measured (the flat prior first: the others'
    sampling speed is given against its own)."""
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    args.out.mkdir(parents=True, exist_ok=True)
    log = StageLog()
    image_size = shapes_image_size()
    yield {"bench": "families_shapes", "setup": setup(args), "torch": torch.__version__, "threads": args.threads}
    data = write_data(args.out, args.num_samples, image_size, log, jitter=args.jitter)
    flat_speed = None
    for name in sorted(args.families, key=lambda name: name != FLAT):
        numbers = run_family(name, FAMILIES[name], args, data, image_size, log)
        flat_speed = numbers["images_per_second"] if name == FLAT else flat_speed
        numbers["speed_vs_flat"] = round(numbers["images_per_second"] / flat_speed, 2) if flat_speed else None
        yield {"family": name, **numbers}


def combine(args: argparse.Namespace) -> Iterator[dict]:
    """The families of earlier runs in DIRs (their first run's setup), each prior's sampling timed
    again in this process, the flat prior first, so that the speeds compare."""
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [(directory, json.loads((directory / "families.json").read_text())) for directory in args.combine]
    yield runs[0][1][0]
    families = sorted(((directory, record) for directory, (_, *records) in runs for record in records),
                      key=lambda item: item[1]["family"] != FLAT)
    flat_speed = None
    for directory, record in families:
        name = record["family"]
        fine_stage = directory / name / "fine_stage_run" / FINAL
        prior = load_prior(directory / name / "prior_run" / FINAL, tokenizer=directory / name / "tokenizer",
                           fine_stage=fine_stage if FAMILIES[name].fine_stage else None)
        speed = round(images_per_second(prior, args.repeats), 2)
        flat_speed = speed if name == FLAT else flat_speed
        yield {**record, "images_per_second": speed, "speed_vs_flat": round(speed / flat_speed, 2) if flat_speed else None}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    records = []
    for record in (combine(args) if args.combine else run(args)):
        print(json.dumps(record), flush=True)
        records.append(record)
        (args.out / "families.json").write_text(json.dumps(records, indent=2) + "\n")
    (args.out / "families.md").write_text(table(records))
    print(table(records))


def setup(args: argparse.Namespace) -> str:
    return (f"{'jittered' if args.jitter else 'centred'} shapes, {args.num_samples:,} training scenes, "
            f"tokenizers {args.tokenizer_steps:,} steps, priors and fine stage {args.prior_steps:,}, "
            f"{args.fidelity_samples} samples per group, {args.threads} thread(s)")


def run_family(name: str, family: Family, args: argparse.Namespace, data: tuple[str, str], image_size: int, log: StageLog) -> dict:
    """Train the family's stages into OUT/NAME and measure them."""
    out = args.out / name
    out.mkdir(exist_ok=True)
    train, val = data
    images = {"data": {"init_args": {"train_shards": train, "val_shards": val}}}
    tokenizer_dir = args.out / (family.tokenizer_of or name)
    if not (tokenizer_dir / "tokenizer_run" / FINAL).is_file():
        tokenizer_dir.mkdir(exist_ok=True)
        train_stage(tokenizer_dir, "tokenizer", family.tokenizer, args.tokenizer_steps, tokenizer_dir / "tokenizer_run", images, log)
    tokenizer = load_tokenizer(tokenizer_dir / "tokenizer_run" / FINAL)
    tokenizer.save_pretrained(out / "tokenizer")
    tokens = {}
    for split, pattern in (("train", train), ("val", val)):
        tokenize_shards(tokenizer, pattern, out / f"{split}_tokens", image_size=image_size, batch_size=64)
        tokens[split] = str(out / f"{split}_tokens" / Path(pattern).name)

    fine_stage = fine_bits = None
    if family.fine_stage:
        fine_run = out / "fine_stage_run"
        train_stage(out, "fine_stage", family.fine_stage, args.prior_steps, fine_run,
                    {**images, "model": {"init_args": {"tokenizer": str(out / "tokenizer")}}}, log)
        fine_stage = fine_run / FINAL
        fine = FineStage.load_from_checkpoint(fine_stage, map_location="cpu", weights_only=True)
        fine_bits = validation_loss(fine, val, image_size, "val/loss") * fine.config.fine_grid**2 / math.log(2)

    prior_run = out / "prior_run"
    model_args = {"tokenizer": str(out / "tokenizer"), **family.prior_args, **({"fine_stage": str(fine_stage)} if fine_stage else {})}
    prior_data = images if family.from_images else {
        "data": {"init_args": {"train_shards": tokens["train"], "val_shards": tokens["val"], "image_tokens": True}}
    }
    train_stage(out, "prior", family.prior, args.prior_steps, prior_run, {**prior_data, "model": {"init_args": model_args}}, log)
    prior = load_prior(prior_run / FINAL, tokenizer=out / "tokenizer", fine_stage=fine_stage)

    tokens_per_image = math.prod(prior.id_shape)
    bits = validation_loss(prior, tokens["val"], image_size, "val/image_loss", image_tokens=True) * tokens_per_image / math.log(2)
    fidelity = evaluate_shapes(prior, num_samples=args.fidelity_samples, seed=1234, sampling=prior.sampling, image_size=image_size)
    networks = [prior.transformer] + ([prior.fine_stage.module] if fine_stage is not None else [])
    numbers = {
        "tokenizer_psnr_db": round(reconstruction_psnr(tokenizer, val, image_size), 2),
        "seen_color_and_shape": fidelity["seen_color_and_shape"],
        "seen_all": fidelity["seen_all"],
        "held_out_color_and_shape": fidelity["held_out_color_and_shape"],
        "held_out_all": fidelity["held_out_all"],
        "val_bits_per_image": round(bits + (fine_bits or 0.0), 1),
        "fine_stage_bits_per_image": None if fine_bits is None else round(fine_bits, 1),
        "tokens_per_image": tokens_per_image,
        "sequence_length": prior.config.text_length + prior.config.image_grid**2,
        # less the caption word table (49,408 x width), the same in every family and most of a tiny prior
        "parameters": sum(p.numel() for network in networks for p in network.parameters()) - prior.transformer.text_embed.weight.numel(),
        "images_per_second": round(images_per_second(prior, args.repeats), 2),
    }
    log(name, json.dumps(numbers))
    return numbers


def train_stage(out: Path, name: str, config: str, steps: int, run_dir: Path, sections: dict, log: StageLog) -> None:
    """`tessera fit` of CONFIG and the data config for STEPS, the cosine ending at the last one."""
    stage = Stage(name, CONFIGS / config, budget_share=1.0, steps=steps)
    model = sections.get("model", {"init_args": {}})
    model = {"init_args": {**model["init_args"], "optimizer": {"decay_steps": steps}}}
    log(name, f"training {steps:,} steps ({config})")
    fit(run_dir, ["fit", "--config", str(stage.config), "--config", str(DATA_CONFIG),
                  "--config", str(overlay(out, stage, run_dir, None, {**sections, "model": model}))])


def validation_loss(module: L.LightningModule, val_pattern: str, image_size: int, metric: str, image_tokens: bool = False) -> float:
    """METRIC of the module's own validation over the whole validation split, with its final weights
    (the runs validate every 500 steps, not necessarily at their last)."""
    data = CaptionImageDataModule(train_shards=val_pattern, val_shards=val_pattern, image_size=image_size, batch_size=64,
                                  num_workers=0, text_length=24, shuffle_buffer=0, image_tokens=image_tokens)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return metrics[metric]


def reconstruction_psnr(tokenizer, val_pattern: str, image_size: int) -> float:
    data = CaptionImageDataModule(train_shards=val_pattern, image_size=image_size, batch_size=64, num_workers=0, text_length=32, shuffle_buffer=0)
    data.setup("fit")
    images = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)["images"]
    with torch.no_grad():
        return psnr(images, tokenizer.decode(tokenizer.encode(images))).mean().item()


def images_per_second(prior: TextImagePrior, repeats: int, batch_size: int = 32) -> float:
    prompts = [caption(scene) for scene in evaluation_scenes(batch_size)["seen"]]
    prior.generate(prompts, prior.sampling, seed=0)  # warm-up
    seconds = []
    for repeat in range(repeats):
        started = time.perf_counter()
        prior.generate(prompts, prior.sampling, seed=repeat)
        seconds.append(time.perf_counter() - started)
    return batch_size / statistics.median(seconds)


COLUMNS = {
    "seen_color_and_shape": ("seen: colour and kind", "{:.1%}"),
    "seen_all": ("seen: all", "{:.1%}"),
    "held_out_color_and_shape": ("held out: colour and kind", "{:.1%}"),
    "held_out_all": ("held out: all", "{:.1%}"),
    "val_bits_per_image": ("val bits / image", "{:,.1f}"),
    "tokenizer_psnr_db": ("tokenizer PSNR (dB)", "{:.2f}"),
    "sequence_length": ("sequence", "{}"),
    "tokens_per_image": ("codes / image", "{}"),
    "parameters": ("stage-2 params, less the caption word table", "{:,}"),
    "images_per_second": ("CPU images/s", "{:.1f}"),
    "speed_vs_flat": ("vs flat", "{:.2f}x"),
}


def table(records: list[dict]) -> str:
    header, *families = records
    titles = ["family", *(title for title, _ in COLUMNS.values())]
    rows = [[numbers["family"], *("" if numbers.get(key) is None else fmt.format(numbers[key]) for key, (_, fmt) in COLUMNS.items())]
            for numbers in families]
    lines = [header["setup"], "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


if __name__ == "__main__":
    main()
