"""`distill synthesize`: the command line, generated from `SynthesizeConfig` (distill.config)."""

from __future__ import annotations

from pathlib import Path

from distill import DistillError
from distill.config import HelpFormatter, add_arguments, from_args
from distill.synthesize import run
from distill.synthesize.config import SynthesizeConfig

REQUIRED = ("expert", "prompts", "out")  # unless --merge, which argparse cannot say itself


def add_cli(subparsers, summary: str | None = None) -> None:
    p = subparsers.add_parser(
        "synthesize", help=summary,
        usage="distill synthesize --expert E [--amateur A] --prompts P --out D [options]\n"
              "       distill synthesize --merge D",
        description=run.__doc__, formatter_class=HelpFormatter)
    add_arguments(p, SynthesizeConfig, optional=REQUIRED)
    p.add_argument("--merge", metavar="D", help="only join the shards of the run in D into the final dataset")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.merge:
        from distill.io.locking import output_lock
        from distill.synthesize.records import merge

        with output_lock(args.merge, "synthesis output") as lock, lock.critical():
            merged = merge(Path(args.merge))
        if merged is None:
            raise DistillError(f"{args.merge}: some prompts have no row yet; rerun the synthesis to finish them")
        print(args.merge)
        return 0
    missing = [f"--{k}" for k in REQUIRED if not getattr(args, k)]
    if missing:
        raise DistillError(f"missing {', '.join(missing)}; see `distill synthesize --help`")
    print(run.synthesize(from_args(SynthesizeConfig, args)))
    return 0
