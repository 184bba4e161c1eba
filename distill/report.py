"""The run's `report.md`: the comparison table, its figure, the notes, the settings, the timings."""

from __future__ import annotations

from pathlib import Path

import yaml

from distill.evaluate_compare import collect_run_dir, compare
from distill.fsutil import atomic_write_text
from distill.recipe_schema import Recipe, as_dict


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
