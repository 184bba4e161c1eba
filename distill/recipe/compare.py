"""Scores of several models (rows, each over seeds) -> one comparison table (Markdown, CSV) and a figure.

`compare({"row name": [scores.json, ...], ...}, out_dir)` is the function the recipe's report
calls; `analysis/compare_transfer.py` is its command line. A path may be a scores JSON, a model
directory holding `scores.json`, or a recipe run directory (its `scores/<row>[-seedN].json` files
are grouped by row). Means and sample standard deviations are over the paths of a row (seeds);
a difference between two rows smaller than the spread of the difference is reported as "no
difference", never as a win.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

from distill import DistillError
from distill.io.files import atomic_write_text

# The comparison's rows, in the order a reader meets them (recipe row key -> label).
ROW_LABELS = {
    "target-base": "target base (no tuning)",
    "direct": "target + SFT on direct responses",
    "direct-masked": "target + SFT on direct responses with CoDIT's mask (beta 0)",
    "codit": "target + SFT on CoDIT responses",
    "best-of-n": "target + SFT on Best-of-N responses (judge-picked direct samples)",
    "gold-sft": "target + SFT on the teacher's own SFT data (text-route ceiling)",
    "weight-arithmetic": "same-arch target + chat vector",
    "source-post": "source post (teacher, upper bound)",
}

# (column key, header, path into scores.json, higher is better?)
COLUMNS = [
    ("if_prompt_strict", "IF prompt strict", ("if", "prompt_level_strict"), True),
    ("if_prompt_loose", "IF prompt loose", ("if", "prompt_level_loose"), True),
    ("if_inst_strict", "IF instr. strict", ("if", "inst_level_strict"), True),
    ("if_inst_loose", "IF instr. loose", ("if", "inst_level_loose"), True),
    ("knowledge_own", "knowledge (own facts)", ("knowledge", "own", "accuracy"), True),
    ("conflict_source_way", "conflicts: source's answer", ("knowledge", "conflict", "source_way"), None),
    ("perplexity", "held-out ppl", ("ppl", "perplexity"), False),
    ("bits_per_byte", "bits/byte", ("ppl", "bits_per_byte"), False),
    ("mean_words", "mean response words", ("if", "length", "mean_words"), None),
]
# The judge's columns (`distill evaluate --suite judge`), shown when some row has them
JUDGE_COLUMNS = [
    ("judge_score", "judge score (1-10)", ("judge", "mean"), True),
    ("judge_win_rate", "judge win rate %", ("judge", "win_rate"), True),
    ("judge_lc_win_rate", "judge LC win rate %", ("judge", "lc_win_rate"), True),
]


def _get(d: dict, path: tuple) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def load_scores(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "scores.json"
    if not p.is_file():
        raise DistillError(f"no scores at {p}; run `distill evaluate --model M --zoo DIR --out {p}` first")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DistillError(f"{p} is not valid JSON ({exc.msg}); rerun `distill evaluate` to rewrite it") from None


def collect_run_dir(run_dir: str | Path) -> dict[str, list[str]]:
    """A recipe run directory's `scores/*.json` grouped by row (the `-seedN` suffix stripped)."""
    files = sorted(Path(run_dir, "scores").glob("*.json"))
    groups: dict[str, list[str]] = {}
    for f in files:
        key = re.sub(r"-seed\d+$", "", f.stem)
        groups.setdefault(ROW_LABELS.get(key, key), []).append(str(f))
    order = list(ROW_LABELS.values())
    return dict(sorted(groups.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def pool_run_dirs(run_dirs) -> dict[str, list[str]]:
    """Rows of several run directories merged: each trained seed of each run is one more measurement."""
    rows: dict[str, list[str]] = {}
    for d in run_dirs:
        for row, paths in collect_run_dir(d).items():
            rows.setdefault(row, []).extend(paths)
    return rows


def _distinct(scores: list[dict]) -> list[dict]:
    """One entry per measurement. Identical scores under identical settings come from identical
    models (evaluation is deterministic), e.g. an untuned row or the chat vector shared by two
    run directories: one measurement, not two with a spread of zero. The model's path and the
    wall time are left out of the comparison, as each run directory has its own copy."""
    seen, out = [], []
    for s in scores:
        key = {k: v for k, v in s.items() if k not in ("model", "seconds")}
        if key not in seen:
            seen.append(key)
            out.append(s)
    return out


def mean_std(xs: list[float]) -> dict:
    """n, mean and sample std (None below two values) of the numbers that are not None or NaN."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return {"n": 0, "mean": None, "std": None}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"n": len(xs), "mean": mean, "std": std}


def _fmt(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "–"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


def verdict(a: dict, b: dict, higher_better: bool | None) -> tuple[float | None, str]:
    """(mean_a - mean_b, words): 'no difference' when |diff| <= the spread of the difference."""
    if a["mean"] is None or b["mean"] is None:
        return None, "–"
    diff = a["mean"] - b["mean"]
    if a["std"] is None and b["std"] is None:
        return diff, "n=1"
    spread = math.sqrt((a["std"] or 0.0) ** 2 + (b["std"] or 0.0) ** 2)
    if abs(diff) <= spread:
        return diff, "no difference"
    if higher_better is None:
        return diff, "higher" if diff > 0 else "lower"
    return diff, "better" if (diff > 0) == higher_better else "worse"


def default_pairs(rows: list[str]) -> list[tuple[str, str]]:
    lab = ROW_LABELS
    wanted = [(lab["codit"], lab["direct"]), (lab["direct-masked"], lab["direct"]), (lab["codit"], lab["direct-masked"]),
              (lab["codit"], lab["target-base"]), (lab["direct"], lab["target-base"]),
              (lab["codit"], lab["weight-arithmetic"]), (lab["codit"], lab["source-post"])]
    pairs = [(a, b) for a, b in wanted if a in rows and b in rows]
    return pairs or [(r, rows[0]) for r in rows[1:]]


def compare(runs: dict[str, list[str]], out_dir: str | Path, title: str = "Transfer of instruction following",
            pairs: list[tuple[str, str]] | None = None, figure: bool = True) -> dict:
    """Write comparison.md, comparison.csv (and comparison.png) into out_dir; return the table.

    Returns {"rows": {row: {column: {"n","mean","std"}}}, "pairs": [...], "markdown", "csv", "figure", "md"}.
    """
    if not runs:
        raise DistillError("nothing to compare: no rows with scores")
    out_dir = Path(out_dir)
    table: dict[str, dict] = {}
    loaded = {}
    for row, paths in runs.items():
        if not paths:
            raise DistillError(f"row {row!r} has no scores paths")
        loaded[row] = _distinct([load_scores(p) for p in paths])
    judged = [c for c in JUDGE_COLUMNS if any(_get(s, c[2]) is not None for sc in loaded.values() for s in sc)]
    columns = COLUMNS + judged
    for row, scores in loaded.items():
        table[row] = {key: mean_std([_get(s, path) for s in scores]) for key, _, path, _ in columns}
        table[row]["_runs"] = len(scores)
    rows = list(table)
    pairs = pairs if pairs is not None else default_pairs(rows)
    pair_rows = []
    for a, b in pairs:
        for key, header, _, better in columns:
            diff, words = verdict(table[a][key], table[b][key], better)
            pair_rows.append({"a": a, "b": b, "column": header, "diff": diff, "verdict": words})

    md = [f"# {title}", "", "Mean ± sample std over runs (seeds); n = distinct runs per row (identical scores of "
          "identical models, e.g. an untuned row shared by two run directories, count once).", "",
          "| row | n | " + " | ".join(h for _, h, _, _ in columns) + " |",
          "| --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for row in rows:
        md.append(f"| {row} | {table[row]['_runs']} | " + " | ".join(_fmt(table[row][k]) for k, _, _, _ in columns) + " |")
    if pairs:
        md += ["", "## Differences (row a − row b)", "",
               "A difference no larger than sqrt(std_a² + std_b²) is reported as no difference (≈).", "",
               "| a vs b | " + " | ".join(h for _, h, _, _ in columns) + " |",
               "| --- | " + " | ".join("---" for _ in columns) + " |"]
        for a, b in pairs:
            cells = []
            for p in (q for q in pair_rows if q["a"] == a and q["b"] == b):
                if p["diff"] is None:
                    cells.append("–")
                elif p["verdict"] == "no difference":
                    cells.append(f"≈ ({p['diff']:+.3f})")
                elif p["verdict"] == "n=1":
                    cells.append(f"{p['diff']:+.3f} (one run each, no spread)")
                else:
                    cells.append(f"{p['diff']:+.3f} {p['verdict']}")
            md.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    md += ["", "Perplexity is per token of each model's own tokenizer; bits/byte compares across tokenizers. "
           "Knowledge on own facts: the facts the model's family was pre-trained on (shared + own split)."]
    markdown = "\n".join(md) + "\n"

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "n"] + [f"{k}_{s}" for k, _, _, _ in columns for s in ("mean", "std")])
    for row in rows:
        w.writerow([row, table[row]["_runs"]] + [table[row][k][s] if table[row][k][s] is not None else ""
                                                 for k, _, _, _ in columns for s in ("mean", "std")])
    md_path, csv_path = out_dir / "comparison.md", out_dir / "comparison.csv"
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, buf.getvalue())
    fig_path = _figure(table, rows, out_dir / "comparison.png", title) if figure else None
    return {"rows": table, "pairs": pair_rows, "markdown": markdown, "md": str(md_path), "csv": str(csv_path),
            "figure": str(fig_path) if fig_path else None}


def _figure(table: dict, rows: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [c for c in COLUMNS if c[0] in ("if_prompt_strict", "if_prompt_loose", "knowledge_own",
                                             "conflict_source_way")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 1, 1]})
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        means = [table[row][k]["mean"] or 0.0 for k, _, _, _ in rates]
        errs = [table[row][k]["std"] or 0.0 for k, _, _, _ in rates]
        axes[0].bar([j + i * width for j in range(len(rates))], means, width, yerr=errs, capsize=3, label=row)
    axes[0].set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(rates))], [h for _, h, _, _ in rates])
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("fraction")
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    for ax, key, label in ((axes[1], "bits_per_byte", "held-out bits/byte"), (axes[2], "mean_words", "mean words")):
        means = [table[r][key]["mean"] or 0.0 for r in rows]
        errs = [table[r][key]["std"] or 0.0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), [str(i + 1) for i in range(len(rows))])
        ax.set_xlabel("row (legend order)")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
