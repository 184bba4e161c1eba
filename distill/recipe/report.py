"""The run's `report.md`: the comparison table, its figure, the theory tables (when they ran), the
notes, the settings, the timings."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from distill.recipe.compare import collect_run_dir, compare
from distill.io.files import atomic_write_text
from distill.recipe.schema import Recipe, saved_dict


def write_report(run_dir: Path, recipe: Recipe, recipe_path: Path, stages: dict[str, dict], notes: list[str]) -> Path:
    run_dir = Path(run_dir)
    lines = [f"# distill run: {recipe.name}", "", f"Recipe: `{recipe_path}`; run directory: `{run_dir}`.", ""]
    groups = collect_run_dir(run_dir)  # scores/<row>[-seedN].json, grouped by row
    lines += ["## Comparison", ""]
    if groups:
        result = compare(groups, run_dir / "comparison", title=f"Transfer of instruction following ({recipe.name})")
        body = result["markdown"].strip().split("\n", 1)[1].strip()  # drop its title: this report has one
        lines += [body, ""]
        if result.get("figure"):
            lines += [f"![comparison]({Path(result['figure']).relative_to(run_dir)})", ""]
        lines += [f"CSV: `{Path(result['csv']).relative_to(run_dir)}`.", ""]
    else:
        lines += ["No scores: evaluation did not run (see notes).", ""]
    lines += _theory(run_dir, recipe, stages)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Stages", "", "| stage | seconds | outputs |", "| --- | ---: | --- |"]
    for name, entry in stages.items():
        outs = ", ".join(f"{k}: `{v}`" for k, v in entry.get("outputs", {}).items())
        lines.append(f"| {name} | {entry.get('seconds', '')} | {outs} |")
    total = sum(float(e.get("seconds", 0)) for e in stages.values())
    lines += ["", f"Total stage time: {total / 60:.1f} min.", "", "## Settings", "", "```yaml",
              yaml.safe_dump(saved_dict(recipe), sort_keys=False).strip(), "```", ""]  # no environment values
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _theory(run_dir: Path, recipe: Recipe, stages: dict[str, dict]) -> list[str]:
    """A "Theory" section: a link to each theory stage's table (of the stages this recipe runs and
    that finished), with its headline numbers."""
    items = []
    for stage, on, what in (("theory-t1", recipe.theory.t1, "T1, the source pair linearised along Δ"),
                            ("theory-t3", recipe.theory.t3, "T3, tuned-target vs source log-ratios on the same texts")):
        outputs = stages.get(stage, {}).get("outputs", {})
        table = Path(outputs.get("table", ""))
        if not on or not outputs.get("table") or not table.is_file():
            continue
        rel = table.relative_to(run_dir) if table.is_relative_to(run_dir) else table
        try:
            headline = _headline(stage, json.loads(Path(outputs["numbers"]).read_text()))
        except (KeyError, OSError, ValueError, TypeError):
            headline = ""
        items.append(f"- {what}: [{rel}]({rel}){headline}")
    return ["## Theory", ""] + items + [""] if items else []


def _num(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _headline(stage: str, data: dict) -> str:
    if stage == "theory-t1":
        rows = {r["key"]: r for r in data["rows"]}
        if "cos" not in rows:
            return " (no response positions to measure)"
        cos = rows["cos"]
        return (f". Centred cosine(lp_post − lp_base, J·Δ) {_num(cos['mean'])} over {cos['positions']} positions;"
                f" KL(CoDIT ‖ softmax(J·Δ)) {_num(rows['kl_codit_lin']['mean'])} against"
                f" KL(CoDIT ‖ direct) {_num(rows['kl_codit_direct']['mean'])}.")
    rows = data["rows"]
    control = [r for r in rows if r.get("method") == "control"]
    means = [r for r in rows if "spearman std" in r]  # the per-method means over seeds
    parts = [f"{r['method']} {_num(r.get('spearman'))}" for r in control + means]
    return f". Spearman with the source's log-ratio: {', '.join(parts)}." if parts else ""
