"""What the theory experiments read: the source pair, models, prompts, datasets, and the
log-probability of a fixed response under a model (T1 and T3 share these; so do analysis/'s T2, T4)."""

from __future__ import annotations

from pathlib import Path

from distill import DistillError
def source_pair(base, post, chat_template: str | None = None, chat_template_kwargs=None):
    """(tokenizer, template kwargs) of the source pair, by `distill.decoding.pair.check_pair(post, base)`:
    one token -> id map, a chat template (the post's, or `chat_template`), its kwargs. Raises
    DistillError on a pair that cannot share prompts and scores."""
    from distill.decoding.pair import check_pair

    tok, pair = check_pair(str(post), str(base), chat_template=chat_template,
                           chat_template_kwargs=chat_template_kwargs)
    return tok, pair.chat_template_kwargs


def device_dtype(device: str | None, dtype: str | None):
    """(device, torch dtype): CUDA when present, bfloat16 on it, float32 on CPU, unless told."""
    from distill.evaluate.generate import resolve_device_dtype

    return resolve_device_dtype(device, dtype)


def load_model(ref, device: str, dtype, what: str):
    from distill.io.models import load_causal_lm

    return load_causal_lm(ref, dtype=dtype, device=device, what=what)


def prompt_messages(path, limit: int | None = None) -> list[dict]:
    """Rows {id, instruction, messages} of a prompts JSONL (`distill.synthesize.records.load_prompts`)."""
    from distill.synthesize.records import load_prompts

    return load_prompts(path, limit)


def encode_prompt(tokenizer, messages: list[dict], kwargs: dict | None = None, own: bool = False,
                  response: str | None = None) -> tuple[list[int], int]:
    """(ids, start): a rendered prompt, with `response` tokenized after it as one string (the
    tokens SFT on it would see), and the index where the response starts.

    own=False, the source pair's rule (`distill.decoding.pair`): the chat template with a generation
    prompt and `kwargs`, tokenized without added specials, bos never twice. own=True, a model's
    own format: its chat template, or without one the last user turn + newline, specials added.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    if templated or not own:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(kwargs or {}))
    else:
        text = [m["content"] for m in messages if m["role"] == "user"][-1] + "\n"
    add = own and not templated
    p_ids = tokenizer(text, add_special_tokens=add)["input_ids"]
    ids = p_ids if response is None else tokenizer(text + response, add_special_tokens=add)["input_ids"]
    bos, drop = tokenizer.bos_token_id, 0
    while bos is not None and len(p_ids) > drop + 1 and p_ids[drop] == p_ids[drop + 1] == bos:
        drop += 1
    return ids[drop:], len(p_ids) - drop


def response_logprobs(model, tokenizer, messages: list[list[dict]], responses: list[str], batch_size: int = 16,
                      kwargs: dict | None = None, own: bool = True) -> list[float]:
    """log p(response | prompt) per pair under `model` (prompt rendered by `encode_prompt`)."""
    from distill.evaluate.generate import sum_logprobs

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    enc = [encode_prompt(tokenizer, m, kwargs, own, r) for m, r in zip(messages, responses)]
    return [s for s, _ in sum_logprobs(model, [i for i, _ in enc], [s for _, s in enc], batch_size, pad)]


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """`distill.io.files.read_jsonl` with the theory's fix for a missing file."""
    from distill.io.files import read_jsonl as _read_jsonl

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path} not found; build the world with `distill zoo build --preset tiny` or pass the path")
    return _read_jsonl(path, limit=limit)


def dataset_rows(data: str | Path) -> list[dict]:
    """Rows of a synthesized dataset directory (data/train.jsonl) or a .jsonl file."""
    p = Path(data)
    if p.is_dir():
        p = p / "data" / "train.jsonl"
    return read_jsonl(p)

