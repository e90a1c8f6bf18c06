"""The `tessera` command line: each verb's options and work in its own module of tessera/commands/
(shards.py, data.py, quickstart.py, fit.py for the LightningCLI verbs, evaluate_shapes.py and
evaluate_coco.py, sample.py, caption.py, export.py, tokenize.py, compress.py, submit.py); this module only joins them.

    tessera shards synthetic --out DIR [--num-samples N] [--image-size S] [--seed X] [--jitter]
    tessera shards folder --images DIR --captions FILE --out DIR [--max-pixels P] [--overwrite]
    tessera shards coco --annotations FILE --images DIR --out DIR
    tessera data check SHARDS [--text-length N] [--max-pixels P]
    tessera quickstart [--out DIR] [--tokenizer-steps N] [--prior-steps N] [--minutes M]
    tessera fit --config configs/tokenizer/tiny_shapes.yaml --config configs/data/shapes.yaml
    tessera validate|test|predict ... (LightningCLI: `tessera fit --help` lists every option)
    tessera export --checkpoint RUN.ckpt --out DIR
    tessera caption --model LLM_CKPT_OR_EXPORT_DIR IMAGE_OR_DIR... --out FILE.json
    tessera tokenize --tokenizer CKPT_OR_EXPORT_DIR --shards PATTERN --out DIR [--rank R --world-size W]
    tessera compress --prior CKPT_OR_EXPORT_DIR IMAGE_OR_IDS... --out FILE [--caption TEXT]
    tessera decompress FILE --prior CKPT_OR_EXPORT_DIR --out DIR [--png]
"""

from __future__ import annotations

import argparse
import logging
import sys

from tessera.commands import caption, compress, data, export, quickstart, sample, shards, submit, tokenize
from tessera.commands.evaluate_coco import add_coco_fid_parsers
from tessera.commands.evaluate_shapes import add_shapes_parser


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
    shards.add_parser(commands)
    data.add_parser(commands)
    quickstart.add_parser(commands)
    evaluate = commands.add_parser("evaluate", help="FID, CLIP score and caption fidelity")
    evaluations = evaluate.add_subparsers(dest="evaluation", required=True)
    add_shapes_parser(evaluations)
    add_coco_fid_parsers(evaluations)
    sample.add_parser(commands)
    caption.add_parser(commands)
    export.add_parser(commands)
    tokenize.add_parser(commands)
    compress.add_parser(commands)
    submit.add_parser(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
