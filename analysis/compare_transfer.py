"""Comparison table of the transfer routes: Markdown + CSV + PNG, from scores or from models.

    # rows from a recipe run directory (runs/tiny/scores/<row>[-seedN].json):
    python analysis/compare_transfer.py --run-dir runs/tiny --out analysis/results/compare
    # rows from models, evaluated here (scores into OUT/scores/<row>[-seedN].json):
    python analysis/compare_transfer.py --target T --post P --tuned codit=M1,M2,M3 --tuned direct=M4,M5,M6 \
        [--weight-arithmetic W] --prompts EVAL.jsonl [--questions Q.jsonl] [--heldout H.jsonl] --out OUT
    # the same on a world directory: --zoo fills --target, --post (unless --run-dir is given) and the data
    python analysis/compare_transfer.py --zoo ZOO --tuned codit=M1,M2 --tuned direct=M3,M4 --out OUT
    # or rows named explicitly, each a comma-separated list of scores.json / model directories:
    python analysis/compare_transfer.py --out OUT \
        --row "target base (no tuning)=runs/x/target-base" \
        --row "target + SFT on CoDIT responses=m/codit-s0,m/codit-s1,m/codit-s2"

Rows of every source merge. --prompts are IF prompts with verifiable `constraints` (the world's
prompts/eval.jsonl layout); --questions the world's cloze facts; --heldout texts for perplexity.
As functions: `evaluate_models({row key: [models]}, out, ...)` writes the scores;
`distill.recipe.compare.compare({row: [paths]}, out_dir)` the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill import DistillError
from distill.recipe.compare import ROW_LABELS, compare, pool_run_dirs

# whose facts are "own" for the knowledge suite, per row key (tuned rows are target-family)
FAMILY = {"target-base": "target", "source-post": "source", "weight-arithmetic": "source"}


def evaluate_models(models: dict[str, list[str]], out, *, zoo=None, prompts=None, questions=None, heldout=None,
                    suites: tuple[str, ...] | None = None, **settings) -> dict[str, list[str]]:
    """Evaluate each model ({row key: [models, one per seed]}) with `distill.evaluate.run` into
    <out>/scores/<key>[-seedN].json; returns {row label: [scores paths]} for `compare`.
    `settings` are EvaluateConfig fields (limit, max_new_tokens, batch_size, device, dtype)."""
    from distill.evaluate.run import evaluate

    given = {"if": prompts or (zoo and Path(zoo, "prompts", "eval.jsonl")),
             "knowledge": questions or (zoo and Path(zoo, "knowledge", "questions.jsonl")),
             "ppl": heldout or (zoo and Path(zoo, "text", "heldout.jsonl"))}
    suites = tuple(suites) if suites else tuple(s for s, f in given.items() if f)
    missing = [s for s in suites if not given[s]]
    if not suites or missing:
        gap = f"; missing for {', '.join(missing)}" if missing else ""
        raise DistillError(f"models need evaluation data: --zoo ZOO, or --prompts EVAL.jsonl (IF) / --questions "
                           f"(knowledge) / --heldout (perplexity){gap}")
    rows: dict[str, list[str]] = {}
    (Path(out) / "scores").mkdir(parents=True, exist_ok=True)
    for key, refs in models.items():
        for i, ref in enumerate(refs):
            name = key if key in FAMILY else f"{key}-seed{i}"
            path = Path(out) / "scores" / f"{name}.json"
            evaluate(ref, zoo, suites=suites, out=path, family=FAMILY.get(key, "target"),
                     prompts=str(prompts) if prompts else None, questions=str(questions) if questions else None,
                     heldout=str(heldout) if heldout else None, **settings)
            rows.setdefault(ROW_LABELS.get(key, key), []).append(str(path))
    return rows


def _named_lists(specs: list[str], flag: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            raise SystemExit(f"{flag} {spec!r}: expected NAME=PATH[,PATH...]")
        out.setdefault(name, []).extend(x for x in paths.split(",") if x)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_transfer.py", description=__doc__, usage=(
        "%(prog)s --out DIR (--run-dir RUN ... | --row NAME=PATHS ... | MODELS DATA) [options]\n"
        "  MODELS: --zoo ZOO and/or --target T --post P --tuned METHOD=M1,M2 ... [--weight-arithmetic W]\n"
        "  DATA:   --zoo ZOO, or --prompts EVAL.jsonl [--questions Q.jsonl] [--heldout H.jsonl]"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for comparison.md/.csv/.png (and scores/)")
    g = p.add_argument_group("rows from scores already written")
    g.add_argument("--run-dir", action="append", default=[],
                   help="a recipe run directory; its scores/*.json become rows (repeatable; rows merge)")
    g.add_argument("--row", action="append", default=[], metavar="NAME=PATH[,PATH...]",
                   help="a row: its name and its scores files or model directories, one per seed (repeatable)")
    g = p.add_argument_group("rows from models, evaluated here (paths or Hugging Face cache ids)")
    g.add_argument("--target", help="target base model (default <zoo>/target-base without --run-dir)")
    g.add_argument("--post", help="source post model, the teacher (default <zoo>/source-post without --run-dir)")
    g.add_argument("--weight-arithmetic", help="same-architecture target + chat vector (RUN/models/weight-arithmetic)")
    g.add_argument("--tuned", action="append", default=[], metavar="METHOD=MODEL[,MODEL...]",
                   help="tuned targets of one method (codit, direct, direct-masked, or any name), one per seed")
    g = p.add_argument_group("evaluation data and settings (for models)")
    g.add_argument("--zoo", type=Path, help="world directory: its prompts/eval.jsonl, knowledge/questions.jsonl, "
                                            "text/heldout.jsonl, and (without --run-dir) --target/--post")
    g.add_argument("--prompts", help="IF prompts JSONL with `instruction` and `constraints`")
    g.add_argument("--questions", help="knowledge questions JSONL (`prompt`, `answer`, `split`)")
    g.add_argument("--heldout", help="held-out texts JSONL (`text`) for perplexity")
    g.add_argument("--suites", help="comma list of if,knowledge,ppl (default: those with data)")
    g.add_argument("--limit", type=int, help="evaluate on the first N rows of each file")
    g.add_argument("--max-new-tokens", type=int, default=256, help="IF response length (default 256)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--device", help="default: cuda if available, else cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--title", default="Transfer of instruction following", help="title of the table and figure")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.zoo is not None and not args.run_dir:
        args.target = args.target or str(args.zoo / "target-base")
        args.post = args.post or str(args.zoo / "source-post")
    models = {"target-base": [args.target] if args.target else []}
    models.update(_named_lists(args.tuned, "--tuned"))
    models["weight-arithmetic"] = [args.weight_arithmetic] if args.weight_arithmetic else []
    models["source-post"] = [args.post] if args.post else []
    order = list(ROW_LABELS)
    models = dict(sorted(((k, v) for k, v in models.items() if v),
                         key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    if not (args.run_dir or args.row or models):
        p.error("nothing to compare: give --run-dir RUN, --row NAME=PATHS, or models (--zoo ZOO, or --target/--post/"
                "--tuned/--weight-arithmetic with --prompts EVAL.jsonl)")
    try:
        runs = pool_run_dirs(args.run_dir)
        for name, paths in _named_lists(args.row, "--row").items():
            runs.setdefault(name, []).extend(paths)
        if models:
            evaluated = evaluate_models(
                models, args.out, zoo=args.zoo, prompts=args.prompts, questions=args.questions,
                heldout=args.heldout, suites=tuple(args.suites.split(",")) if args.suites else None,
                limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                device=args.device, dtype=None if args.dtype == "auto" else args.dtype)
            for name, paths in evaluated.items():
                runs.setdefault(name, []).extend(paths)
            labels = list(ROW_LABELS.values())
            runs = dict(sorted(runs.items(), key=lambda kv: labels.index(kv[0]) if kv[0] in labels else len(labels)))
        result = compare(runs, args.out, title=args.title, figure=not args.no_figure)
    except DistillError as exc:
        print(f"compare_transfer: error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print(f"written: {result['md']}, {result['csv']}" + (f", {result['figure']}" if result["figure"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
