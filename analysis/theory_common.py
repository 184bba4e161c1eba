"""Helpers shared by the theory experiments (analysis/theory_t*.py): inputs, tables, figures."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill import DistillError  # noqa: E402
from distill.fsutil import atomic_write_json, atomic_write_text  # noqa: E402


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path} not found; build the world with `distill zoo build --preset tiny` or pass the path")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def dataset_rows(data: str | Path) -> list[dict]:
    """Rows of a synthesized dataset directory (data/train.jsonl) or a .jsonl file."""
    p = Path(data)
    if p.is_dir():
        p = p / "data" / "train.jsonl"
    return read_jsonl(p)


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def std(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def pearson(a: list[float], b: list[float]) -> float | None:
    import torch

    if len(a) < 3:
        return None
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = x.norm() * y.norm()
    return float((x * y).sum() / den) if den > 0 else None


def ranks(x):
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    import torch

    x = torch.as_tensor(x, dtype=torch.float64)
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    # average ranks over ties
    uniq, inv = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        r = (sums / counts)[inv]
    return r


def spearman(a, b) -> float | None:
    if len(a) < 3:
        return None
    return pearson(ranks(a).tolist(), ranks(b).tolist())


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2e}"  # small KLs stay readable
    return str(x)


def write_table(out_dir: Path, name: str, title: str, columns: list[str], rows: list[dict], notes: list[str] = (),
                extra: dict | None = None) -> tuple[Path, Path]:
    """<name>.md and <name>.csv (and <name>.json with the raw numbers) in out_dir, atomically."""
    md = [f"# {title}", "", "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    if notes:
        md += [""] + list(notes)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in columns})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.md", "\n".join(md) + "\n")
    atomic_write_text(out_dir / f"{name}.csv", buf.getvalue())
    atomic_write_json(out_dir / f"{name}.json", {"title": title, "rows": rows, **(extra or {})})
    return out_dir / f"{name}.md", out_dir / f"{name}.csv"


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
