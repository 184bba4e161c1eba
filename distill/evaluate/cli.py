"""`distill evaluate`: the command line, generated from `EvaluateConfig`."""

from __future__ import annotations

import argparse

from distill.config import HelpFormatter, add_arguments, from_args
from distill.evaluate import run
from distill.evaluate.config import EvaluateConfig
from distill.evaluate.run import run_evaluation, summary_lines


def add_cli(subparsers, summary: str | None = None) -> None:
    p = subparsers.add_parser("evaluate", help=summary, description=run.__doc__, formatter_class=HelpFormatter)
    add_arguments(p, EvaluateConfig)
    p.add_argument("--no-responses", dest="save_responses", action="store_false", help=argparse.SUPPRESS)  # older
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    scores = run_evaluation(from_args(EvaluateConfig, args))
    if scores is not None:  # None: a rank whose part another rank merges (distill.evaluate.shards)
        print("\n".join(summary_lines(scores)))
    return 0
