"""Prompt sets as users hold them: the common chat-data layouts, read into our prompt rows.

Sources: a JSONL file (or a .json array, or .parquet), a `datasets` directory (saved with
`save_to_disk`, or data files with a card), or a hub name such as `lmsys/lmsys-chat-1m` that is
already in the local Hugging Face cache. Nothing is ever downloaded: synthesis runs on cluster
nodes without network, and a half-finished download there would only fail later.

Layouts (`layout="auto"` picks one from the first row's fields and logs which):

    instruction   {"instruction": str}                           ours
    messages      {"messages": [{role, content}, ...]}           ours; read like `instruction`: a row
                                                                 with a non-empty messages list uses
                                                                 it, else its instruction
    conversation  {"conversation": [{role, content, ...}]}       LMSYS-Chat-1M, WildChat (extra keys
                                                                 in a turn are ignored)
    sharegpt      {"conversations": [{from, value}, ...]}        from human/user -> user,
                                                                 gpt/assistant/chatgpt/bard -> assistant
    alpaca        {"instruction", "input", "output"}             prompt = instruction + "\\n\\n" + input
                                                                 when input is non-blank, else the
                                                                 instruction alone; output is ignored

Each row becomes {"id", "instruction", "messages", "source_index"}: `turns="first"` keeps the
first user turn (as the public CoDIT code does with its prompt sets), `turns="all"` every turn up to
the last user turn; in both modes the system turns before the kept user turn(s) stay. `instruction`
is the last kept user turn's text. Rows are then filtered in this order, each drop counted:
empty (no user turn, or a blank one), too long (the kept turns hold more than `max_prompt_chars`
characters in all), duplicate (same user text after lowercasing and collapsing whitespace; the
first occurrence is kept). Then `limit` keeps the first N, or `sample` draws N with
`random.Random(seed)` and keeps them in source order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass

from distill import DistillError
from distill.io.sources import open_rows as _open

log = logging.getLogger(__name__)

LAYOUTS = ("instruction", "messages", "conversation", "sharegpt", "alpaca")
TURNS = ("first", "all")
# Speaker names seen in public chat dumps, mapped onto the chat-template roles.
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "model": "assistant", "system": "system"}
_ACCEPTED = ("instruction (a string), messages (role/content turns), conversation (role/content turns: "
             "LMSYS, WildChat), sharegpt (conversations of from/value turns), alpaca (instruction + input)")


@dataclass
class PromptSet:
    rows: list[dict]
    stats: dict


def load_prompt_set(path: str | os.PathLike, layout: str = "auto", turns: str = "first",
                    max_prompt_chars: int | None = 16000, limit: int | None = None, sample: int | None = None,
                    seed: int = 0, dedupe: bool = True) -> PromptSet:
    """Prompt rows and their counts from `path` (see the module docstring for the rules).

    `max_prompt_chars=None` keeps prompts of any length; `dedupe=False` keeps repeated prompts.
    """
    src = str(path)
    if layout != "auto" and layout not in LAYOUTS:
        raise DistillError(f"prompts {src}: unknown layout {layout!r}; use auto or one of {', '.join(LAYOUTS)}")
    if turns not in TURNS:
        raise DistillError(f"prompts {src}: turns must be 'first' or 'all', not {turns!r}")
    for name, value in (("limit", limit), ("sample", sample), ("max_prompt_chars", max_prompt_chars)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DistillError(f"prompts {src}: {name} must be >= 1 (got {value!r}); leave it out to take every prompt")
    if limit is not None and sample is not None:
        raise DistillError(f"prompts {src}: pass limit or sample, not both")

    stats = {"source": src, "layout": layout, "turns": turns, "max_prompt_chars": max_prompt_chars, "dedupe": dedupe,
             "rows_read": 0, "dropped_empty": 0, "dropped_too_long": 0, "dropped_duplicate": 0}
    rows, ids, seen = [], set(), set()
    for i, row in enumerate(_open(path)):
        stats["rows_read"] += 1
        where = f"prompts {src} row {i}"
        if not isinstance(row, dict):
            raise DistillError(f"{where} is a {type(row).__name__}, not a JSON object; write one "
                               f"{{\"id\": ..., \"instruction\": ...}} object per line")
        if i == 0 and layout == "auto":
            layout = stats["layout"] = _detect(row, src)
            log.info("prompts %s: %s layout (detected from the first row's fields %s)", src, layout, sorted(row))
        # Ids are checked over every row read, dropped ones too: resume keys on them, and a repeated
        # id means the source itself is not what the user thinks it is.
        pid = next((str(row[k]) for k in ("id", "conversation_id") if row.get(k) is not None), str(i))
        if pid in ids:
            raise DistillError(f"prompts {src}: id {pid!r} appears twice; ids must be unique (resume keys on them)")
        ids.add(pid)
        messages = _take(READERS[layout](row, where), turns)
        if messages is None or not messages[-1]["content"].strip():
            stats["dropped_empty"] += 1
            continue
        if max_prompt_chars is not None and sum(len(m["content"]) for m in messages) > max_prompt_chars:
            stats["dropped_too_long"] += 1
            continue
        if dedupe:  # a 16-byte digest per prompt, not its text: a million-row set stays small in memory
            key = hashlib.blake2b("\0".join(" ".join(m["content"].lower().split()) for m in messages
                                            if m["role"] == "user").encode(), digest_size=16).digest()
            if key in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(key)
        rows.append({"id": pid, "instruction": messages[-1]["content"], "messages": messages, "source_index": i})
        if limit is not None and len(rows) == limit:
            break  # the first N are known: no need to read (or hold) the rest of a large set
    if not stats["rows_read"]:
        raise DistillError(f"prompts {src} has no rows; it needs one JSON object per line with an "
                           f"'instruction' (or chat 'messages') field")
    if not rows:
        raise DistillError(f"prompts {src}: none of its {stats['rows_read']} rows is usable "
                           f"({stats['dropped_empty']} empty, {stats['dropped_too_long']} too long, "
                           f"{stats['dropped_duplicate']} duplicates); check the layout ({stats['layout']}) "
                           f"or raise max_prompt_chars")
    stats["eligible"] = len(rows)
    stats["limited"], stats["sampled"], stats["seed"] = limit, sample, seed if sample is not None else None
    if sample is not None and sample < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), sample))
        rows = [rows[j] for j in keep]
    stats["kept"] = len(rows)
    return PromptSet(rows, stats)


def describe_stats(stats: dict) -> str:
    """One Markdown paragraph for a dataset card: where the prompts came from and what was dropped."""
    turns = "the first user turn" if stats["turns"] == "first" else "every turn up to the last user turn"
    too_long = f"longer than {stats['max_prompt_chars']:,} characters" if stats["max_prompt_chars"] else "too long"
    text = (f"**Prompts.** {stats['kept']:,} prompts from `{stats['source']}` ({stats['layout']} layout), each "
            f"{turns} of its conversation with the system turns before it. Of the {stats['rows_read']:,} rows read, "
            f"{stats['dropped_empty']:,} were dropped as empty, {stats['dropped_too_long']:,} as {too_long} and "
            + (f"{stats['dropped_duplicate']:,} as duplicates of an earlier prompt (same user text after lowercasing "
               f"and collapsing whitespace; the first kept)." if stats["dedupe"] else "none as duplicates (not "
               f"deduplicated)."))
    if stats.get("limited"):
        text += f" Reading stopped at the first {stats['limited']:,} usable rows (limit)."
    if stats.get("sampled"):
        text += (f" Then {stats.get('selected', stats['kept']):,} of the {stats['eligible']:,} usable rows were drawn "
                 f"at random "
                 f"(`random.Random({stats['seed']})`), kept in source order.")
    if stats.get("dropped_over_positions"):  # distill.synthesize.fit.fit_prompts, policy --long-prompts drop
        text += (f" {stats['dropped_over_positions']:,} prompts were dropped because their rendered tokens plus "
                 f"max_new_tokens ({stats['max_new_tokens']:,}) exceed the models' {stats['positions']:,} positions "
                 f"(--long-prompts drop).")
    return text


# ---------------------------------------------------------------------------------------------
# Layouts: each reader turns one row into a list of {role, content} turns ([] = empty prompt)
# ---------------------------------------------------------------------------------------------

def _detect(row: dict, src: str) -> str:
    keys = set(row)
    for layout, needs in (("sharegpt", {"conversations"}), ("conversation", {"conversation"}),
                          ("messages", {"messages"}), ("alpaca", {"instruction", "input"}),
                          ("instruction", {"instruction"})):
        if needs <= keys:
            return layout
    raise DistillError(f"prompts {src} row 0 has neither an 'instruction' string nor chat 'messages', "
                       f"'conversation' or 'conversations' (fields found: {sorted(row)}); the layouts accepted "
                       f"are {_ACCEPTED}. Rename the field holding the prompt to 'instruction', or pick a layout")


def _ours(row: dict, where: str) -> list[dict]:
    if isinstance(row.get("messages"), list) and row["messages"]:
        return _turns(row["messages"], where, "messages", "role", "content")
    text = row.get("instruction")
    if isinstance(text, str):
        return [{"role": "user", "content": text}]
    if text is None and ("instruction" in row or "messages" in row):
        return []  # a column present but null in this row (datasets fill absent fields so): an empty prompt
    raise DistillError(f"{where} has neither an 'instruction' string nor chat 'messages' (fields: {sorted(row)}); "
                       f"rename the field holding the prompt to 'instruction'")


def _alpaca(row: dict, where: str) -> list[dict]:
    text, extra = row.get("instruction"), row.get("input")
    if not isinstance(text, str) or not isinstance(extra, (str, type(None))):
        raise DistillError(f"{where}: the alpaca layout needs string 'instruction' and 'input' fields "
                           f"(fields: {sorted(row)}); fix the row or pick another layout")
    return [{"role": "user", "content": text + "\n\n" + extra if extra and extra.strip() else text}]


def _chat(layout: str, field: str, role_key: str, content_key: str):
    def read(row: dict, where: str) -> list[dict]:
        turns = row.get(field)
        if turns is None and field in row:
            return []
        if not isinstance(turns, list):
            raise DistillError(f"{where}: the {layout} layout needs a '{field}' list of turns "
                               f"(fields: {sorted(row)}); fix the row or pick another layout")
        return _turns(turns, where, field, role_key, content_key)
    return read


def _turns(turns: list, where: str, field: str, role_key: str, content_key: str) -> list[dict]:
    out = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise DistillError(f"{where}: turn {n} of '{field}' has no '{content_key}' string (got {turn!r:.80}); "
                               f"every turn needs '{role_key}' and '{content_key}'; fix or remove the row")
        role = ROLES.get(str(turn.get(role_key)).lower())
        if role is None:
            raise DistillError(f"{where}: turn {n} of '{field}' has {role_key} {turn.get(role_key)!r}; "
                               f"accepted: {', '.join(ROLES)}; fix or remove the row")
        out.append({"role": role, "content": turn[content_key]})
    return out


READERS = {"instruction": _ours, "messages": _ours, "alpaca": _alpaca,
           "conversation": _chat("conversation", "conversation", "role", "content"),
           "sharegpt": _chat("sharegpt", "conversations", "from", "value")}


def _take(turns: list[dict], mode: str) -> list[dict] | None:
    """The turns to prompt with, ending at a user turn; None when there is no user turn."""
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    if not users:
        return None
    if mode == "first":
        return [t for t in turns[:users[0]] if t["role"] == "system"] + [turns[users[0]]]
    return turns[:users[-1] + 1]  # a finished conversation: its last answer is the one to regenerate
