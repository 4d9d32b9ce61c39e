"""``insloc-train``: pretraining, weight export, fine-tuning and evaluation.

Each subcommand lives in the module that implements it; the module exposes
``add_subcommands(subparsers)``, which adds its parsers with ``set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import sys

from insloc_hub.cli import ArgumentParser, run_cli
from insloc_hub.training import demo
from insloc_hub.training.pretraining import pretrain
from insloc_hub.training.transfer import finetune


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="insloc-train",
        description="InsLoc pretraining (faithful to the official recipe), detector fine-tuning and evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (pretrain, finetune, demo):  # in the order of --help
        module.add_subcommands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, long_running=True)


if __name__ == "__main__":
    sys.exit(main())
