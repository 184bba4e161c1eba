"""The `distill` command: one subcommand per pipeline stage.

Each stage module exposes `add_cli(subparsers, summary)`, which adds its parser and sets
`func` on it; this file only wires them together, so stages stay independent.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from distill import DistillError, __version__
# (command, module, one-line summary) in pipeline order. Only the module of the command being
# run is imported, so `distill --help` lists the stages without importing torch.
STAGES = [
    ("chat-vector", "distill.chat_vector.cli", "extract / apply / inspect chat vectors (parameter space)"),
    ("zoo", "distill.world.cli", "the embedded synthetic world and its tiny model zoo"),
    ("synthesize", "distill.synthesize.cli", "write an instruction dataset by CoDIT contrastive decoding "
                                         "(or direct sampling)"),
    ("train", "distill.train.cli", "fine-tune a target on a dataset with the HF Trainer + DeepSpeed"),
    ("evaluate", "distill.evaluate.cli", "score a model: instruction following, knowledge, perplexity "
                                     "(and lm-eval tasks)"),
    ("run", "distill.recipe.pipeline", "run a recipe end to end (chat vector, synthesis, training, evaluation, report)"),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser of the command named in argv; the other stages as one-line entries."""
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
    chosen = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    for command, module, summary in STAGES:
        if command == chosen:
            importlib.import_module(module).add_cli(sub, summary)
            _accept_verbose_anywhere(sub.choices[command])
        else:
            sub.add_parser(command, help=summary)
    return parser


def _accept_verbose_anywhere(parser: argparse.ArgumentParser) -> None:
    """`-v` after the subcommand too (`distill run -v recipe.yaml`), not only before it.
    SUPPRESS as default, so a subcommand without -v keeps the top level's value."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _accept_verbose_anywhere(child)


# Commands whose rerun continues where an interrupted run stopped (the others rewrite their output whole).
RESUMING = ("synthesize", "train", "run")


def _output_of(args) -> str | None:
    """The output a command writes, named in a storage error whose exception carries no path."""
    for key in ("out", "merge"):
        if getattr(args, key, None):
            return str(getattr(args, key))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
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
    except Exception as exc:  # noqa: BLE001 - disk full / permissions: one line; anything else re-raised
        from distill.io.validate import storage_error

        err = storage_error(exc, _output_of(args), resumes=args.command in RESUMING)
        if err is None:
            raise
        print(f"distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
