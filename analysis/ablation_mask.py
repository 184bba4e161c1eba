"""Ablation: is CoDIT's effect the contrast or the plausibility mask?

CoDIT differs from direct sampling in two ways: the amateur's log-probs are subtracted (beta) and
tokens below alpha x the expert's top probability are masked. The recipe method `direct-masked`
is the missing corner, direct sampling from the teacher WITH CoDIT's mask (alpha from the recipe,
beta 0), trained and evaluated like the other rows. This script pools several recipe runs (e.g.
two synthesis seeds, so a row's spread covers the synthesis draw as well as the training seed)
into one table, and scores each training set itself against its prompts' constraints.

    for seed in 0 1; do
      distill run recipes/tiny.yaml --set run_dir=runs/mask-$seed --set synthesis.seed=$seed \
          --set "synthesis.methods=[codit, direct, direct-masked]"
    done
    python analysis/ablation_mask.py --run-dir runs/mask-0 --run-dir runs/mask-1 --out analysis/results/ablation_mask
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from distill import DistillError
from distill.recipe.compare import ROW_LABELS, compare, pool_run_dirs

ROW = "direct-masked"


def load_run(run_dir: Path) -> dict:
    """The recipe of a finished run that has the masked-direct row."""
    recipe_file = run_dir / "recipe.json"
    if not recipe_file.is_file():
        raise DistillError(f"{recipe_file} not found; --run-dir must be a `distill run` run directory")
    if not list((run_dir / "scores").glob(f"{ROW}-seed*.json")):
        raise DistillError(f"{run_dir} has no {ROW} row; run the recipe again with it (finished stages are "
                           f"reused): distill run RECIPE --set run_dir={run_dir} "
                           f"--set \"synthesis.methods=[codit, direct, {ROW}]\"")
    return json.loads(recipe_file.read_text())


def pooled_comparison(run_dirs: list[Path], out: Path) -> dict:
    rows = pool_run_dirs(run_dirs)  # untuned rows (base, teacher, chat vector) are shared: compare counts them once
    label = {key: ROW_LABELS[key] for key in ("direct", ROW, "codit", "target-base")}
    pairs = [(label[ROW], label["direct"]), (label["codit"], label[ROW]), (label["codit"], label["direct"]),
             (label[ROW], label["target-base"])]
    return compare(rows, out, pairs=[(a, b) for a, b in pairs if a in rows and b in rows],
                   title="Ablation: direct sampling with and without CoDIT's mask")


def data_table(runs: list[tuple[Path, dict]]) -> str:
    """How well each training set itself follows its prompts' constraints (the teacher's samples,
    before any fine-tuning): what the student can learn at best."""
    from distill.io.files import iter_jsonl
    from distill.evaluate.metrics import instruction_following
    from distill.evaluate.checkers import check_loose, check_strict

    lines = ["| training data | synthesis seed | rows | IF prompt strict | IF instr. strict | mean words | repetitive |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    # recipe.json keeps an environment reference as written (${DISTILL_PROMPTS}): the shell's value now
    prompts = [{row["id"]: row for _, row in iter_jsonl(Path(os.path.expandvars(recipe["prompts"]["synthesis"])),
                                                        "prompts")}
               for _, recipe in runs]  # once per run, not per dataset
    for key in ("direct", ROW, "codit"):
        for (run_dir, recipe), by_id in zip(runs, prompts):
            path = run_dir / "data" / key / "data" / "train.jsonl"
            if not path.is_file():
                continue
            rows = [row for _, row in iter_jsonl(path, "synthesized data")]
            scores = instruction_following([r["response"] for r in rows], [by_id[r["id"]] for r in rows],
                                           check_strict, check_loose)
            words = sum(len(r["response"].split()) for r in rows) / len(rows)
            repetitive = sum(bool(r.get("repetitive")) for r in rows) / len(rows)
            name = ROW_LABELS[key].replace("target + SFT on ", "")
            lines.append(f"| {name} | {recipe['synthesis']['seed']} | {len(rows)} | {scores['prompt_level_strict']:.3f} | "
                         f"{scores['inst_level_strict']:.3f} | {words:.1f} | {repetitive:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, action="append",
                   help="a finished recipe run directory (holds recipe.json); repeatable, rows pool")
    p.add_argument("--out", required=True, help="output directory for comparison.md/.csv/.png and training_data.md")
    args = p.parse_args(argv)
    try:
        runs = [(Path(d), load_run(Path(d))) for d in args.run_dir]
        result = pooled_comparison([d for d, _ in runs], Path(args.out))
    except DistillError as exc:
        print(f"ablation_mask: error: {exc}", file=sys.stderr)
        return 2
    table = data_table(runs)
    (Path(args.out) / "training_data.md").write_text(
        "# The training data itself\n\nThe teacher's samples scored on their own prompts' constraints "
        "(before any fine-tuning).\n\n" + table)
    print(result["markdown"])
    print("The training data itself (teacher samples scored on their own prompts' constraints):\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
