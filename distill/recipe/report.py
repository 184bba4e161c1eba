"""The run's `report.md`: the comparison table, its figure, the theory tables (when they ran), the
notes, the settings, the timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Collection

import yaml

from distill.recipe.compare import collect_run_dir, compare
from distill.io.files import atomic_write_text
from distill.recipe.schema import Recipe, saved_dict


def write_report(run_dir: Path, recipe: Recipe, recipe_path: Path, stages: dict[str, dict], notes: list[str],
                 ran: Collection[str] = ()) -> Path:
    """`ran`: the stages this invocation ran; the others in `stages` (stages.json) were cached."""
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
    lines += stage_lines(stages, ran)
    lines += ["## Settings", "", "```yaml",
              yaml.safe_dump(saved_dict(recipe), sort_keys=False).strip(), "```", ""]  # no environment values
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def stage_lines(stages: dict[str, dict], ran: Collection[str] = ()) -> list[str]:
    """The "Stages" section: each stage's wall time, the GPUs it held and their GPU-hours (wall time x
    GPUs); a stage this invocation did not run says "cached", with what it took when it ran."""
    lines = ["## Stages", "", "| stage | this run | wall time | GPUs | GPU-hours | outputs |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    totals = {"ran": [0.0, 0.0], "cached": [0.0, 0.0]}  # seconds, GPU-hours
    counts = {"ran": 0, "cached": 0}
    for name, entry in stages.items():
        if name == "report":  # being written now: its own time is not known yet
            continue
        status = "ran" if name in ran else "cached"
        seconds, gpus, procs = entry.get("seconds"), entry.get("gpus"), entry.get("processes", 1)
        hours = seconds * gpus / 3600 if seconds is not None and gpus is not None else None
        counts[status] += 1
        totals[status][0] += seconds or 0.0
        totals[status][1] += hours or 0.0
        wall = "not recorded" if seconds is None else _duration(seconds)
        if status == "cached" and seconds is not None:
            wall += " when it ran"
        held = ("not recorded" if gpus is None else str(gpus) if gpus else
                "cpu" if procs == 1 else f"cpu, {procs} processes")
        gpu_hours = "not recorded" if hours is None else _hours(hours)
        outs = ", ".join(f"{k}: `{v}`" for k, v in entry.get("outputs", {}).items())
        lines.append(f"| {name} | {status} | {wall} | {held} | {gpu_hours} | {outs} |")
    (now_s, now_h), (old_s, old_h) = totals["ran"], totals["cached"]
    summary = f"This run: {_stages(counts['ran'])}, {_duration(now_s)}, {_hours(now_h)} GPU-hours"
    recorded = [e.get("gpus") for name, e in stages.items() if name != "report"]
    if recorded and all(g == 0 for g in recorded):
        summary += " (every stage ran on the CPU)"
    if counts["cached"]:
        summary += (f"; {_stages(counts['cached'])} cached, which took {_duration(old_s)} and {_hours(old_h)} "
                    f"GPU-hours when they ran")
    return lines + ["", summary + ".", ""]


def _hours(h: float) -> str:
    return "0" if h == 0 else f"{h:.2f}" if h >= 0.01 else "< 0.01"


def _stages(n: int) -> str:
    return f"{n} stage{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


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
