"""Records of a synthesis run: prompts in, append-only shards, the merged dataset and its card.

Split from `distill.synthesize.run` so the file formats (docs/CONTRACTS.md, "Synthesized dataset
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
from distill.io.files import atomic_write_json, atomic_write_text, read_jsonl


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Rows {id, instruction, messages, source_index} from a prompt set (`distill.synthesize.prompt_sets`).

    Any layout it reads (ours: `instruction` or chat `messages`; LMSYS/WildChat `conversation`,
    ShareGPT, Alpaca), detected from the first row; every turn up to the last user turn is kept, so
    a finished conversation has its last answer regenerated. `id` defaults to the row index.
    Empty prompts are dropped; long and repeated ones are kept, as before (`load_prompt_set` can
    drop those too).
    """
    from distill.synthesize.prompt_sets import load_prompt_set

    return load_prompt_set(path, turns="all", max_prompt_chars=None, dedupe=False, limit=limit).rows


# ---------------------------------------------------------------------------------------------
# Repetition filter: the rules live in distill.synthesize.repetition (re-exported here for old imports)
# ---------------------------------------------------------------------------------------------

from distill.synthesize.repetition import repetition_fraction, repetition_rule  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# Shards: append-only, resumable
# ---------------------------------------------------------------------------------------------

def shard_path(out: Path, rank: int) -> Path:
    return out / "shards" / f"rank-{rank:05d}.jsonl"


def read_shard(path: Path, repair: bool) -> list[dict]:
    """Rows of one shard. A torn last line (a crash mid-write) is ignored, and cut off when `repair`."""
    if not path.exists():
        return []
    if repair:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(path, "r+b") as f:
                f.truncate(end)
    return read_jsonl(path, "shard", skip_torn_tail=True,
                      invalid="shard {path} line {n} is corrupt ({msg}); delete that line and rerun to regenerate it")


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
        # which rule flagged how many rows, from the rows (one written before rules had names: ngram)
        "repetition_rule": provenance["settings"].get("repetition_rule", "ngram"),
        "repetitive_by_rule": _flagged_by_rule(ordered),
        "finish_reason": {k: sum(r["finish_reason"] == k for r in ordered) for k in ("stop", "length")},
        "engine": {e: sum(r.get("engine") == e for r in ordered) for e in sorted({str(r.get("engine")) for r in ordered})
                   if e != "None"},
        "response_tokens": sum(r["response_tokens"] for r in ordered),
    }
    from distill.synthesize.best_of_n import summary as best_of_n_summary

    bon = best_of_n_summary(ordered)
    if bon:
        counts["best_of_n"] = bon
    provenance["counts"] = counts
    atomic_write_json(prov_path, provenance)
    atomic_write_text(out / "README.md", dataset_card(provenance, len(data), hashlib.sha256(data).hexdigest()))
    return out


def _flagged_by_rule(rows: list[dict]) -> dict:
    """{rule: {"rows": n, "repetitive": flagged}}; more than one rule only if a run was resumed
    across versions of distill that flagged by different rules."""
    out: dict = {}
    for r in rows:
        c = out.setdefault(r.get("repetition_rule", "ngram"), {"rows": 0, "repetitive": 0})
        c["rows"] += 1
        c["repetitive"] += bool(r["repetitive"])
    return dict(sorted(out.items()))


def _repetition_paragraph(s: dict, c: dict) -> str:
    by_rule = c.get("repetitive_by_rule") or {c.get("repetition_rule", "ngram"): {"rows": c["rows"],
                                                                                 "repetitive": c["repetitive"]}}
    parts = []
    for name, n in by_rule.items():
        rule = repetition_rule(name, s.get("repetition_ngram", 20), s.get("repetition_threshold", 0.3))
        parts.append(f"{n['repetitive']} of {n['rows']} rows flagged by the `{name}` rule, {rule.describe()}")
    mixed = ("" if len(by_rule) == 1 else " (rows flagged by different rules: the run was resumed across distill "
             "versions; rerun with --overwrite to flag every row by one rule)")
    return (f"Repetition filter: {'; '.join(parts)}{mixed}.\nThey are marked `repetitive: true` (with the rule in "
            f"`repetition_rule`) and kept in this file; `distill train`\ndrops them by default (`--repetitive keep` "
            f"trains on them too). The public CoDIT code only\nannotates such a flag and drops nothing itself.\n")


def _rendering(pair: dict | None) -> str:
    if not pair:
        return "the expert tokenizer's chat template, `add_generation_prompt=True`"
    kwargs = f", kwargs `{json.dumps(pair['chat_template_kwargs'])}`" if pair["chat_template_kwargs"] else ""
    return f"{pair['chat_template']}'s chat template, `add_generation_prompt=True`{kwargs}; bos: {pair['bos']}"


def _pair_section(pair: dict | None) -> str:
    """The pair's stop set and every difference the pair check found (distill.decoding.pair)."""
    if not pair:
        return ""
    diffs = "".join(f"- {d}\n" for d in pair["differences"]) or "- none\n"
    return (f"\nBoth models score the expert's real vocabulary ({pair['vocab_size']} ids) with one token -> id map. "
            f"Rows stop at {', '.join(f'`{t}`' for t in pair['stop_tokens'])} (the expert's eos, its template's "
            f"end-of-turn token and its generation-config eos ids). Differences between expert and amateur, each "
            f"resolved from the expert:\n\n{diffs}")


def _prompt_section(stats: dict | None) -> str:
    from distill.synthesize.prompt_sets import describe_stats

    return f"\n{describe_stats(stats)}\n" if stats else ""


def _best_of_n_paragraph(b: dict | None) -> str:
    if not b:
        return ""
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    return (f"Best-of-{b['n']}: judge `{b['judge']}` (templates {b['template_version']}); mean score of the kept "
            f"samples {fmt(b['mean_chosen'])}, of all {b['samples']} samples {fmt(b['mean_all'])} (1..10); scores "
            f"of the kept samples {b['chosen_histogram']}; {b['unjudged_samples']} samples without a verdict, "
            f"{b['rows_without_verdict']} rows none of whose samples got one (they keep sample 0). Each row's "
            f"`best_of_n` holds its N scores and the index kept; D/judgments.jsonl every judgment.\n\n")


def dataset_card(p: dict, num_bytes: int, sha256: str) -> str:
    """The card. Its checksum of the data file is also what keeps `datasets.load_dataset(D)`
    correct: `datasets` keys the cache of a local directory on the folder's name and its card's
    YAML, not on the files, so two outputs both named `codit` with the same header would share
    one cache entry and the second would load the first one's rows."""
    s, c = p["settings"], p["counts"]
    how = ("contrastive decoding (CoDIT): at each step, among tokens with p_expert >= alpha * max p_expert, "
           "sample from softmax((log p_expert - beta * log p_amateur) / temperature) with top-p"
           if s["method"] == "codit" else
           f"best-of-n: {s.get('n')} direct samples per prompt, the one the judge `{s.get('judge')}` scores best "
           f"kept (distill.synthesize.best_of_n)" if s["method"] == "best-of-n" else
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
| prompt rendering | {_rendering(p.get("pair"))} |
| decoding engine | {", ".join(f"{e}: {k} rows" for e, k in c.get("engine", {}).items()) or "not recorded"} |
{_pair_section(p.get("pair"))}{_prompt_section(p.get("prompt_set"))}
Rows: {rows}; finished by a stop token: {c["finish_reason"]["stop"]}, cut at max_new_tokens:
{c["finish_reason"]["length"]}; mean response length {avg:.1f} tokens.

{_repetition_paragraph(s, c)}{_best_of_n_paragraph(c.get("best_of_n"))}
Fields: `id, instruction, messages, response, prompt_tokens, response_tokens, finish_reason,
repetition, repetitive, repetition_rule` and the provenance of each row (method, models, alpha, beta, sampling
settings, seed, row_seed, distill_version). `shards/` holds the append-only per-rank record the
run resumes from; `provenance.json` the full settings.
"""
