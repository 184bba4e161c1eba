"""`distill train` and `python -m distill.train`: the command line, generated from `TrainConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from distill import DistillError
from distill.config import HelpFormatter, add_arguments, from_args
from distill.train.config import TrainConfig

DESCRIPTION = """Supervised fine-tuning of a target model (any architecture) on instruction/response rows, loss on
assistant tokens only, with the Hugging Face Trainer and DeepSpeed ZeRO.

  one process:   distill train --model T --data D --out M
  several GPUs:  deepspeed --num_gpus 8 -m distill.train --model T --data D --out M
  several nodes: deepspeed --hostfile hosts -m distill.train ...

Rerun the same command after an interruption to resume."""


def add_cli(subparsers, summary: str | None = None):
    p = subparsers.add_parser("train", help=summary, description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(p, TrainConfig)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from distill.train.run import train

    print(train(from_args(TrainConfig, args)))
    return 0


def train_flags(cfg) -> list[str]:
    """The `distill train` flags that give `cfg` (what `python -m distill.train` parses back to it):
    each setting that differs from TrainConfig's default, in field order."""
    flags = []
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name in ("model", "data", "out") or v != f.default:
            if f.name == "deepspeed" and v is None:
                v = "none"
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                flags += [flag] if v else ["--no-" + f.name.replace("_", "-")]
            else:
                flags += [flag, str(v)]
    return flags


def train_command(cfg) -> list[str]:
    """The `distill train` command line of a training stage (logged when the stage starts)."""
    return ["distill", "train", *train_flags(cfg)]


def main(argv=None) -> int:
    """`python -m distill.train ARGS` = `distill train ARGS`; accepts the `--local_rank=N` that
    the deepspeed launcher puts first (`distill.cli` would reject it before the subcommand)."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m distill.train")
    add_cli(parser.add_subparsers(dest="command")).prog = "python -m distill.train"  # no stray `train`
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return _run(args)
    except DistillError as exc:
        print(f"distill train: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - disk full / permissions: one line (as distill.cli.main); else raised
        from distill.io.validate import storage_error

        err = storage_error(exc, args.out)
        if err is None:
            raise
        print(f"distill train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
