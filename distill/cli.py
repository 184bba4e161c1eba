"""The `distill` command: one subcommand per pipeline stage.

Each stage module exposes `add_cli(subparsers)`, which adds its parser and sets
`func` on it; this file only wires them together, so stages stay independent.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from distill import DistillError, __version__

# (module, one-line summary) in pipeline order. A module is imported only when its
# subcommand is registered, so `distill --help` stays quick.
STAGES = [
    "distill.chat_vector",
    "distill.world.cli",
    "distill.synthesize",
    "distill.train",
    "distill.evaluate",
    "distill.recipe",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description=(
            "Move instruction-following from one model family to another: chat vectors "
            "in parameter space, CoDIT contrastive-decoding data in text space."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a stage not built yet must not break the others
            if exc.name == name:
                continue
            raise
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except DistillError as exc:
        print(f"distill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
