"""`tessera sample`: images from a prior for prompts, optionally reranked by CLIP."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tessera.sampling import SAMPLING_FIELDS, with_overrides


def add_parser(commands: argparse._SubParsersAction) -> None:
    sample = commands.add_parser("sample", help="images from a prior checkpoint: OUT/images/*.png, OUT/grid.png, OUT/settings.json")
    sample.add_argument("--prior", required=True, type=Path, help="a prior (of any prior class) or LLMTextImageModel checkpoint (.ckpt, FSDP sharded) or export directory")
    prompts = sample.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", action="extend", help="one or more prompts; the flag may be repeated")
    prompts.add_argument("--prompts-file", type=Path, help="a text file, one prompt a line")
    sample.add_argument("--num-images", type=int, default=4, help="images kept per prompt")
    sample.add_argument("--candidates", type=int, default=None, help="images drawn per prompt, the best --num-images kept by CLIP (needs --clip-weights)")
    sample.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="open_clip architecture of --clip-weights")
    sample.add_argument("--clip-weights", type=Path, default=None, help="local CLIP weights file for reranking")
    add_sampling_arguments(sample)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=32, help="images sampled at once")
    sample.add_argument("--tokenizer", type=Path, default=None, help="the stage-1 tokenizer, if not where the checkpoint says")
    sample.add_argument("--fine-stage", type=Path, default=None, help="the multi-scale fine stage, if not where the checkpoint says or to add one")
    sample.add_argument("--device", default=None, help="cuda when there is one, else cpu")
    sample.add_argument("--out", required=True, type=Path)
    sample.set_defaults(run=run)

def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from callbacks.image_logging import image_grid
    from lightning_modules.llm import load_image_generator
    from tessera.clip_rerank import ClipScorer, rerank
    from tessera.launch import process_device
    from tessera.pixels import to_uint8, to_unit_range

    prompts = args.prompt or [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    candidates = args.candidates or args.num_images
    if candidates < args.num_images:
        raise SystemExit(f"--candidates {candidates} is fewer than --num-images {args.num_images}")
    if candidates > args.num_images and args.clip_weights is None:
        raise SystemExit("--candidates above --num-images reranks with CLIP: pass --clip-weights PATH")
    device = process_device(args.device)
    prior = load_image_generator(args.prior, map_location=device, tokenizer=args.tokenizer, fine_stage=args.fine_stage)
    sampling, sources = sampling_settings(prior.sampling, args)
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
        "prior": str(args.prior), "fine_stage": prior.hparams.get("fine_stage"), "prompts": prompts, "num_images": args.num_images, "candidates": candidates,
        "clip_model": args.clip_model if scorer else None, "clip_scores": scores or None,
        **{name: getattr(sampling, name) for name in SAMPLING_FIELDS}, "sampling_from": sources,
        "seed": args.seed, "batch_size": args.batch_size, "device": str(device),
        "images_drawn_per_s": round(len(prompts) * candidates / seconds, 2),
    }
    (args.out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"[sample] {len(images)} images for {len(prompts)} prompts in {seconds:.1f}s: {args.out}")
    return 0


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--cfg-scale, --top-k, --top-p, --temperature; each left out takes the prior's own setting."""
    own = "default: the prior's own (its `sampling` argument), else {}"
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale, 1 is none; " + own.format(1))
    parser.add_argument("--top-k", type=int, help="keep the k likeliest image tokens, 0 all; " + own.format(256))
    parser.add_argument("--top-p", type=float, help="keep the likeliest tokens up to this mass, 1 all; " + own.format("all"))
    parser.add_argument("--temperature", type=float, help=own.format(1))


def sampling_settings(recorded, args: argparse.Namespace):
    """(SamplingConfig, where each value came from: "given" on the command line, "prior" or
    "default") for a prior whose recorded settings are `recorded` (None if it records none)."""
    return with_overrides(recorded, **{name: getattr(args, name) for name in SAMPLING_FIELDS})
