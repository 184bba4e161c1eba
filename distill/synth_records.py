"""Records of a synthesis run: prompts in, append-only shards, the merged dataset and its card.

Split from `distill.synthesize` so the file formats (docs/CONTRACTS.md, "Synthesized dataset
directory") live in one place:

    D/shards/rank-00000.jsonl   append-only, one JSON row per finished prompt (the resumable record)
    D/data/train.jsonl          every row, in prompt order (`repetitive` marks the ones to drop)
    D/README.md                 dataset card; its YAML header makes `datasets.load_dataset(D)` work
    D/provenance.json           the settings, models and counts
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distill import DistillError
from distill.fsutil import atomic_write_json, atomic_write_text, iter_jsonl


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Rows {id, instruction, messages} from a JSONL file or a `datasets` directory.

    Each row needs `instruction` (a string) or chat `messages` (a list of {role, content});
    `id` defaults to the row index.
    """
    path = Path(path)
    if not path.exists():
        raise DistillError(f"prompts {path} does not exist; pass a .jsonl file or a datasets directory")
    if path.is_dir():
        rows = _load_dataset_dir(path)
    else:
        rows = [row for _, row in iter_jsonl(path, "prompts")]
    if not rows:
        raise DistillError(f"prompts {path} has no rows; it needs one JSON object per line with an "
                           f"'instruction' (or chat 'messages') field")
    prompts, seen = [], set()
    for i, row in enumerate(rows[:limit] if limit else rows):
        if not isinstance(row, dict):
            raise DistillError(f"prompts {path} row {i} is a {type(row).__name__}, not a JSON object; "
                               f"write one {{\"id\": ..., \"instruction\": ...}} object per line")
        pid = str(row.get("id", i))
        if pid in seen:
            raise DistillError(f"prompts {path}: id {pid!r} appears twice; ids must be unique (resume keys on them)")
        seen.add(pid)
        prompts.append({"id": pid, **_messages_of(row, path, i)})
    return prompts


def _load_dataset_dir(path: Path) -> list[dict]:
    import datasets

    try:
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            # Streamed, so nothing is cached: the rows are read into memory at once anyway, and the
            # ranks of a multi-GPU run would otherwise build the same files in the shared HF cache
            # together (which also keys a local directory by its name: stale rows from another run).
            ds = datasets.load_dataset(str(path), streaming=True)
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        return [dict(r) for r in ds]
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad-input error for the user
        raise DistillError(f"prompts {path} is not a loadable datasets directory ({exc}); "
                           f"pass a .jsonl file or a directory saved with Dataset.save_to_disk") from exc


def _messages_of(row: dict, path: Path, index: int) -> dict:
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        if messages[-1]["role"] == "assistant":  # a finished conversation: regenerate its last answer
            messages = messages[:-1]
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise DistillError(f"prompts {path} row {index}: 'messages' has no user turn")
        return {"instruction": users[-1], "messages": messages}
    if isinstance(row.get("instruction"), str) and row["instruction"].strip():
        return {"instruction": row["instruction"], "messages": [{"role": "user", "content": row["instruction"]}]}
    raise DistillError(f"prompts {path} row {index} has neither an 'instruction' string nor chat 'messages' "
                       f"(fields: {sorted(row)}); rename the field holding the prompt to 'instruction'")


# ---------------------------------------------------------------------------------------------
# Repetition filter
# ---------------------------------------------------------------------------------------------

def repetition_fraction(text: str, n: int = 20) -> float:
    """Fraction of characters covered by a character n-gram that already occurred earlier.

    About 0 for ordinary prose; near 1 for a response stuck in a loop ("the the the ...").
    """
    if len(text) <= n:
        return 0.0
    seen: set[str] = set()
    covered = bytearray(len(text))
    for i in range(len(text) - n + 1):
        gram = text[i:i + n]
        if gram in seen:
            covered[i:i + n] = b"\x01" * n
        else:
            seen.add(gram)
    return sum(covered) / len(text)


# ---------------------------------------------------------------------------------------------
# Shards: append-only, resumable
# ---------------------------------------------------------------------------------------------

def shard_path(out: Path, rank: int) -> Path:
    return out / "shards" / f"rank-{rank:05d}.jsonl"


def read_shard(path: Path, repair: bool) -> list[dict]:
    """Rows of one shard. A torn last line (a crash mid-write) is ignored, and cut off when `repair`."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DistillError(f"shard {path} line {n} is corrupt ({exc.msg}); delete that line and rerun to "
                               f"regenerate it") from exc
    return rows


def finished_rows(out: Path) -> dict[str, dict]:
    """All rows in all shards, by id (every rank's shard, so a changed world size still resumes)."""
    rows = {}
    for path in sorted((out / "shards").glob("rank-*.jsonl")):
        for row in read_shard(path, repair=False):
            rows.setdefault(row["id"], row)
    return rows


class ShardWriter:
    """Appends rows to this rank's shard: one line per row, flushed at once, fsynced per batch."""

    def __init__(self, path: Path):
        self.path = path
        read_shard(path, repair=True)  # cut a torn last line before appending after it
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise DistillError(f"cannot write shard {path} ({exc.strerror}); choose a writable --out") from exc

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def sync(self) -> None:
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.sync()
        self.file.close()


# ---------------------------------------------------------------------------------------------
# Merge and dataset card
# ---------------------------------------------------------------------------------------------

CARD_HEADER = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train.jsonl
tags:
- distill
- synthetic
- {method}
dataset_info:
  config_name: default
  download_checksums:
    data/train.jsonl:
      num_bytes: {num_bytes}
      checksum: {sha256}
---
"""


def merge(out: Path, prompt_ids: list[str] | None = None) -> Path | None:
    """Join the shards into data/train.jsonl + README.md if every prompt has a row, else None."""
    out = Path(out)
    prov_path = out / "provenance.json"
    if not prov_path.exists():
        raise DistillError(f"{out} is not a synthesis output (no provenance.json); pass the --out of a "
                           f"`distill synthesize` run")
    provenance = json.loads(prov_path.read_text())
    ids = prompt_ids if prompt_ids is not None else provenance.get("prompt_ids")
    rows = finished_rows(out)
    missing = [i for i in ids if i not in rows]
    if missing:
        return None
    ordered = [rows[i] for i in ids]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
    atomic_write_text(out / "data" / "train.jsonl", text)
    data = text.encode()
    counts = {
        "rows": len(ordered),
        "repetitive": sum(bool(r["repetitive"]) for r in ordered),
        "finish_reason": {k: sum(r["finish_reason"] == k for r in ordered) for k in ("stop", "length")},
        "response_tokens": sum(r["response_tokens"] for r in ordered),
    }
    provenance["counts"] = counts
    atomic_write_json(prov_path, provenance)
    atomic_write_text(out / "README.md", dataset_card(provenance, len(data), hashlib.sha256(data).hexdigest()))
    return out


def dataset_card(p: dict, num_bytes: int, sha256: str) -> str:
    """The card. Its checksum of the data file is also what keeps `datasets.load_dataset(D)`
    correct: `datasets` keys the cache of a local directory on the folder's name and its card's
    YAML, not on the files, so two outputs both named `codit` with the same header would share
    one cache entry and the second would load the first one's rows."""
    s, c = p["settings"], p["counts"]
    how = ("contrastive decoding (CoDIT): at each step, among tokens with p_expert >= alpha * max p_expert, "
           "sample from softmax((log p_expert - beta * log p_amateur) / temperature) with top-p"
           if s["method"] == "codit" else
           "direct sampling from the expert (beta = 0: the CoDIT engine without the amateur)")
    rows = c["rows"]
    avg = c["response_tokens"] / max(rows, 1)
    return CARD_HEADER.format(method=s["method"], num_bytes=num_bytes, sha256=sha256) + f"""
# Synthetic instruction data ({s["method"]})

Made by `distill synthesize` (distill {p["distill_version"]}) by {how}.

| setting | value |
|---|---|
| expert | `{s["expert"]}` |
| amateur | `{s["amateur"]}` |
| prompts | `{s["prompts"]}` ({rows} rows) |
| method | {s["method"]} |
| alpha / beta | {s["alpha"]} / {s["beta"]} |
| temperature / top_p | {s["temperature"]} / {s["top_p"]} |
| max_new_tokens | {s["max_new_tokens"]} |
| seed | {s["seed"]} (each row samples with a seed derived from (seed, id)) |
| prompt rendering | the expert tokenizer's chat template, `add_generation_prompt=True` |

Rows: {rows}; finished by a stop token: {c["finish_reason"]["stop"]}, cut at max_new_tokens:
{c["finish_reason"]["length"]}; mean response length {avg:.1f} tokens.

Repetition filter: {c["repetitive"]} of {rows} rows have more than {s["repetition_threshold"]:.0%} of their
characters inside a repeated {s["repetition_ngram"]}-character n-gram; they are marked
`repetitive: true` and `distill train` drops them by default.

Fields: `id, instruction, messages, response, prompt_tokens, response_tokens, finish_reason,
repetition, repetitive` and the provenance of each row (method, models, alpha, beta, sampling
settings, seed, row_seed, distill_version). `shards/` holds the append-only per-rank record the
run resumes from; `provenance.json` the full settings.
"""
