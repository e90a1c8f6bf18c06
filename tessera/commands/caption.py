"""`tessera caption`: captions for image files from a stage-2 language model (LLMTextImageModel)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    caption = commands.add_parser("caption", help="captions for images from an LLM backbone: OUT.json, {file: caption}")
    caption.add_argument("--model", required=True, type=Path, help="an LLMTextImageModel checkpoint (.ckpt, FSDP sharded) or export directory")
    caption.add_argument("images", nargs="+", type=Path, help="image files, or directories whose images are all captioned")
    caption.add_argument("--max-new-tokens", type=int, default=None, help="caption tokens at most; default: the model's text_length + 1")
    caption.add_argument("--temperature", type=float, default=None, help="sample at this temperature (greedy when no sampling flag is given)")
    caption.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest text tokens")
    caption.add_argument("--top-p", type=float, default=None, help="sample among the likeliest text tokens up to this mass")
    caption.add_argument("--seed", type=int, default=0)
    caption.add_argument("--batch-size", type=int, default=16, help="images captioned at once")
    caption.add_argument("--tokenizer", type=Path, default=None, help="the stage-1 tokenizer, if not where the checkpoint says")
    caption.add_argument("--device", default=None, help="cuda when there is one, else cpu")
    caption.add_argument("--out", required=True, type=Path, help="JSON file to write")
    caption.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from datamodules.image_folder import image_files, load_eval_image
    from lightning_modules.llm import is_llm, load_llm
    from tessera.launch import process_device
    from tessera.pixels import to_unit_range

    if not is_llm(args.model):
        raise SystemExit(f"{args.model} holds no LLMTextImageModel: only a language-model backbone captions images")
    files = [file for path in args.images for file in (image_files(path) if path.is_dir() else [path])]
    if not files:
        raise SystemExit(f"no image files in {', '.join(map(str, args.images))}")
    model = load_llm(args.model, map_location=process_device(args.device), tokenizer=args.tokenizer)
    image_size = model.image_size
    sampling = caption_sampling(args.temperature, args.top_k, args.top_p)
    captions = {}
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images = to_unit_range(torch.stack([torch.tensor(load_eval_image(f, image_size)).permute(2, 0, 1) for f in chunk]))
        texts = model.caption(images, sampling, seed=args.seed + start, max_new_tokens=args.max_new_tokens)
        captions.update({str(file): text for file, text in zip(chunk, texts)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(captions, indent=2) + "\n")
    print(f"[caption] {len(captions)} images: {args.out}")
    return 0


def caption_sampling(temperature: float | None, top_k: int | None, top_p: float | None):
    """None (greedy captions) when no setting is given, else a SamplingConfig of those given."""
    from tessera.sampling import SamplingConfig

    if temperature is None and top_k is None and top_p is None:
        return None
    return SamplingConfig(top_k=top_k, top_p=top_p, temperature=temperature if temperature is not None else 1.0)
