"""How big a chat vector is and where it points: per-tensor and per-layer norms, cosines.

`stats(vector, base=None, other=None)` streams one tensor of each input at a time and
returns a dict (also written as JSON / CSV by the CLI):

- ‖Δ‖ per tensor, per layer (all tensors of `...layers.<i>....`) and in total;
- ‖Δ‖/‖θ_base‖ when the base model is given (how far post-training moved each part);
- cos(Δ, Δ') against another vector (e.g. a second chat vector, or a fine-tuning delta
  extracted the same way): near 0 means orthogonal updates, near 1 the same direction.
"""

from __future__ import annotations

import csv
import io
import math
import re

import torch

from distill import DistillError
from distill.io.checkpoints import Checkpoint
from distill.chat_vector.core import _name_diff, _shared_rows, is_head, is_vocab_tensor, open_vector
from distill.io.files import atomic_write_json, atomic_write_text
from distill.io.streaming import pipelined, row_chunks

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def group_of(name: str) -> str:
    """The per-layer bucket of a tensor: 'layer 7', 'embeddings', 'lm_head' or 'other'."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if is_head(name):
        return "lm_head"
    if is_vocab_tensor(name):
        return "embeddings"
    return "other"


def _group_key(group: str):
    kind, _, num = group.partition(" ")
    order = {"embeddings": 0, "layer": 1, "other": 2, "lm_head": 3}
    return order.get(kind, 4), int(num or 0)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def stats(vector, base=None, other=None, progress: bool = False) -> dict:
    """Norms of a chat vector (relative to `base` if given) and its cosine with `other` if given."""
    vec, meta = open_vector(vector)
    names = vec.ordered()
    base_ckpt = Checkpoint.open(base, what="base model") if base is not None else None
    other_vec = open_vector(other)[0] if other is not None else None
    if base_ckpt is not None and not set(names) <= set(base_ckpt.tensors):
        raise DistillError("tensor names differ between vector and base: "
                           + _name_diff(set(names), set(base_ckpt.tensors), f"vector {vec.path}",
                                        f"base {base_ckpt.path}"))
    if other_vec is not None and set(names) != set(other_vec.tensors):
        raise DistillError("tensor names differ between the two vectors: "
                           + _name_diff(set(names), set(other_vec.tensors), f"vector {vec.path}",
                                        f"vector {other_vec.path}"))

    base_rows, other_rows = {}, {}  # rows shared with the base / the other vector (None = all)
    for name in names:
        shape = vec.tensors[name].shape
        if base_ckpt is not None:
            base_rows[name] = _shared_rows(name, shape, base_ckpt.tensors[name].shape, "vector", "base")
        if other_vec is not None:
            other_rows[name] = _shared_rows(name, shape, other_vec.tensors[name].shape, "vector", "other")

    def work(job) -> tuple[str, dict]:
        """Partial sums over rows [start, stop) of one tensor."""
        name, start, stop = job
        delta = vec.get(name, start, stop).to(torch.float32)
        flat = delta.reshape(-1)
        acc = {"sq": float(torch.dot(flat, flat)), "numel": flat.numel()}
        for ckpt, rows, key in ((base_ckpt, base_rows, "base"), (other_vec, other_rows, "other")):
            if ckpt is None:
                continue
            shared = rows[name]
            end = stop if shared is None else min(stop, shared)
            if shared is not None and end <= start:
                continue  # rows beyond the shared vocabulary
            mine = flat if shared is None else delta[: end - start].reshape(-1)
            theirs = ckpt.get(name, start, end).to(torch.float32).reshape(-1)
            if key == "base":
                acc["base_sq"] = float(torch.dot(theirs, theirs))
            else:
                acc["dot"], acc["other_sq"] = float(torch.dot(mine, theirs)), float(torch.dot(theirs, theirs))
                acc["sq_shared"] = float(torch.dot(mine, mine))
        return name, acc

    keys = ["sq", "numel"] + (["base_sq"] if base_ckpt else []) + (["dot", "other_sq", "sq_shared"] if other_vec else [])
    per_tensor: dict[str, dict] = {name: dict.fromkeys(keys, 0) for name in names}
    jobs = [(n, start, stop) for n in names for start, stop in row_chunks(vec.tensors[n].shape)]
    from distill.io.progress import progress_bar

    for name, acc in progress_bar(iterable=pipelined(work, jobs), total=len(jobs), desc="stats", unit="chunk",
                                  disable=not progress, leave=False):
        for key, value in acc.items():
            per_tensor[name][key] += value

    rows_out, groups = [], {}
    total = {"sq": 0.0, "base_sq": 0.0, "dot": 0.0, "other_sq": 0.0, "numel": 0}
    for name, acc in per_tensor.items():
        group = group_of(name)
        g = groups.setdefault(group, {"tensors": 0, "sq": 0.0, "base_sq": 0.0, "dot": 0.0, "other_sq": 0.0,
                                      "sq_shared": 0.0, "numel": 0})
        g["tensors"] += 1
        for key in ("sq", "base_sq", "dot", "other_sq", "sq_shared", "numel"):
            if key in acc:
                g[key] += acc[key]
                total[key] = total.get(key, 0.0) + acc[key]
        rows_out.append(_summarise({"name": name, "group": group}, acc, base_ckpt, other_vec))

    per_layer = [_summarise({"group": k, "tensors": groups[k]["tensors"]}, groups[k], base_ckpt, other_vec)
                 for k in sorted(groups, key=_group_key)]
    return {
        "vector": str(vec.path), "base": str(base_ckpt.path) if base_ckpt else None,
        "other": str(other_vec.path) if other_vec else None, "meta": meta,
        "total": _summarise({"group": "total", "tensors": len(names)}, total, base_ckpt, other_vec),
        "per_layer": per_layer, "per_tensor": rows_out,
    }


def _summarise(row: dict, acc: dict, base, other) -> dict:
    row["numel"] = int(acc["numel"])
    row["norm"] = math.sqrt(acc["sq"])
    if base is not None:
        row["base_norm"] = math.sqrt(acc["base_sq"])
        row["relative_norm"] = _ratio(row["norm"], row["base_norm"])
    if other is not None:
        row["other_norm"] = math.sqrt(acc["other_sq"])
        row["cosine"] = _ratio(acc["dot"], math.sqrt(acc.get("sq_shared", acc["sq"]) * acc["other_sq"]))
    return row


def format_table(result: dict, per_tensor: bool = False) -> str:
    """A Markdown table (reads fine on a terminal) of the per-layer (or per-tensor) numbers."""
    key = "per_tensor" if per_tensor else "per_layer"
    label = "tensor" if per_tensor else "group"
    cols = [label, "numel", "‖Δ‖"]
    if result["base"]:
        cols.append("‖Δ‖/‖θ_base‖")
    if result["other"]:
        cols.append("cos(Δ, Δ')")

    def cells(r):
        out = [r.get("name") or r["group"], f"{r['numel']:,}", f"{r['norm']:.4g}"]
        if result["base"]:
            out.append("-" if r["relative_norm"] is None else f"{r['relative_norm']:.4g}")
        if result["other"]:
            out.append("-" if r["cosine"] is None else f"{r['cosine']:.4f}")
        return out

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in result[key] + [result["total"]]]
    return "\n".join(lines)


def write_csv(result: dict, path) -> None:
    fields = ["name", "group", "numel", "norm", "base_norm", "relative_norm", "other_norm", "cosine"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in result["per_tensor"]:
        writer.writerow(r)
    atomic_write_text(path, buf.getvalue())


def _cmd_stats(args) -> int:
    result = stats(args.vector, base=args.base, other=args.compare, progress=not args.no_progress)
    print(format_table(result, per_tensor=args.per_tensor))
    if args.json:
        atomic_write_json(args.json, result)
    if args.csv:
        write_csv(result, args.csv)
    return 0
