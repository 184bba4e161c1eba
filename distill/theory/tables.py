"""The theory experiments' tables: one Markdown, CSV and JSON file per table, written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from distill.io.files import atomic_write_json, atomic_write_text


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

