"""`tessera export`: a tokenizer, prior or fine-stage checkpoint (file or sharded directory) -> model.safetensors
+ config.json; an LLM backbone's checkpoint -> a transformers directory (see lightning_modules/llm.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="a VQGAN, prior or fine-stage checkpoint -> model.safetensors + config.json (an LLM backbone's: a transformers directory)")
    export.add_argument("--checkpoint", required=True, type=Path, help="a VQGAN, prior (TextImagePrior, RQTransformerPrior, PixelCNNPrior, ImageTransformerPrior), FineStage or LLMTextImageModel checkpoint (.ckpt, FSDP sharded)")
    export.add_argument("--out", required=True, type=Path, help="directory to write")
    export.add_argument("--no-ema", action="store_true", help="export the live weights even if the run kept an EMA")
    export.set_defaults(run=run)

def run(args: argparse.Namespace) -> int:
    from lightning_modules.fine_stage import export_fine_stage
    from lightning_modules.fsdp import checkpoint_hyperparameters
    from lightning_modules.llm import export_llm
    from lightning_modules.prior import export_prior
    from lightning_modules.vqgan import load_tokenizer

    # a TextImagePrior's hyperparameters hold its transformer's config, an LLMTextImageModel's its
    # backbone, a FineStage's its network's (fine_stage, which a prior's name a path with), a
    # VQGAN's its quantizer's
    hyperparameters = checkpoint_hyperparameters(args.checkpoint)
    if "backbone" in hyperparameters:
        config = export_llm(args.checkpoint, args.out)
        print(f"[export] transformers causal LM with {config['codebook_size']} image tokens: {args.out}")
        return 0
    if "transformer" in hyperparameters:
        shape = export_prior(args.checkpoint, args.out)["transformer"]
        print(f"[export] prior, {shape['n_layer']} blocks of width {shape['n_embd']}: {args.out}")
        return 0
    if "fine_stage" in hyperparameters:
        shape = export_fine_stage(args.checkpoint, args.out)["fine_stage"]
        print(f"[export] fine stage, {shape['n_layer']} blocks of width {shape['n_embd']}: {args.out}")
        return 0
    tokenizer = load_tokenizer(args.checkpoint, use_ema=not args.no_ema)
    tokenizer.save_pretrained(args.out)
    print(f"[export] {tokenizer.codebook_size} codes, f{tokenizer.downsample_factor}: {args.out}")
    return 0
