"""The run's `report.md`: the comparison table, its figure, the notes, the settings, the timings."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from distill.fsutil import atomic_write_text
from distill.recipe_schema import Recipe, as_dict

# Row names of the comparison, in the order a reader meets them.
ROW_LABELS = {
    "target-base": "target base (no tuning)",
    "direct": "target + SFT on direct responses",
    "codit": "target + SFT on CoDIT responses",
    "weight-arithmetic": "same-arch target + chat vector",
    "source-post": "source post (teacher, upper bound)",
}


def group_scores(scores: dict[str, str | None]) -> dict[str, list[str]]:
    """{'codit-seed0': path, 'codit-seed1': path, ...} -> {label: [paths]} in ROW_LABELS order."""
    groups: dict[str, list[str]] = {}
    for row, path in scores.items():
        if not path or not Path(path).exists():
            continue
        key = re.sub(r"-seed\d+$", "", row)
        groups.setdefault(ROW_LABELS.get(key, key), []).append(path)
    order = list(ROW_LABELS.values())
    return dict(sorted(groups.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def write_report(run_dir: Path, recipe: Recipe, recipe_path: Path, scores: dict[str, str | None],
                 stages: dict[str, dict], notes: list[str]) -> Path:
    from distill.compare import compare

    run_dir = Path(run_dir)
    lines = [f"# distill run: {recipe.name}", "", f"Recipe: `{recipe_path}`; run directory: `{run_dir}`.", ""]
    groups = group_scores(scores)
    if groups:
        result = compare(groups, run_dir / "comparison")
        lines += ["## Comparison", "", result["markdown"].strip(), ""]
        if result.get("figure"):
            lines += [f"![comparison]({Path(result['figure']).relative_to(run_dir)})", ""]
        lines += [f"CSV: `{Path(result['csv']).relative_to(run_dir)}`.", ""]
    else:
        lines += ["## Comparison", "", "No scores: evaluation did not run (see notes).", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Stages", "", "| stage | seconds | outputs |", "| --- | ---: | --- |"]
    for name, entry in stages.items():
        outs = ", ".join(f"{k}: `{v}`" for k, v in entry.get("outputs", {}).items())
        lines.append(f"| {name} | {entry.get('seconds', '')} | {outs} |")
    total = sum(float(e.get("seconds", 0)) for e in stages.values())
    lines += ["", f"Total stage time: {total / 60:.1f} min.", "", "## Settings", "", "```yaml",
              yaml.safe_dump(as_dict(recipe), sort_keys=False).strip(), "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
