"""The dose study's numbers made into results: per-point statistics, the smallest detectable
difference (MDE), the Markdown / CSV / JSON tables and the figure (`analysis/dose_study.py` runs
the study and calls these)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from statistics import NormalDist

from distill.io.files import atomic_write_json, atomic_write_text

if __package__:
    from .mechanism import fmt, stats
else:  # python analysis/dose_study.py
    from mechanism import fmt, stats

METRICS = [
    ("if_prompt_strict", "IF prompt strict", ("if", "prompt_level_strict")),
    ("if_prompt_loose", "IF prompt loose", ("if", "prompt_level_loose")),
    ("knowledge_own", "knowledge (own facts)", ("knowledge", "own", "accuracy")),
    ("conflict_source_way", "conflicts: source's answer", ("knowledge", "conflict", "source_way")),
]
Z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.80)
MDE_RULE = ("MDE = (z_0.975 + z_0.80) * s * sqrt(2/n): two methods at one size, two-sided 5 %, 80 % power; "
            "null (n/a) when no method has two runs (or draws) at that size")
REFERENCES = {"target-base": "target base (no tuning)", "source-post": "source post (teacher)"}



def aggregate(records: list[dict], methods: list[str], sizes: list[int]) -> dict:
    """{method: {size: {metric: stats over runs, "draw_means": {metric: stats over per-draw means}}}}."""
    points: dict = {}
    for m in methods:
        for n in sizes:
            runs = [r for r in records if r["method"] == m and r["size"] == n]
            draws = sorted({r["draw"] for r in runs})
            point = {k: stats([r["metrics"][k] for r in runs]) for k, _, _ in METRICS}
            point["runs"], point["rows"] = len(runs), stats([r["rows"] for r in runs])
            point["draw_means"] = {k: stats([stats([r["metrics"][k] for r in runs if r["draw"] == d])["mean"]
                                             for d in draws]) for k, _, _ in METRICS}
            points.setdefault(m, {})[n] = point
    return points


def pooled_mde(groups: list[dict]) -> dict:
    """MDE from the groups' (n, sd): pooled sd over groups with n >= 2, n = harmonic mean of their sizes."""
    usable = [g for g in groups if g["n"] >= 2 and g["sd"] is not None]
    if not usable:
        return {"sd": None, "n": None, "mde": None}
    dof = sum(g["n"] - 1 for g in usable)
    sd = (sum((g["n"] - 1) * g["sd"] ** 2 for g in usable) / dof) ** 0.5
    n = len(usable) / sum(1 / g["n"] for g in usable)
    return {"sd": sd, "n": n, "mde": Z * sd * (2 / n) ** 0.5}


def power(points: dict, methods: list[str], sizes: list[int]) -> dict:  # {size: {metric: {runs, draws}}}
    return {n: {k: {"runs": pooled_mde([points[m][n][k] for m in methods]),
                    "draws": pooled_mde([points[m][n]["draw_means"][k] for m in methods])}
                for k, _, _ in METRICS} for n in sizes}


def _num(x, digits: int = 3, none: str = "n/a") -> str:
    return none if x is None else f"{x:.{digits}f}"


def write_outputs(out: Path, result: dict) -> None:
    methods, sizes, points, refs, power_ = (result[k] for k in ("methods", "sizes", "points", "reference", "power"))
    limit = f", first {result['limit_eval']} rows of each file" if result["limit_eval"] else ""
    md = ["# Dose and power: the tuned target against synthesis-set size", "",
          f"Recipe `{result['recipe']}` ({', '.join(result['overrides']) or 'no overrides'}), zoo `{result['zoo']}`; "
          f"sizes {sizes}, training seeds {result['seeds']}, synthesis draws {result['draws']}, evaluation suites "
          f"{result['suites']}{limit}. Mean ± sample sd over all runs (draws × seeds) of a point; n/a: one run.", "",
          "| data | size | runs | rows trained | " + " | ".join(h for _, h, _ in METRICS) + " |",
          "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in METRICS) + " |"]
    md += [f"| {m} | {n} | {points[m][n]['runs']} | {_num(points[m][n]['rows']['mean'], 0, '–')} | "
           + " | ".join(fmt(points[m][n][k]) for k, _, _ in METRICS) + " |" for m in methods for n in sizes]
    md += [f"| {REFERENCES[row]} | – | 1 | – | " + " | ".join(_num(ref["metrics"][k], none="–") for k, _, _ in METRICS)
           + " |" for row, ref in refs.items()]
    md += ["", "## The smallest difference this design can detect", "",
           f"{MDE_RULE} (normal approximation: for small n it is optimistic); z_0.975 + z_0.80 = {Z:.3f}. "
           "Over runs: s = the methods' pooled sd of runs, n = runs per method (runs sharing a synthesis draw taken as "
           "independent). Over draws: s = pooled sd of the per-draw means, n = draws (each draw one unit).", "",
           "| size | metric | sd (runs) | MDE (runs) | sd (draw means) | MDE (draws) |",
           "| ---: | --- | ---: | ---: | ---: | ---: |"]
    md += [f"| {n} | {h} | {_num(power_[n][k]['runs']['sd'])} | {_num(power_[n][k]['runs']['mde'])} | "
           f"{_num(power_[n][k]['draws']['sd'])} | {_num(power_[n][k]['draws']['mde'])} |"
           for n in sizes for k, h, _ in METRICS]
    if result.get("mechanism_md"):
        md += ["", "## The data itself (largest sets, one per draw)", "",
               result["mechanism_md"].split("\n", 2)[2].strip()]  # its own title dropped
    md += [""] + [f"Note: {x}" for x in result["notes"]] if result["notes"] else []
    mach = result["machine"]
    md += ["", f"Command: `{result['command']}`", "",
           f"Syntheses and runs: {result['work_seconds']:.0f} s as recorded when each was made (a rerun "
           f"reuses finished ones); this invocation's wall time {result['wall_seconds']:.0f} s; on {mach['platform']}, {mach['cpu_count']} CPUs, "
           f"torch {mach['torch']}, {mach['device']}, distill {mach['distill']}."]
    atomic_write_text(out / "dose.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "size", "runs"]
               + [f"{k}_{x}" for k, _, _ in METRICS for x in ("mean", "sd", "mde_runs", "mde_draws")])
    for m, n in ((m, n) for m in methods for n in sizes):
        cells = [(points[m][n][k]["mean"], points[m][n][k]["sd"], power_[n][k]["runs"]["mde"],
                  power_[n][k]["draws"]["mde"]) for k, _, _ in METRICS]
        w.writerow([m, n, points[m][n]["runs"]] + ["" if x is None else x for c in cells for x in c])
    for row, ref in refs.items():
        w.writerow([row, "", 1] + [x for k, _, _ in METRICS for x in (ref["metrics"][k], "", "", "")])
    atomic_write_text(out / "dose.csv", buf.getvalue())
    atomic_write_json(out / "dose.json", {k: v for k, v in result.items() if k != "mechanism_md"})


def figure(out: Path, result: dict) -> str | None:
    """The curves with ± sd bands and the reference lines; None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes, points = result["sizes"], result["points"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (k, header, _) in zip(axes.flat, METRICS):
        for i, m in enumerate(result["methods"]):
            mean = [points[m][n][k]["mean"] for n in sizes]
            sd = [points[m][n][k]["sd"] or 0.0 for n in sizes]
            if any(x is None for x in mean):
                continue
            ax.plot(sizes, mean, "o-", color=f"C{i}", label=m)
            ax.fill_between(sizes, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                            color=f"C{i}", alpha=0.2)
        for row, style in (("target-base", "--"), ("source-post", ":")):
            value = result["reference"].get(row, {}).get("metrics", {}).get(k)
            if value is not None:
                ax.axhline(value, color="gray", linestyle=style, label=REFERENCES[row])
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)  # every metric is a share
        ax.set_title(header)
        ax.set_xlabel("synthesis rows")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Dose: tuned target vs synthesis-set size (mean ± sd over draws × seeds)")
    fig.tight_layout()
    path = out / "dose.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return str(path)
