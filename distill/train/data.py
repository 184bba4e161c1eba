"""Rows on disk -> token ids and labels for supervised fine-tuning.

A row (docs/CONTRACTS.md) is `instruction` + `response` or chat `messages`; it becomes a
chat rendered with the TARGET's chat template, and the loss covers assistant tokens only
(labels are -100 everywhere else). Two ways to find the assistant tokens:

- the template marks them with `{% generation %}`: `apply_chat_template(...,
  return_assistant_tokens_mask=True)` gives the mask (our ChatML template does this);
- otherwise the conversation is rendered prefix by prefix (`messages[:i]` with the generation
  prompt, then `messages[:i+1]`) and the characters in between are the assistant's; token
  offsets map those characters to tokens, so BPE merges at the boundary cannot shift the mask.

Packing puts several examples in one row with position ids that restart at 0 for each one and
NO attention mask. transformers' mask builder (`masking_utils.find_packed_sequence_indices`)
turns restarting position ids into a block-diagonal causal mask for SDPA/eager attention, and
flash-attention-2 uses them as varlen boundaries, so packed examples never attend to each other.
That derivation only happens without a KV cache, so training sets `use_cache=False`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from distill import DistillError
from distill.io.files import iter_jsonl

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# A standard ChatML template for base targets that have none. The `{% generation %}` block
# makes HF return the assistant mask; it includes <|im_end|> so the model learns to stop.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class DataStats:
    """What happened to the rows on the way to tokens; logged and saved with the model."""

    rows_read: int = 0
    # Rows flagged `repetitive: true` by synthesis, and what `--repetitive` (drop | keep) did with them.
    repetitive_policy: str = ""
    repetition_rule: str | None = None  # the rows' `repetition_rule` (comma-joined if several); None: none given
    flagged_repetitive: int = 0
    dropped_repetitive: int = 0
    kept_repetitive: int = 0
    dropped_empty: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_assistant_tokens: int = 0
    examples: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    packed_rows: int | None = None
    mask_method: str = ""
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading


def load_rows(data: str | Path, cache_dir: str | Path | None = None):
    """Open a dataset directory (card with YAML header, or `save_to_disk`) or a .jsonl file.

    With `cache_dir` (a directory of this process's own), the Arrow files of the loaded rows and
    of every later map/filter live there, not in the shared HF cache or the user's dataset folder:
    ranks that read the same data at once would otherwise write the same cache files and race.
    """
    import datasets

    cache = {"cache_dir": str(cache_dir)} if cache_dir else {}
    path = Path(data).expanduser()
    if not path.exists():
        raise DistillError(f"training data {path} does not exist; pass a dataset directory written by "
                           "`distill synthesize` or a .jsonl file with instruction+response rows")
    _check_not_empty(path)
    try:
        if path.is_dir() and (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if cache_dir:  # a copy in the private folder: transforms write their cache files beside their input
                ds.save_to_disk(str(Path(cache_dir) / "rows"))
                ds = datasets.load_from_disk(str(Path(cache_dir) / "rows"))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
        elif path.is_dir():
            # force_redownload: the datasets cache keys a local directory by its name, so another
            # run's `data/codit` would otherwise come back stale.
            ds = datasets.load_dataset(str(path), split="train", download_mode="force_redownload",
                                      verification_mode="no_checks", **cache)
        elif path.suffix in (".jsonl", ".json"):
            if path.stat().st_size == 0:
                raise DistillError(f"training data {path} is empty; it needs at least one row")
            ds = datasets.load_dataset("json", data_files=str(path), split="train", download_mode="force_redownload",
                                      verification_mode="no_checks", **cache)
        else:
            raise DistillError(f"training data {path} is neither a dataset directory nor a .jsonl file")
    except DistillError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable input
        for jsonl in ([path] if path.is_file() else sorted(path.glob("data/*.jsonl"))):
            for _ in iter_jsonl(jsonl, "training data"):  # names the first line that is not JSON
                pass
        raise DistillError(f"cannot read training data {path}: {exc}. Check it is JSONL (one JSON object "
                           "per line) or a `datasets` directory") from exc
    if len(ds) == 0:
        raise DistillError(f"training data {path} has no rows; it needs at least one")
    cols = set(ds.column_names)
    if "messages" not in cols and not {"instruction", "response"} <= cols:
        raise DistillError(f"training data {path} has columns {sorted(cols)}; each row needs `instruction` "
                           "and `response`, or chat `messages` ([{role, content}, ...])")
    return ds


def _check_not_empty(path: Path) -> None:
    """A saved dataset or synthesis output without rows: one line, not datasets' IndexError."""
    if not path.is_dir():
        return
    state = path / "state.json"
    if state.exists():
        try:
            files = json.loads(state.read_text()).get("_data_files")
        except (OSError, ValueError, AttributeError):
            return  # datasets reports its own unreadable state.json
        if files == []:
            raise DistillError(f"training data {path} is a saved dataset with no rows; it needs at least one")
        return
    data = sorted(path.glob("data/*.jsonl")) + sorted(path.glob("*.jsonl"))
    if data and all(f.stat().st_size == 0 or not f.open("rb").read(4096).strip() for f in data):
        raise DistillError(f"training data {path} has no rows (its {', '.join(f.name for f in data)} "
                           f"{'is' if len(data) == 1 else 'are'} empty); it needs at least one")


def row_to_messages(row: dict) -> list[dict] | None:
    """A chat for one row, or None when it has nothing to learn from."""
    if row.get("messages"):
        for i, m in enumerate(row["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DistillError(f"turn {i} of 'messages' has no 'role' and 'content' strings (got {m!r}); "
                                   f"every turn needs both; fix or remove the row")
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        return msgs if any(m["role"] == "assistant" and m["content"] for m in msgs) else None
    instruction, response = row.get("instruction"), row.get("response")
    if not instruction or not response:
        return None
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


@contextlib.contextmanager
def _bars_only_for_large(rows: int, threshold: int = 10_000):
    """datasets' per-operation progress bars, only where an operation takes a while: on a few
    hundred rows each is a blink that buries the training log (the demo printed 30 of them)."""
    import datasets

    if rows >= threshold or not datasets.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


REPETITIVE_POLICIES = ("drop", "keep")


def read_chats(data, repetitive: str | bool = "drop", stats: DataStats | None = None,
               cache_dir: str | Path | None = None, *, keep_repetitive: bool | None = None):
    """Rows -> a `datasets.Dataset` with one column, `messages`; filtered and counted.

    `repetitive`: what to do with rows flagged `repetitive: true` ("drop" or "keep"; a bool is the
    older `keep_repetitive` argument, as is the keyword of that name). Either way they are counted.
    """
    if keep_repetitive is not None:
        repetitive = keep_repetitive
    if isinstance(repetitive, bool):
        repetitive = "keep" if repetitive else "drop"
    if repetitive not in REPETITIVE_POLICIES:
        raise DistillError(f"repetitive must be drop or keep, got {repetitive!r}")
    stats = stats if stats is not None else DataStats()
    ds = load_rows(data, cache_dir)
    with _bars_only_for_large(len(ds)):
        return _read_chats(ds, data, repetitive, stats)


def _read_chats(ds, data, repetitive: str, stats: DataStats):
    stats.rows_read = len(ds)
    stats.repetitive_policy = repetitive
    if "repetition_rule" in ds.column_names:
        rules = sorted({str(r) for r in ds["repetition_rule"] if r is not None})
        stats.repetition_rule = ",".join(rules) or None
    if "repetitive" in ds.column_names:
        stats.flagged_repetitive = sum(bool(f) for f in ds["repetitive"])
        if repetitive == "drop":
            before = len(ds)
            ds = ds.filter(lambda r: not r["repetitive"], desc="dropping repetitive rows")
            stats.dropped_repetitive = before - len(ds)
        else:
            stats.kept_repetitive = stats.flagged_repetitive
    try:
        ds = ds.map(lambda r: {"messages": row_to_messages(r)}, remove_columns=ds.column_names, desc="building chats")
    except DistillError as exc:
        raise DistillError(f"training data {data}: a row's {exc}") from None
    before = len(ds)
    ds = ds.filter(lambda r: r["messages"] is not None)
    stats.dropped_empty = before - len(ds)
    if len(ds) == 0:
        raise DistillError(f"training data {data}: no usable rows left ({stats.rows_read} read, "
                           f"{stats.dropped_repetitive} repetitive, {stats.dropped_empty} without a response); "
                           "pass --repetitive keep or supply other data")
    return ds


# ----------------------------------------------------------------------------- templates


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the ChatML one; True when tokens were added."""
    if tokenizer.chat_template:
        return False
    # replace_extra_special_tokens=False keeps a base tokenizer's own extra specials (5.2x only).
    kwargs = {"replace_extra_special_tokens": False} if _accepts_replace_kw(tokenizer) else {}
    added = tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL_TOKENS}, **kwargs)
    tokenizer.chat_template = CHATML_TEMPLATE
    log.info("target has no chat template: using ChatML, added %d special tokens %s", added, CHATML_SPECIAL_TOKENS)
    return added > 0


def _accepts_replace_kw(tokenizer) -> bool:
    import inspect

    params = inspect.signature(tokenizer.add_special_tokens).parameters
    return "replace_extra_special_tokens" in params


# ----------------------------------------------------------------------------- tokenising


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one chat; labels are -100 outside assistant turns."""
    if _GENERATION_TAG.search(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = _mask_by_prefixes(tokenizer, messages)
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def _mask_by_prefixes(tokenizer, messages):
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise DistillError("the target's chat template does not render a conversation as a prefix of its "
                               "continuation, so assistant tokens cannot be located; add `{% generation %}` "
                               "markers around the assistant content in the template")
        spans.append((len(prompt), len(upto)))
    if not getattr(tokenizer, "is_fast", False):
        raise DistillError("assistant-only loss needs a fast tokenizer (offset mapping) or a chat template "
                           "with `{% generation %}` markers")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= start < b for a, b in spans) and end > start) for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def tokenize_dataset(chats, tokenizer, max_length: int, truncation: str, stats: DataStats):
    """Chats -> rows of input_ids/labels, applying the length policy ("drop" or "truncate")."""
    if truncation not in ("drop", "truncate"):
        raise DistillError(f"truncation policy must be 'drop' or 'truncate', not {truncation!r}")
    stats.mask_method = ("generation-tags" if _GENERATION_TAG.search(tokenizer.chat_template or "")
                         else "prefix-offsets")

    def encode(row):
        ids, labels = tokenize_chat(tokenizer, row["messages"])
        too_long = len(ids) > max_length
        if too_long and truncation == "truncate":
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels, "too_long": too_long}

    with _bars_only_for_large(len(chats)):
        return _tokenize(chats, encode, truncation, stats)


def _tokenize(chats, encode, truncation: str, stats: DataStats):
    ds = chats.map(encode, remove_columns=chats.column_names, desc="tokenising")
    too_long = sum(ds["too_long"])
    if truncation == "drop":
        stats.dropped_too_long += too_long
        ds = ds.filter(lambda r: not r["too_long"])
    else:
        stats.truncated += too_long
    before = len(ds)
    ds = ds.filter(lambda r: any(t != IGNORE_INDEX for t in r["labels"]))
    stats.dropped_no_assistant_tokens += before - len(ds)
    ds = ds.remove_columns("too_long")
    stats.examples += len(ds)
    stats.tokens += sum(len(x) for x in ds["input_ids"])
    stats.assistant_tokens += sum(sum(t != IGNORE_INDEX for t in x) for x in ds["labels"])
    return ds


# ----------------------------------------------------------------------------- packing


def pack(ds, max_length: int):
    """First-fit-decreasing bins of <= max_length tokens; position ids restart per example."""
    import datasets

    lengths = [len(x) for x in ds["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):  # quadratic in bins, fine for SFT-sized data
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    ids_col, labels_col = ds["input_ids"], ds["labels"]
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for members in bins:
        rows["input_ids"].append([t for i in members for t in ids_col[i]])
        rows["labels"].append([t for i in members for t in labels_col[i]])
        rows["position_ids"].append([p for i in members for p in range(lengths[i])])
    return datasets.Dataset.from_dict(rows)


class SFTCollator:
    """Right-pads a batch. Unpacked rows get an attention mask; packed rows get position ids
    and no mask (so the per-example block-diagonal mask is derived from the position ids)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in features[0]
        batch = {"input_ids": [], "labels": [], ("position_ids" if packed else "attention_mask"): []}
        for f in features:
            n, pad = len(f["input_ids"]), width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            if packed:  # padding forms its own block, never attended to by real tokens
                batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def copy_provenance(data: str | Path, dest: Path) -> list[str]:
    """Copy the dataset's provenance.json and card next to the model; names of copied files."""
    import shutil

    src = Path(data)
    folder = src if src.is_dir() else src.parent
    copied = []
    for name, target in (("provenance.json", "data_provenance.json"), ("README.md", "data_card.md")):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dest / target)
            copied.append(target)
    return copied


def dump_stats(stats: DataStats) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(stats))
