"""Comparison table of the transfer routes: Markdown + CSV + PNG from scores files.

    # rows from a recipe run directory (runs/tiny/scores/<row>[-seedN].json):
    python analysis/compare_transfer.py --run-dir runs/tiny --out analysis/results/compare
    # or rows named explicitly, each a comma-separated list of scores.json / model directories:
    python analysis/compare_transfer.py --out OUT \
        --row "target base (no tuning)=runs/x/target-base" \
        --row "target + SFT on CoDIT responses=m/codit-s0,m/codit-s1,m/codit-s2"

As a function: `from distill.evaluate_compare import compare; compare({row: [paths]}, out_dir)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill import DistillError  # noqa: E402
from distill.evaluate_compare import compare, pool_run_dirs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", action="append", default=[],
                   help="a recipe run directory; its scores/*.json become rows (repeatable; rows merge)")
    p.add_argument("--row", action="append", default=[], metavar="NAME=PATH[,PATH...]",
                   help="a row: its name and its scores files or model directories, one per seed (repeatable)")
    p.add_argument("--out", required=True, help="output directory for comparison.md/.csv/.png")
    p.add_argument("--title", default="Transfer of instruction following", help="title of the table and figure")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    runs = pool_run_dirs(args.run_dir)
    for spec in args.row:
        name, sep, paths = spec.partition("=")
        if not sep or not paths:
            raise SystemExit(f"--row {spec!r}: expected NAME=PATH[,PATH...]")
        runs.setdefault(name, []).extend(x for x in paths.split(",") if x)
    try:
        result = compare(runs, args.out, title=args.title, figure=not args.no_figure)
    except DistillError as exc:
        print(f"compare_transfer: error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"written: {result['md']}, {result['csv']}" + (f", {result['figure']}" if result["figure"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
