"""Prompts that fit the models' positions: a rendered prompt plus max_new_tokens must stay within
config.json's max_position_embeddings of every model that reads it (dropped and counted, or refused)."""

from __future__ import annotations

import json
from pathlib import Path

from distill import DistillError

LONG_PROMPT_POLICIES = ("drop", "error")


def model_positions(config: dict) -> int | None:
    """The positions a model was built for: `max_position_embeddings` (or GPT-2's `n_positions`),
    at the top of config.json or in its `text_config` (multimodal configs); None if it says none."""
    for c in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions"):
            value = c.get(key) if isinstance(c, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def read_positions(model_dir) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # unreadable configs are refused by check_model_dir, with the file's name
    return model_positions(config) if isinstance(config, dict) else None


def fit_positions(prompts: list[dict], lengths: list[int], max_new_tokens: int, positions: int | None,
                  policy: str, what: str) -> tuple[list[dict], int]:
    """(the prompts that fit, how many were dropped): a prompt fits when its rendered tokens plus
    max_new_tokens are at most `positions`. Policy `error` refuses the first that does not;
    `drop` drops them (the caller counts them) and refuses only when none is left."""
    if policy not in LONG_PROMPT_POLICIES:
        raise DistillError(f"long_prompts must be one of {', '.join(LONG_PROMPT_POLICIES)}, got {policy!r}")
    if positions is None:
        return prompts, 0
    room = positions - max_new_tokens
    if room < 1:
        raise DistillError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {what}'s "
                           f"{positions} positions (max_position_embeddings in its config.json); lower "
                           f"--max-new-tokens below {positions}")
    kept = [p for p, n in zip(prompts, lengths) if n <= room]
    if len(kept) < len(prompts):
        longest = max(zip(lengths, (p["id"] for p in prompts)))
        if policy == "error":
            n, pid = next((n, p["id"]) for p, n in zip(prompts, lengths) if n > room)
            raise DistillError(f"prompt {pid!r} has {n} tokens; with max_new_tokens {max_new_tokens} it exceeds "
                               f"the {what}'s {positions} positions ({len(prompts) - len(kept)} of {len(prompts)} "
                               f"prompts do); pass "
                               f"--long-prompts drop to drop them (counted in the card), lower --max-new-tokens "
                               f"or --max-prompt-chars")
        if not kept:
            raise DistillError(f"none of the {len(prompts)} prompts fits the {what}'s {positions} positions with "
                               f"max_new_tokens {max_new_tokens} (the longest, {longest[1]!r}, has {longest[0]} "
                               f"tokens); lower --max-new-tokens or use shorter prompts")
    return kept, len(prompts) - len(kept)


def fit_prompts(prompts: list[dict], tokenizer, template_kwargs: dict | None, models: list[tuple[str, str]],
                max_new_tokens: int, policy: str, stats: dict | None = None) -> list[dict]:
    """The prompts whose rendered prompt (the expert's chat template, as synthesis renders it) plus
    max_new_tokens fit the smallest positions of `models` ([(reference, "expert"), ...]).

    Counting is exact where it matters and cheap elsewhere: a prompt whose UTF-8 bytes plus its
    template's tokens (rendered once per role sequence) plus a margin fit is not tokenised here
    (a token covers at least one byte), the rest are rendered and counted. The count of dropped
    prompts goes into `stats` (the card's prompt paragraph)."""
    from distill.io.paths import resolve_model
    from distill.decoding.pair import render_prompt

    if policy not in LONG_PROMPT_POLICIES:
        raise DistillError(f"long_prompts must be one of {', '.join(LONG_PROMPT_POLICIES)}, got {policy!r}")
    limits = [(n, what) for n, what in ((read_positions(resolve_model(ref, what)), what) for ref, what in models if ref)
              if n is not None]
    if not limits:
        return prompts
    positions, what = min(limits, key=lambda limit: limit[0])  # the expert's on a tie
    room = positions - max_new_tokens

    def render(p):
        try:
            return render_prompt(tokenizer, p["messages"], template_kwargs)
        except Exception as exc:  # noqa: BLE001 - jinja's own errors (raise_exception in a template)
            raise DistillError(f"prompt {p['id']!r}: the expert's chat template refuses it "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); fix or remove "
                               f"the prompt, or pass another --chat-template") from None

    overhead: dict[tuple, int | None] = {}
    lengths = []
    for p in prompts:
        roles = tuple(m["role"] for m in p["messages"])
        if roles not in overhead:
            try:
                overhead[roles] = len(render_prompt(tokenizer, [{"role": r, "content": ""} for r in roles],
                                                    template_kwargs))
            except Exception:  # noqa: BLE001 - a template that refuses empty turns: count every prompt exactly
                overhead[roles] = None
        bound = None if overhead[roles] is None else (
            overhead[roles] + sum(len(m["content"].encode("utf-8")) for m in p["messages"]) + 16)
        lengths.append(bound if bound is not None and bound <= room else len(render(p)))
    kept, dropped = fit_positions(prompts, lengths, max_new_tokens, positions, policy, what)
    if stats is not None:
        stats.update(selected=stats.get("kept", len(prompts)), long_prompts=policy, positions=positions,
                     max_new_tokens=max_new_tokens,
                     dropped_over_positions=dropped, kept=len(kept))
    if dropped:
        import logging

        logging.getLogger("distill.synthesize.run").warning(
            "%d prompts dropped: their tokens + max_new_tokens %d exceed the %s's %d positions (counted in the card; "
            "--long-prompts error refuses them instead)", dropped, max_new_tokens, what, positions)
    return kept
