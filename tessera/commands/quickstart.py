"""
`tessera quickstart`: the whole pipeline on a CPU in minutes, each stage the command a cluster
run would use, with the same configs:

    1. tessera shards synthetic       captioned-shapes shards at configs/data/shapes.yaml's size
    2. tessera fit (tokenizer)        configs/tokenizer/tiny_shapes.yaml + configs/data/shapes.yaml
    3. tessera export + tokenize      the tokenizer for stage 2, and token shards of both splits
    4. tessera fit (prior)            configs/prior/tiny_shapes.yaml on the token shards
    5. tessera sample / evaluate      samples for seen and held-out prompts, caption fidelity,
                                      reconstruction PSNR, codebook usage
    6. report.html and report.md      a page (no script; phone-width) of the numbers in plain words
                                      with their chance levels, the pictures, the loss curves

Each training stage runs its config's max_steps (`--tokenizer-steps`, `--prior-steps` change
them), so a seed gives the same numbers on a fast machine, a slow one or a busy one; a line every
100 steps tells the time to go. `--minutes M` stops the stages on a wall-clock budget too (Trainer
`max_time`, 35% and 55% of M), and a report with a stage cut short says so at its top: its numbers
are below what the default reaches. Every stage logs to CSV (the curves of the report) and to
Weights & Biases in offline mode (`wandb sync DIR/wandb/offline-run-*` uploads it later).
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from PIL import Image

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DATA_CONFIG = CONFIGS / "data" / "shapes.yaml"  # both stages' data; its image_size is the shards'

# prompts for the samples grid, in the captions' grammar: two of each layout the training data
# holds, then two held-out captions (combinations absent from the training data)
SAMPLE_PROMPTS = [
    "a large red circle on the left",
    "a small blue square at the top",
    "a small green triangle above a large yellow diamond",
    "a large orange square to the left of a small purple circle",
    "a small yellow circle, a large blue diamond and a small red square from left to right",
    "a large green square, a small orange triangle and a large blue circle from top to bottom",
    "a small red circle above a large blue square",
    "a small red circle, a small red square and a small red triangle from left to right",
]

TOKENIZER_CONFIG = CONFIGS / "tokenizer" / "tiny_shapes.yaml"
PRIOR_CONFIG = CONFIGS / "prior" / "tiny_shapes.yaml"
FINAL = Path("checkpoints") / "last.ckpt"  # written by `tessera fit` when training ends
DISPLAY_SCALE = 4  # report grids: each pixel drawn as a 4x4 block
# shares of a --minutes budget, those that set the default steps: the tokenizer reconstructs colour
# and kind exactly after ~1,400 steps, while the prior's loss falls to the end (caption fidelity at
# guidance 3: 51% at 55/35, 68% at 35/55)
TOKENIZER_SHARE, PRIOR_SHARE = 0.35, 0.55


@dataclass
class Stage:
    """A training stage: its config, the steps asked of it (its config's max_steps unless told), the
    steps it trained."""

    name: str
    config: Path
    budget_share: float  # of --minutes
    steps: int | None = None
    trained: int = 0
    default_steps: int = field(init=False)

    def __post_init__(self):
        self.default_steps = yaml.safe_load(self.config.read_text())["trainer"]["max_steps"]
        self.steps = self.default_steps if self.steps is None else self.steps
        if self.steps < 1:
            raise ValueError(f"--{self.name}-steps must be at least 1, got {self.steps}")

    @property
    def stopped_on_time(self) -> bool:
        return self.trained < self.steps  # max_time is the only other end of a quickstart stage


@dataclass
class StageLog:
    """One line per stage for the console and the report."""

    lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, stage: str, message: str) -> None:
        line = f"[{stage}] {message} ({time.perf_counter() - self.started:.0f}s)"
        print(line, flush=True)
        self.lines.append(line)


def add_parser(commands: argparse._SubParsersAction) -> None:
    quickstart = commands.add_parser("quickstart", help="the end-to-end example on synthetic data, on a CPU")
    quickstart.add_argument("--out", default="quickstart", type=Path)
    quickstart.add_argument("--num-samples", type=int, default=16384, help="training scenes (validation: a 64th, at least 64)")
    quickstart.add_argument("--tokenizer-steps", type=int, help="default: max_steps of configs/tokenizer/tiny_shapes.yaml")
    quickstart.add_argument("--prior-steps", type=int, help="default: max_steps of configs/prior/tiny_shapes.yaml")
    quickstart.add_argument("--minutes", type=float, help="stop training on this wall-clock budget too (35%% tokenizer, 55%% "
                            "prior); the numbers then depend on the machine's speed and load")
    quickstart.add_argument("--fidelity-samples", type=int, default=200, help="images generated to measure caption fidelity")
    quickstart.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Data, tokenizer, token shards, prior, samples, evaluation and a report: see tessera/commands/quickstart.py."""
    run_quickstart(args.out, args.num_samples, args.fidelity_samples, args.tokenizer_steps, args.prior_steps, args.minutes)
    return 0


def run_quickstart(
    out: Path,
    num_samples: int,
    fidelity_samples: int,
    tokenizer_steps: int | None = None,
    prior_steps: int | None = None,
    minutes: float | None = None,
) -> dict:
    """The whole pipeline into OUT. Steps default to the stage configs' max_steps; `minutes`, when
    given, stops each stage on its share of that wall-clock budget as well."""
    tokenizer = Stage("tokenizer", TOKENIZER_CONFIG, TOKENIZER_SHARE, tokenizer_steps)
    prior = Stage("prior", PRIOR_CONFIG, PRIOR_SHARE, prior_steps)
    if minutes is not None and minutes <= 0:
        raise ValueError(f"--minutes must be above 0, got {minutes}")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    log = StageLog()
    image_size = shapes_image_size()

    train, val = write_data(out, num_samples, image_size, log)

    tokenizer_run = out / "tokenizer_run"
    train_stage(out, tokenizer, tokenizer_run, minutes, {
        "data": {"init_args": {"train_shards": train, "val_shards": val}},
    }, log)

    from datamodules.token_shards import tokenize_shards
    from lightning_modules.vqgan import load_tokenizer

    image_tokenizer = load_tokenizer(tokenizer_run / FINAL)
    image_tokenizer.save_pretrained(out / "tokenizer")
    token_shards = {}
    for split, pattern in (("train", train), ("val", val)):
        report = tokenize_shards(image_tokenizer, pattern, out / "data" / f"{split}_tokens", image_size=image_size, batch_size=64)
        token_shards[split] = str(out / "data" / f"{split}_tokens" / Path(pattern).name)
        log("tokenize", f"{split}: {report.samples} samples, skipped {dict(report.skipped) or 'none'}")

    prior_run = out / "prior_run"
    train_stage(out, prior, prior_run, minutes, {
        "model": {"init_args": {"tokenizer": str(out / "tokenizer")}},
        "data": {"init_args": {"train_shards": token_shards["train"], "val_shards": token_shards["val"], "image_tokens": True}},
    }, log)

    numbers = evaluate(out, image_tokenizer, prior_run / FINAL, val, image_size, fidelity_samples, log)
    numbers["minutes"] = round((time.perf_counter() - log.started) / 60, 1)
    numbers["steps"] = {stage.name: stage.trained for stage in (tokenizer, prior)}
    warning = shortfall([tokenizer, prior])
    write_report(out, numbers, warning, tokenizer_run, prior_run, log)
    log("report", f"{out / 'report.md'} and {out / 'report.html'}")
    if warning:
        log("report", warning)
    return numbers


def shapes_image_size() -> int:
    """The side of the quickstart's images: the one both stage configs are built for."""
    return yaml.safe_load(DATA_CONFIG.read_text())["data"]["init_args"]["image_size"]


def write_data(out: Path, num_samples: int, image_size: int, log: StageLog, jitter: bool = False) -> tuple[str, str]:
    """Training and validation shards of the shapes set in OUT/data; `jitter` moves the shapes off
    their cells' centres (the harder set). Returns the two shard patterns."""
    from datamodules.check import check_shards
    from datamodules.shapes import SyntheticShapes
    from datamodules.shard_writer import write_shards

    patterns = []
    for split, count, seed in (("train", num_samples, 0), ("val", max(64, num_samples // 64), 1)):
        directory = out / "data" / split
        write_shards(SyntheticShapes(count, image_size, seed, jitter), directory, samples_per_shard=512, image_format="png")
        shards = sorted(directory.glob("[0-9]*.tar"))
        pattern = str(directory / f"{{{shards[0].stem}..{shards[-1].stem}}}.tar") if len(shards) > 1 else str(shards[0])
        report = check_shards(pattern)
        if report["unreadable_shards"] or report["skipped"]:
            raise RuntimeError(f"the synthetic {split} shards did not check out: {json.dumps(report)}")
        log("data", f"{split}: {report['readable']} samples in {report['shards']} shards")
        patterns.append(pattern)
    return patterns[0], patterns[1]


def train_stage(out: Path, stage: Stage, run_dir: Path, minutes: float | None, sections: dict, log: StageLog) -> None:
    """`tessera fit` with the stage's config, the data config and an overlay; sets stage.trained."""
    seconds = None if minutes is None else stage.budget_share * minutes * 60
    limit = "" if seconds is None else f", at most {seconds / 60:.1f} minutes"
    log(stage.name, f"training {stage.steps:,} steps{limit} ({stage.config.relative_to(CONFIGS.parent)})")
    fit(run_dir, ["fit", "--config", str(stage.config), "--config", str(DATA_CONFIG),
                  "--config", str(overlay(out, stage, run_dir, seconds, sections))])
    stage.trained = last_step(run_dir)
    log(stage.name, f"trained {stage.trained:,} steps" + (" (stopped on the time limit)" if stage.stopped_on_time else ""))


def overlay(out: Path, stage: Stage, run_dir: Path, seconds: float | None, sections: dict) -> Path:
    """A config layered over the stage's own: paths, the steps, the loggers, a time limit if any.
    Without one the steps alone end training: a limit, however generous, would make the model
    depend on the machine's speed and load."""
    trainer = {
        "default_root_dir": str(run_dir),
        "max_steps": stage.steps,
        "logger": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "csv"}},
            {"class_path": "lightning.pytorch.loggers.WandbLogger",
             "init_args": {"save_dir": str(out), "project": "tessera-quickstart", "name": stage.name, "offline": True}},
        ],
    }
    if seconds is not None:
        minutes, secs = divmod(max(10, int(seconds)), 60)
        trainer["max_time"] = f"00:00:{minutes:02d}:{secs:02d}"
    path = out / f"{stage.name}_overlay.yaml"
    path.write_text(yaml.safe_dump({**sections, "trainer": trainer}, sort_keys=False))
    return path


def fit(run_dir: Path, argv: list[str]) -> None:
    """`tessera fit ARGV`; the weights training ended with are in RUN_DIR/checkpoints/last.ckpt."""
    from tessera.commands.fit import lightning_cli

    # the quickstart trains from scratch each time; `tessera fit` would resume from a previous
    # quickstart's checkpoints in the same run directory
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        lightning_cli(argv)
    finally:
        finish_wandb_run()


def finish_wandb_run() -> None:
    """End the W&B run a stage's WandbLogger started: the next stage, or the next fit in the same
    process, would otherwise log into it instead of a run of its own."""
    wandb = sys.modules.get("wandb")  # imported only when a logger used it
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def last_step(run_dir: Path) -> int:
    return torch.load(run_dir / FINAL, map_location="cpu", weights_only=True)["global_step"]


def shortfall(stages: list[Stage]) -> str | None:
    """The warning atop the report, and last in the printed summary, when a stage trained fewer
    steps than its default: a time limit cut it short, or fewer steps were asked."""
    short = [stage for stage in stages if stage.trained < stage.default_steps]
    if not short:
        return None
    reasons = "; ".join(
        f"the {stage.name} stopped on the time limit after {stage.trained:,} of {stage.steps:,} steps" if stage.stopped_on_time
        else f"the {stage.name} trained {stage.trained:,} of the default {stage.default_steps:,} steps"
        for stage in short
    )
    return f"{reasons[0].upper()}{reasons[1:]}: results are below what the default reaches."


def evaluate(out: Path, tokenizer, prior_checkpoint: Path, val_pattern: str, image_size: int, fidelity_samples: int, log: StageLog) -> dict:
    from callbacks.image_logging import image_grid
    from datamodules.caption_image import CaptionImageDataModule
    from tessera.commands.evaluate_shapes import evaluate_shapes, headline
    from tessera.pixels import psnr
    from lightning_modules.prior import TextImagePrior

    data = CaptionImageDataModule(train_shards=val_pattern, image_size=image_size, batch_size=64, num_workers=0, text_length=32, shuffle_buffer=0)
    data.setup("fit")
    images = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)["images"]
    ids = tokenizer.encode(images)
    reconstructions = tokenizer.decode(ids)
    save_grid(image_grid(torch.cat([images[:8], reconstructions[:8]]), nrow=8), out / "reconstructions.png")
    train_ids = token_ids(out / "data" / "train_tokens")
    numbers = {
        "reconstruction_psnr_db": round(psnr(images, reconstructions).mean().item(), 2),
        "codebook_usage": round(len(torch.unique(train_ids)) / tokenizer.codebook_size, 3),
    }
    log("evaluate", f"tokenizer: PSNR {numbers['reconstruction_psnr_db']} dB, codebook usage {numbers['codebook_usage']:.0%}")

    prior = TextImagePrior.load_from_checkpoint(prior_checkpoint, map_location="cpu", weights_only=True).eval()
    sampling = prior.sampling  # configs/prior/tiny_shapes.yaml's, which `tessera sample` uses too
    samples = prior.generate([p for p in SAMPLE_PROMPTS for _ in range(4)], sampling, seed=0)
    save_grid(image_grid(samples, nrow=4), out / "samples.png")
    (out / "samples").mkdir(exist_ok=True)
    for index, prompt_samples in enumerate(samples.split(4)):  # (4, 3, H, W) each, in SAMPLE_PROMPTS order
        save_grid(image_grid(prompt_samples, nrow=4), out / prompt_grid(index))
    fidelity = evaluate_shapes(prior, num_samples=fidelity_samples, seed=1234, sampling=sampling, image_size=image_size)
    numbers["caption_fidelity"] = fidelity
    numbers["sampling"] = f"top-k {sampling.top_k}, guidance scale {sampling.cfg_scale}"
    (out / "caption_fidelity.json").write_text(json.dumps(fidelity, indent=2) + "\n")
    log("evaluate", f"caption fidelity: {json.dumps(headline(fidelity))}")
    return numbers


def save_grid(grid: torch.Tensor, path: Path) -> None:
    """A (3, H, W) uint8 grid as a PNG, its pixels repeated to 4x4 blocks: 32 px images are
    stamps on a screen, and nearest-neighbour scaling keeps their flat colours and hard edges."""
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image.resize((image.width * DISPLAY_SCALE, image.height * DISPLAY_SCALE), Image.Resampling.NEAREST).save(path)


def token_ids(directory: Path) -> torch.Tensor:
    """Every id in a directory of token shards."""
    import io

    import numpy as np
    import webdataset as wds

    arrays = [
        np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False).ravel()
        for sample in wds.tarfile_samples([{"url": str(path)} for path in sorted(directory.glob("*.tar"))])
    ]
    return torch.from_numpy(np.concatenate(arrays).astype(np.int64))


def loss_curves(run_dirs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one above the other: the report's page is as narrow as a phone's screen
    figure, axes = plt.subplots(len(run_dirs), 1, figsize=(6, 2.8 * len(run_dirs)))
    for axis, (stage, run_dir) in zip(axes, run_dirs.items()):
        metrics = sorted(run_dir.glob("csv/version_*/metrics.csv"))
        rows = list(csv.DictReader(metrics[-1].open())) if metrics else []  # none before log_every_n_steps
        for name in ("train/rec_loss", "train/image_loss", "val/rec_loss", "val/image_loss"):
            points = [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]
            if points:
                axis.plot(*zip(*points), label=name, marker="o" if name.startswith("val") else None)
        axis.set_title(stage)
        axis.set_xlabel("training step")
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -----------------------------------------------------------------------------
# the report: report.md and report.html say the same in the same words; the page is plain HTML and
# CSS (no script, nothing fetched) whose pictures are the PNGs beside it. Its tables are rows of
# cells: a row's first is its name or (name, what it means), the others a number or (number, its
# chance level: what a prior that learnt nothing from its captions would score)

# caption fidelity per attribute, as datamodules/shapes_analysis.py's `match` judges it, in reading order
FIDELITY_MEASURES = {
    "count": ("number of shapes", "as many shapes as the caption names"),
    "color": ("colours", "the caption's colours, no more and no fewer"),
    "shape": ("kinds", "the caption's kinds of shape (circle, square, triangle, diamond)"),
    "size": ("sizes", "the caption's sizes (small, large)"),
    "position": ("positions", "the shapes where the caption puts them"),
    "color_and_shape": ("colour and kind right", "each shape named in its colour and kind together "
                        "(a red circle, not a red square beside a blue circle)"),
    "all": ("everything right", "each shape named in its colour, kind and size, where the caption puts it"),
}
GROUPS = {"seen": "seen prompts", "held_out": "held-out prompts"}
GROUP_MEANINGS = {"seen": "captions like the training data's", "held_out": "captions the training data lacks"}
LAYOUT_NAMES = {"single": "one shape", "pair": "two shapes and a relation", "row": "three in a row", "column": "three in a column"}
RECONSTRUCTIONS = "Validation images (top row) and the tokenizer's reconstructions of them (bottom row)."
LOSSES = "Training (lines) and validation (dots) losses of each stage against its step."
ATTRIBUTES_NOTE = "{num_samples} samples per group, analysed at {image_size} px; the share of them with the attribute right."
ANALYSER = "everything right on exact renders of the same captions: the most fidelity can show"
CHANCE_NOTE = ("Chance: the score of a prior that ignores its caption and draws perfect scenes of the training data; "
          "analyser: the same judgement of exact renders of the same captions, the most a prior can score")


def prompt_grid(index: int) -> str:
    """Where, relative to the quickstart's directory, the samples of SAMPLE_PROMPTS[index] are."""
    return f"samples/{index + 1}.png"


def percent(share: float) -> str:
    """0.945 -> '94.5%'; shares under 1% keep two decimals, so a chance level of 0.04% is not '0.0%'."""
    return f"{share:.1%}" if share >= 0.01 or share == 0 else f"{share:.2%}"


def headline_rows(numbers: dict) -> tuple[list[str], list[list]]:
    """The numbers to quote: the tokenizer's two, then the caption fidelity of `headline` per group."""
    fidelity = numbers["caption_fidelity"]
    rows = [
        [("reconstruction PSNR", "how near the tokenizer's reconstructions of validation images are to them; "
          "6 dB more halves the pixel error"), f"{numbers['reconstruction_psnr_db']} dB", "–"],
        [("codebook in use", "the share of the tokenizer's codes found in the training set's tokens; unused codes are wasted"),
         percent(numbers["codebook_usage"]), "–"],
    ]
    for group, group_name in GROUPS.items():
        for key in ("all", "color_and_shape"):
            name, meaning = FIDELITY_MEASURES[key]
            rows.append([(f"{name}, {group_name}", f"samples for {GROUP_MEANINGS[group]}: {meaning}"),
                         percent(fidelity[group]["fidelity"][key]), percent(fidelity[group]["chance"][key])])
    rows.append([("analyser accuracy", ANALYSER), percent(min(fidelity[group]["analyser"]["all"] for group in GROUPS)), "–"])
    return ["measure", "value", "chance"], rows


def fidelity_rows(fidelity: dict) -> tuple[list[str], list[list]]:
    """Caption fidelity per attribute: per group its value and chance level, and the analyser's accuracy."""
    rows = [
        [(name, meaning)] + [(percent(fidelity[group]["fidelity"][key]), percent(fidelity[group]["chance"][key])) for group in GROUPS]
        + [percent(min(fidelity[group]["analyser"][key] for group in GROUPS))]
        for key, (name, meaning) in FIDELITY_MEASURES.items()
    ]
    return ["measure", "seen prompts", "held-out prompts", "analyser"], rows


def layout_rows(fidelity: dict) -> tuple[list[str], list[list[str]]]:
    """Seen prompts' fidelity per layout of the caption."""
    by_layout = fidelity["seen"]["fidelity_by_layout"]
    header = ["layout", "samples"] + [FIDELITY_MEASURES[key][0] for key in ("color_and_shape", "all")]
    rows = [[LAYOUT_NAMES[layout], str(v["n"]), percent(v["color_and_shape"]), percent(v["all"])] for layout, v in by_layout.items()]
    return header, rows


def sample_captions() -> list[str]:
    """Each showcase prompt as its grid's caption, those the training data lacks said so."""
    from datamodules.shapes import caption
    from tessera.commands.evaluate_shapes import HELD_OUT_SCENES

    held_out = {caption(scene) for scene in HELD_OUT_SCENES}
    return [f"“{prompt}”" + (" (held out: never in the training data)" if prompt in held_out else "") for prompt in SAMPLE_PROMPTS]


def write_report(out: Path, numbers: dict, warning: str | None, tokenizer_run: Path, prior_run: Path, log: StageLog) -> None:
    """OUT/report.md and OUT/report.html, from `run_quickstart`'s numbers and the PNGs `evaluate` wrote
    into OUT (the loss curves are drawn here, from the two runs' CSV logs)."""
    loss_curves({"tokenizer": tokenizer_run, "prior": prior_run}, out / "loss_curves.png")
    summary = (f"The whole pipeline on this machine's CPU in {numbers['minutes']} minutes: synthetic shards, a tiny "
               f"VQ-GAN tokenizer ({numbers['steps']['tokenizer']:,} steps), token shards, a tiny prior "
               f"({numbers['steps']['prior']:,} steps), samples and their evaluation.")
    (out / "report.md").write_text(report_markdown(numbers, warning, summary, log.lines))
    (out / "report.html").write_text(report_html(out, numbers, warning, summary, log.lines))


def report_markdown(numbers: dict, warning: str | None, summary: str, stage_lines: list[str]) -> str:
    fidelity = numbers["caption_fidelity"]
    prompts = "\n".join(f"{index + 1}. {text}" for index, text in enumerate(sample_captions()))
    top = f"**{warning}**\n\n" if warning else ""
    return f"""# Tessera quickstart report

{top}{summary}

## Numbers

{markdown_table(*headline_rows(numbers))}

{CHANCE_NOTE}.

## Tokenizer

![reconstructions](reconstructions.png)

{RECONSTRUCTIONS}

## Prior: samples

Four samples per prompt ({numbers['sampling']}), a row each:

![samples](samples.png)

{prompts}

## Caption fidelity per attribute

{ATTRIBUTES_NOTE.format(**fidelity)}

{markdown_table(*fidelity_rows(fidelity))}

Seen prompts by layout:

{markdown_table(*layout_rows(fidelity))}

## Loss curves

![loss curves](loss_curves.png)

{LOSSES}

## Stages

```
{chr(10).join(stage_lines)}
```
"""


def markdown_table(header: list[str], rows: list[list]) -> str:
    """`html_table`'s table in markdown: what each row means in a last column, a chance level in
    brackets after its number."""
    explained = any(isinstance(row[0], tuple) for row in rows)

    def cells(row: list) -> list[str]:
        name, meaning = row[0] if isinstance(row[0], tuple) else (row[0], "")
        numbers = [cell if isinstance(cell, str) else f"{cell[0]} (chance {cell[1]})" for cell in row[1:]]
        return [name, *numbers] + ([meaning] if explained else [])

    header = header + ["what it means"] if explained else header
    lines = [header, ["---"] * len(header), *map(cells, rows)]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


PAGE_STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; color: #222; max-width: 50rem; margin: 0 auto; padding: 0 1rem 2rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.warning { background: #fff4d6; border: 2px solid #d99a00; border-radius: 6px; padding: .75rem 1rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; }
th, td { text-align: left; vertical-align: top; padding: .35rem .4rem; border-bottom: 1px solid #e3e3e3; }
th.number, td.number { text-align: right; } td.number { white-space: nowrap; font-variant-numeric: tabular-nums; }
th small, td small { display: block; font-weight: normal; color: #555; font-size: .8rem; }
.note { color: #555; font-size: .9rem; }
figure { margin: 1rem 0; }
figcaption { font-size: .95rem; }
img { display: block; max-width: 100%; height: auto; }
img.grid { image-rendering: pixelated; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: .8rem; background: #f5f5f5; padding: .5rem; }
@media (max-width: 30rem) { body { font-size: 15px; padding: 0 .6rem 1.5rem; } th, td { padding: .3rem .2rem; } }
"""


def report_html(out: Path, numbers: dict, warning: str | None, summary: str, stage_lines: list[str]) -> str:
    """The page: headings, tables with every number named and explained, the pictures with their captions."""
    esc = html.escape
    fidelity = numbers["caption_fidelity"]
    samples = "".join(picture(out, prompt_grid(index), text, pixelated=True) for index, text in enumerate(sample_captions()))
    warning_box = f'<p class="warning"><strong>Stopped short.</strong> {esc(warning)}</p>' if warning else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tessera quickstart report</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>Tessera quickstart report</h1>
{warning_box}
<p>{esc(summary)}</p>
<h2>Numbers</h2>
{html_table(*headline_rows(numbers))}
<p class="note">{esc(CHANCE_NOTE)}.</p>
<h2>Tokenizer</h2>
{picture(out, "reconstructions.png", RECONSTRUCTIONS, pixelated=True)}
<h2>Prior: samples</h2>
<p>Four samples per prompt ({esc(numbers['sampling'])}).</p>
{samples}
<h2>Caption fidelity per attribute</h2>
<p>{ATTRIBUTES_NOTE.format(**fidelity)}</p>
{html_table(*fidelity_rows(fidelity))}
<p>Seen prompts by layout:</p>
{html_table(*layout_rows(fidelity))}
<h2>Loss curves</h2>
{picture(out, "loss_curves.png", LOSSES, pixelated=False)}
<h2>Stages</h2>
<pre>{esc(chr(10).join(stage_lines))}</pre>
</body>
</html>
"""


def picture(out: Path, source: str, caption: str, pixelated: bool) -> str:
    """A picture beside the page with its caption under it; its size is given, so the page does not
    shift as it loads, and the style scales it down to the screen (a grid of flat-coloured pixels
    without blurring them)."""
    with Image.open(out / source) as image:
        width, height = image.size
    kind = ' class="grid"' if pixelated else ""
    return (f'<figure><img{kind} src="{html.escape(source)}" width="{width}" height="{height}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>\n")


def html_table(header: list[str], rows: list[list]) -> str:
    """A table of the rows the report's tables are made of: what a row means in small print under
    its name, a chance level under its number."""
    def small(cell) -> str:
        return html.escape(cell) if isinstance(cell, str) else f"{html.escape(cell[0])}<small>{html.escape(cell[1])}</small>"

    def row(cells: list) -> str:
        numbers = (cell if isinstance(cell, str) else (cell[0], f"chance {cell[1]}") for cell in cells[1:])
        return f'<tr><th scope="row">{small(cells[0])}</th>' + "".join(f'<td class="number">{small(c)}</td>' for c in numbers) + "</tr>"

    head = f"<th>{html.escape(header[0])}</th>" + "".join(f'<th class="number">{html.escape(c)}</th>' for c in header[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(map(row, rows))}</tbody></table>"
