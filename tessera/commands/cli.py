"""The `tessera` command line.

    tessera shards synthetic --out DIR [--num-samples N] [--image-size S] [--seed X] [--jitter]
    tessera shards folder --images DIR --captions FILE --out DIR [--max-pixels P] [--overwrite]
    tessera shards coco --annotations FILE --images DIR --out DIR
    tessera data check SHARDS [--text-length N] [--max-pixels P]
    tessera quickstart [--out DIR] [--tokenizer-steps N] [--prior-steps N] [--minutes M]
    tessera fit --config configs/tokenizer/tiny_shapes.yaml --config configs/data/shapes.yaml
    tessera validate|test|predict ... (LightningCLI: `tessera fit --help` lists every option)
    tessera export --checkpoint RUN.ckpt --out DIR
    tessera tokenize --tokenizer CKPT_OR_EXPORT_DIR --shards PATTERN --out DIR [--rank R --world-size W]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from datamodules.images import MAX_PIXELS
from datamodules.shard_writer import OPTIONS_FILE
from tessera.commands.evaluate_coco import add_coco_fid_parsers
from tessera.commands.evaluate_shapes import add_shapes_parser
from tessera.commands.submit import add_submit_parser


# handed to LightningCLI: the config files' `model`, `data` and `trainer` sections set everything
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


# the project's top-level packages, whose loggers the command line shows at INFO
PACKAGES = ("tessera", "datamodules", "lightning_modules", "callbacks")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging()
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from tessera.commands.fit import lightning_cli  # imports Lightning: not for every verb

        lightning_cli(argv)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args) or 0


def configure_logging() -> None:
    """Show this project's INFO lines, each once.

    A handler on the root logger would print every Lightning line a second time: Lightning
    gives its own loggers a handler of their own and lets them propagate. So the handler goes on
    this project's packages only."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("tessera")
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(existing.get_name() == "tessera" for existing in logger.handlers):
            logger.addHandler(handler)


class StoreOnce(argparse._StoreAction):
    """A single-value option that refuses to be given twice: argparse would keep the last value
    and drop the first without a word (`--prompt A --prompt B` drawing B only)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault(GIVEN, set())
        if self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} was given twice; it takes one value")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


GIVEN = "_options_given"  # StoreOnce's record on the namespace, removed once parsing is done


class Parser(argparse.ArgumentParser):
    """The `tessera` parser and every subcommand's: repeating a single-value option is an error;
    options that take several values extend (`action="extend"`), so they may be repeated."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, StoreOnce)
        self.register("action", "store", StoreOnce)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.__dict__.pop(GIVEN, None)
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tessera", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    shards = commands.add_parser("shards", help="write caption-image pairs as WebDataset shards (img2dataset layout)")
    kinds = shards.add_subparsers(dest="kind", required=True)
    synthetic = _shard_writer_parser(kinds, "synthetic", "captioned scenes of flat-coloured shapes", "png")
    synthetic.add_argument("--num-samples", type=int, default=10_000)
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--jitter", action="store_true", help="shapes anywhere in their cells' slack, not centred")
    folder = _shard_writer_parser(kinds, "folder", "a directory of images and a JSONL or CSV captions file", "jpg")
    folder.add_argument("--images", required=True, help="directory the captions file's paths are relative to")
    folder.add_argument("--captions", required=True, help="JSONL or CSV with `file` and `caption` fields")
    coco = _shard_writer_parser(kinds, "coco", "MS-COCO captions: one sample per image, all captions kept", "jpg")
    coco.add_argument("--annotations", required=True, help="captions_train2014.json or captions_val2014.json")
    coco.add_argument("--images", required=True, help="the matching image directory (train2014/ or val2014/)")

    data = commands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="read every sample once; print a JSON report; exit 1 on a bad shard")
    check.add_argument("shards", nargs="+", help="shard paths or brace patterns, e.g. '/data/{00000..00099}.tar'")
    check.add_argument("--text-length", type=int, default=64)
    check.add_argument("--tokenizer", default="clip-bpe")
    check.add_argument("--workers", type=int, default=None, help="processes; one per CPU by default")
    _max_pixels_argument(check, "counted as skipped, as the training reader skips them")
    check.set_defaults(run=_data_check)

    quickstart = commands.add_parser("quickstart", help="the end-to-end example on synthetic data, on a CPU")
    quickstart.add_argument("--out", default="quickstart", type=Path)
    quickstart.add_argument("--num-samples", type=int, default=16384, help="training scenes (validation: a 64th, at least 64)")
    quickstart.add_argument("--tokenizer-steps", type=int, help="default: max_steps of configs/tokenizer/tiny_shapes.yaml")
    quickstart.add_argument("--prior-steps", type=int, help="default: max_steps of configs/prior/tiny_shapes.yaml")
    quickstart.add_argument("--minutes", type=float, help="stop training on this wall-clock budget too (35%% tokenizer, 55%% "
                            "prior); the numbers then depend on the machine's speed and load")
    quickstart.add_argument("--fidelity-samples", type=int, default=200, help="images generated to measure caption fidelity")
    quickstart.set_defaults(run=_quickstart)

    evaluate = commands.add_parser("evaluate", help="FID, CLIP score and caption fidelity")
    evaluations = evaluate.add_subparsers(dest="evaluation", required=True)
    add_shapes_parser(evaluations)
    add_coco_fid_parsers(evaluations)

    sample = commands.add_parser("sample", help="images from a prior checkpoint: OUT/images/*.png, OUT/grid.png, OUT/settings.json")
    sample.add_argument("--prior", required=True, type=Path, help="a TextImagePrior checkpoint (.ckpt, FSDP sharded) or export directory")
    prompts = sample.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", action="extend", help="one or more prompts; the flag may be repeated")
    prompts.add_argument("--prompts-file", type=Path, help="a text file, one prompt a line")
    sample.add_argument("--num-images", type=int, default=4, help="images kept per prompt")
    sample.add_argument("--candidates", type=int, default=None, help="images drawn per prompt, the best --num-images kept by CLIP (needs --clip-weights)")
    sample.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="open_clip architecture of --clip-weights")
    sample.add_argument("--clip-weights", type=Path, default=None, help="local CLIP weights file for reranking")
    sample.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 is none")
    sample.add_argument("--top-k", type=int, default=256)
    sample.add_argument("--top-p", type=float, default=None)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=32, help="images sampled at once")
    sample.add_argument("--tokenizer", type=Path, default=None, help="the stage-1 tokenizer, if not where the checkpoint says")
    sample.add_argument("--device", default=None, help="cuda when there is one, else cpu")
    sample.add_argument("--out", required=True, type=Path)
    sample.set_defaults(run=_sample)

    export = commands.add_parser("export", help="a VQGAN or prior checkpoint -> model.safetensors + config.json")
    export.add_argument("--checkpoint", required=True, type=Path, help="a VQGAN or TextImagePrior checkpoint (.ckpt, FSDP sharded)")
    export.add_argument("--out", required=True, type=Path, help="directory to write")
    export.add_argument("--no-ema", action="store_true", help="export the live weights even if the run kept an EMA")
    export.set_defaults(run=_export)

    tokenize = commands.add_parser(
        "tokenize", help="caption-image shards -> token shards (KEY.tokens.npy, KEY.txt, KEY.json) for stage 2",
        description="Rank R of W tokenizes input shards R, R+W, R+2W, ...; each writes only its own output shards, "
                    "and the last to finish writes sizes.json. Complete output shards are kept on a rerun.",
    )
    tokenize.add_argument("--tokenizer", required=True, type=Path, help="a VQGAN checkpoint (.ckpt) or an export directory")
    tokenize.add_argument("--shards", required=True, help="input shards, e.g. '/data/cc3m/{00000..00331}.tar'")
    tokenize.add_argument("--out", required=True, type=Path, help="directory for the token shards")
    tokenize.add_argument("--image-size", type=int, default=256, help="side of the centre crop the tokenizer sees")
    tokenize.add_argument("--batch-size", type=int, default=64)
    tokenize.add_argument("--device", default=None, help="cuda (this process's local GPU) or cpu; cuda when available")
    tokenize.add_argument("--workers", type=int, default=4, help="loader processes decoding images; 0 decodes in this one")
    tokenize.add_argument("--rank", type=int, default=None, help="this process's rank; from RANK or SLURM_PROCID, else 0")
    tokenize.add_argument("--world-size", type=int, default=None, help="processes in all; from WORLD_SIZE or SLURM_NTASKS, else 1")
    tokenize.set_defaults(run=_tokenize)

    add_submit_parser(commands)
    return parser


def _sample(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from callbacks.image_logging import image_grid
    from lightning_modules.prior import load_prior
    from tessera.clip_rerank import ClipScorer, rerank
    from tessera.launch import process_device
    from tessera.pixels import to_uint8, to_unit_range
    from tessera.sampling import SamplingConfig

    prompts = args.prompt or [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    candidates = args.candidates or args.num_images
    if candidates < args.num_images:
        raise SystemExit(f"--candidates {candidates} is fewer than --num-images {args.num_images}")
    if candidates > args.num_images and args.clip_weights is None:
        raise SystemExit("--candidates above --num-images reranks with CLIP: pass --clip-weights PATH")
    device = process_device(args.device)
    prior = load_prior(args.prior, map_location=device, tokenizer=args.tokenizer)
    sampling = SamplingConfig(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, cfg_scale=args.cfg_scale)
    scorer = ClipScorer(args.clip_model, args.clip_weights, device) if candidates > args.num_images else None

    started = time.perf_counter()
    kept, scores = [], []
    per_batch = max(1, args.batch_size // candidates)  # whole prompts per batch, so reranking sees all candidates
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start : start + per_batch]
        images = prior.generate([p for p in chunk for _ in range(candidates)], sampling, seed=args.seed + start)
        if scorer is not None:
            images, chunk_scores = rerank(images, chunk, candidates, args.num_images, scorer)
            scores += chunk_scores.tolist()
        kept.append(to_uint8(images).cpu())
    images = torch.cat(kept)  # (P * num_images, 3, H, W) uint8, prompt-major
    seconds = time.perf_counter() - started

    # the images alone in their folder, so that `tessera evaluate fid` can read it as it is
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        prompt_index, image_index = divmod(index, args.num_images)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(args.out / "images" / f"{prompt_index:04d}_{image_index:02d}.png")
    grid = image_grid(to_unit_range(images), nrow=args.num_images)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(args.out / "grid.png")
    settings = {
        "prior": str(args.prior), "prompts": prompts, "num_images": args.num_images, "candidates": candidates,
        "clip_model": args.clip_model if scorer else None, "clip_scores": scores or None,
        **{name: getattr(sampling, name) for name in ("top_k", "top_p", "temperature", "cfg_scale")},
        "seed": args.seed, "batch_size": args.batch_size, "device": str(device),
        "images_drawn_per_s": round(len(prompts) * candidates / seconds, 2),
    }
    (args.out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"[sample] {len(images)} images for {len(prompts)} prompts in {seconds:.1f}s: {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lightning_modules.fsdp import checkpoint_hyperparameters
    from lightning_modules.prior import export_prior
    from lightning_modules.vqgan import load_tokenizer

    # a TextImagePrior's hyperparameters hold its transformer's config, a VQGAN's its quantizer's
    if "transformer" in checkpoint_hyperparameters(args.checkpoint):
        shape = export_prior(args.checkpoint, args.out)["transformer"]
        print(f"[export] prior, {shape['n_layer']} blocks of width {shape['n_embd']}: {args.out}")
        return 0
    tokenizer = load_tokenizer(args.checkpoint, use_ema=not args.no_ema)
    tokenizer.save_pretrained(args.out)
    print(f"[export] {tokenizer.codebook_size} codes, f{tokenizer.downsample_factor}: {args.out}")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from datamodules.token_shards import tokenize_shards
    from lightning_modules.vqgan import load_tokenizer
    from tessera.launch import process_device, rank_and_world_size

    rank, world_size = rank_and_world_size(args.rank, args.world_size)
    device = process_device(args.device)
    tokenizer = load_tokenizer(args.tokenizer).to(device)
    report = tokenize_shards(
        tokenizer, args.shards, args.out, image_size=args.image_size, batch_size=args.batch_size,
        device=device, workers=args.workers, rank=rank, world_size=world_size,
    )
    print(json.dumps({"out": str(args.out), "rank": rank, "world_size": world_size, **report.as_dict()}))
    return 0


def _shard_writer_parser(kinds, name: str, help: str, default_format: str) -> argparse.ArgumentParser:
    parser = kinds.add_parser(name, help=help)
    parser.add_argument("--out", required=True, type=Path, help="dataset directory; complete shards there are kept")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-format", choices=["jpg", "png", "webp"], default=default_format)
    parser.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality")
    parser.add_argument("--workers", type=int, default=1, help="shards written in parallel")
    _max_pixels_argument(parser, "skipped and counted")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the shards and records in --out first (a re-run with options other than "
                             f"those in --out's {OPTIONS_FILE} is refused without it)")
    parser.set_defaults(run=_write_shards)
    return parser


def _max_pixels_argument(parser: argparse.ArgumentParser, what_happens: str) -> None:
    parser.add_argument("--max-pixels", type=_pixel_cap, default=MAX_PIXELS,
                        help=f"images whose header declares more pixels are {what_happens}, undecoded "
                             f"(default {MAX_PIXELS:,}: 8192 x 8192); 0 for no cap")


def _pixel_cap(text: str) -> int | None:
    """--max-pixels: a pixel count, or 0 for no cap (None)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a pixel count, or 0 for no cap, got {value}")
    return value or None


def _write_shards(args: argparse.Namespace) -> int:
    from datamodules.shard_writer import write_shards
    from datamodules.shapes import SyntheticShapes
    from datamodules.sources import CocoSource, FolderSource

    try:
        if args.kind == "synthetic":
            source = SyntheticShapes(args.num_samples, args.image_size, args.seed, args.jitter)
        elif args.kind == "folder":
            source = FolderSource(args.images, args.captions)
        else:
            source = CocoSource(args.annotations, args.images)
        report = write_shards(source, args.out, args.samples_per_shard, args.image_format, args.quality,
                              args.workers, args.max_pixels, args.overwrite)
    except (ValueError, FileNotFoundError) as error:  # bad input or options: the message says what to do
        raise SystemExit(f"tessera shards {args.kind}: {error}") from error
    print(json.dumps({"out": str(args.out), "written": report.written, "kept": report.existing,
                      "all_skipped_shards": report.empty, "samples": report.samples,
                      "skipped": dict(report.skipped)}))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from datamodules.check import check_shards

    report = check_shards(args.shards, args.text_length, args.tokenizer, args.workers, args.max_pixels)
    print(json.dumps(report, indent=1))
    return 1 if report["unreadable_shards"] else 0


def _quickstart(args: argparse.Namespace) -> int:
    """Data, tokenizer, token shards, prior, samples, evaluation and a report: see tessera/commands/quickstart.py."""
    from tessera.commands.quickstart import run_quickstart

    run_quickstart(args.out, args.num_samples, args.fidelity_samples, args.tokenizer_steps, args.prior_steps, args.minutes)
    return 0



if __name__ == "__main__":
    sys.exit(main())
