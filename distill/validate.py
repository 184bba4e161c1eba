"""Checks at the edge: bad input is refused before anything is loaded or written.

Every stage config validates itself in one place when it is made (`SynthesizeConfig.__post_init__`
with `DecodingConfig.validate`, `distill.train.validate`, `EvaluateConfig.validate`,
`ApplyConfig.__post_init__`, the recipe's `_check_values`), with the helpers here:

- numbers: `finite` (nan and inf are refused: `--scale nan` would write an all-NaN model,
  `--temperature nan` crashed deep inside sampling), `at_least` (counts and limits >= 1);
- model directories: `check_model_dir` opens one with `distill.checkpoints.Checkpoint.open`, the
  helper `chat-vector` uses (config.json parses, every shard's header is complete), so
  synthesize, evaluate and train name the broken file in one line instead of a chained traceback;
- prompt length: `fit_positions` compares each rendered prompt's tokens + max_new_tokens with the
  models' positions (config.json's `max_position_embeddings`, also nested in `text_config`), under
  a stated policy: `drop` (the default; counted in the dataset card) or `error`;
- storage: `storage_error` turns disk-full, quota, permission and read-only errors (and torch's
  `basic_ios::clear: iostream error` when saving) into one line naming the path and saying that
  rerunning resumes; `distill.cli.main` applies it to every command.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

from distill import DistillError

LONG_PROMPT_POLICIES = ("drop", "error")


# ----------------------------------------------------------------------------- numbers

def finite(where: str = "", **values) -> None:
    """Each value (a number or None) must be finite: nan and +-inf are refused, naming the setting."""
    for name, value in values.items():
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)):
            raise DistillError(f"{where}{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise DistillError(f"{where}{name} must be a finite number, got {value}; pass a real number "
                               f"(nan and inf are refused)")


def at_least(low: int, where: str = "", **values) -> None:
    """Each value (None = unset, allowed) must be an integer >= low."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DistillError(f"{where}{name} must be an integer >= {low}, got {value!r}")


# ----------------------------------------------------------------------------- model directories

def check_model_dir(ref, what: str = "model"):
    """Resolve a model reference and check its files without loading a weight: config.json is a
    JSON object, every safetensors shard's header is complete (`Checkpoint.open`). Returns the
    `Checkpoint` (its `.path` the directory, its `.config` the parsed config)."""
    from distill.checkpoints import Checkpoint
    from distill.models import resolve_model

    path = resolve_model(ref, what)
    ckpt = Checkpoint.open(path, what=what)
    if not isinstance(ckpt.config, dict) or not ckpt.config:
        raise DistillError(f"{path / 'config.json'} is not a JSON object of model settings; repair or replace it")
    return ckpt


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
    from distill.models import resolve_model
    from distill.pair import render_prompt

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

        logging.getLogger("distill.synthesize").warning(
            "%d prompts dropped: their tokens + max_new_tokens %d exceed the %s's %d positions (counted in the card; "
            "--long-prompts error refuses them instead)", dropped, max_new_tokens, what, positions)
    return kept


# ----------------------------------------------------------------------------- storage

_STORAGE = {
    errno.ENOSPC: "disk full at {path}; free space and rerun",
    errno.EDQUOT: "disk quota exceeded at {path}; free space (or raise the quota) and rerun",
    errno.EACCES: "permission denied at {path}; fix its permissions or choose another output path, and rerun",
    errno.EPERM: "operation not permitted at {path}; fix its permissions or choose another output path, and rerun",
    errno.EROFS: "{path} is on a read-only file system; choose a writable output path and rerun",
}
_STORAGE_TEXT = (  # errors that lost their errno on the way (torch's writers, safetensors, datasets)
    ("basic_ios::clear", errno.ENOSPC), ("iostream error", errno.ENOSPC), ("No space left on device", errno.ENOSPC),
    ("StorageFull", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("failed writing file", errno.ENOSPC),
    ("Disk quota exceeded", errno.EDQUOT), ("Read-only file system", errno.EROFS),
    ("Permission denied", errno.EACCES),
)


def storage_error(exc: BaseException, path=None, resumes: bool = True) -> DistillError | None:
    """A one-line DistillError for a disk-full / quota / permission / read-only failure, naming
    the path (the error's own file name, else `path`); None for any other error."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno in _STORAGE else None
    if code is None and (isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"):
        text = str(exc)
        code = next((c for needle, c in _STORAGE_TEXT if needle in text), None)
    if code is None:
        return None
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    where = path if path is not None else name
    if name is not None and path is not None and not str(name).startswith(str(path)):
        where = name  # the file that failed, when it lies outside the output named by the caller
    where = str(where) if where is not None else "the output directory"
    tail = ": it resumes" if resumes else " the same command"
    return DistillError(_STORAGE[code].format(path=where) + tail)


def guard_path(path, what: str = "output") -> Path:
    """An output path whose parent chain holds no file: `--out a-file/sub` is an error, not a
    FileExistsError from mkdir."""
    path = Path(os.path.expanduser(str(path)))
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir() and parent != path:
                raise DistillError(f"{what} {path}: {parent} is a file, not a directory; choose another path")
            break
    return path
