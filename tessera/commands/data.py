"""`tessera data check`: read every sample of a set of shards once and report what a training run would meet."""

from __future__ import annotations

import argparse
import json

from tessera.commands.shards import max_pixels_argument


def add_parser(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="read every sample once; print a JSON report; exit 1 on a bad shard")
    check.add_argument("shards", nargs="+", help="shard paths or brace patterns, e.g. '/data/{00000..00099}.tar'")
    check.add_argument("--text-length", type=int, default=64)
    check.add_argument("--tokenizer", default="clip-bpe")
    check.add_argument("--workers", type=int, default=None, help="processes; one per CPU by default")
    max_pixels_argument(check, "counted as skipped, as the training reader skips them")
    check.set_defaults(run=run)

def run(args: argparse.Namespace) -> int:
    from datamodules.check import check_shards

    report = check_shards(args.shards, args.text_length, args.tokenizer, args.workers, args.max_pixels)
    print(json.dumps(report, indent=1))
    return 1 if report["unreadable_shards"] else 0
