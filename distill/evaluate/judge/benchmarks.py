"""The judged benchmarks' prompts (and references and checklists), by name or from a file.

    alpaca_eval  tatsu-lab/alpaca_eval        pairwise against its reference outputs (AlpacaEval 2.0)
    wildbench    allenai/WildBench            absolute 1..10 against each prompt's checklist
    mt_bench     HuggingFaceH4/mt_bench_prompts  two turns, each judged 1..10

A name is read from the local Hugging Face cache (`hf download NAME --repo-type dataset`), never
downloaded; a path may be JSONL / JSON / parquet / a `datasets` directory with `instruction` (or
`prompt`, or `turns`), and optionally `checklist`, `reference` (or `output`) and `constraints`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from distill import DistillError

NAMED = {  # name -> (hub dataset, mode)
    "alpaca_eval": ("tatsu-lab/alpaca_eval", "pairwise"),
    "wildbench": ("allenai/WildBench", "absolute"),
    "mt_bench": ("HuggingFaceH4/mt_bench_prompts", "mt-bench"),
}
MODES = ("absolute", "pairwise", "mt-bench")


@dataclass
class BenchItem:
    id: str
    turns: list[str]  # the user turns to answer, in order (MT-Bench: two)
    history: list[tuple[str, str]] = field(default_factory=list)  # a conversation before the first turn
    checklist: list[str] = field(default_factory=list)
    reference: str | None = None  # the reference response to the (last) turn, for pairwise
    row: dict = field(default_factory=dict)  # the source row (constraints for the rule judge)


@dataclass
class Benchmark:
    name: str
    mode: str
    items: list[BenchItem]


def load_benchmark(spec: str, mode: str | None = None, limit: int | None = None) -> Benchmark:
    from distill.io.sources import open_rows

    hub, default_mode = NAMED.get(spec, (None, None))
    source = hub or spec
    if hub is None and not Path(spec).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise DistillError(f"unknown judge benchmark {spec!r}; use {', '.join(NAMED)}, a JSONL/parquet file or "
                           f"datasets directory of prompts, or a cached hub dataset (owner/name)")
    try:
        rows = []
        for row in open_rows(source):
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    except DistillError as exc:
        raise DistillError(f"judge benchmark {spec}" + (f" ({hub})" if hub else "") + f": {exc}") from None
    items = [_item(r, i, source) for i, r in enumerate(rows)]
    if not items:
        raise DistillError(f"judge benchmark {spec} has no rows")
    if mode is None:
        mode = default_mode or ("mt-bench" if len(items[0].turns) > 1 else
                                "pairwise" if items[0].reference is not None else "absolute")
    if mode not in MODES:
        raise DistillError(f"judge mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "pairwise" and any(it.reference is None for it in items):
        raise DistillError(f"judge benchmark {spec}: pairwise mode needs a reference response per prompt "
                           f"('reference' or 'output'); give --judge-reference FILE or use --judge-mode absolute")
    return Benchmark(spec, mode, items)


def _item(row: dict, i: int, where: str) -> BenchItem:
    rid = str(row.get("id", row.get("prompt_id", row.get("session_id", i))))
    history: list[tuple[str, str]] = []
    if isinstance(row.get("turns"), list) or isinstance(row.get("prompt"), list):
        turns = [str(t) for t in (row.get("turns") or row["prompt"])]
    elif isinstance(row.get("conversation_input"), list):  # WildBench: the conversation, the last turn the user's
        conv = [(m.get("role", "user"), m.get("content", "")) for m in row["conversation_input"]]
        *before, (_, last) = conv
        history, turns = before, [last]
    elif isinstance(row.get("instruction") or row.get("prompt"), str):
        turns = [row.get("instruction") or row["prompt"]]
    else:
        raise DistillError(f"{where}: row {i} has no 'instruction', 'prompt', 'turns' or 'conversation_input'")
    if not all(t.strip() for t in turns):
        raise DistillError(f"{where}: row {i} (id {rid!r}) has an empty turn")
    ref = row.get("reference", row.get("output"))
    if isinstance(ref, list):
        ref = ref[-1] if ref else None
    checklist = row.get("checklist") or []
    return BenchItem(rid, turns, history, [str(c) for c in checklist] if isinstance(checklist, list) else [],
                     ref if isinstance(ref, str) else None, row)


def read_reference(path: str, items: list[BenchItem]) -> None:
    """Reference responses from a file of {id, response} (or distill's *.responses.jsonl) rows."""
    from distill.io.files import iter_jsonl

    p = Path(path)
    if not p.is_file():
        raise DistillError(f"judge reference {p} not found; pass a JSONL of {{id, response}} rows (e.g. another "
                           f"model's scores/*.judge.responses.jsonl)")
    by_id = {}
    for n, row in iter_jsonl(p, "judge reference"):
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("response"), str):
            raise DistillError(f"{p}:{n}: each row needs 'id' and a string 'response'")
        by_id[str(row["id"])] = row["response"]
    missing = [it.id for it in items if it.id not in by_id]
    if missing:
        raise DistillError(f"judge reference {p} has no response for {len(missing)} prompt(s) (first: {missing[0]!r})")
    for it in items:
        it.reference = by_id[it.id]
