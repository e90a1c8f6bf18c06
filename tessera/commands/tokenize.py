"""`tessera tokenize`: caption-image shards -> token shards for stage 2, one rank's share of them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
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
    tokenize.set_defaults(run=run)

def run(args: argparse.Namespace) -> int:
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
