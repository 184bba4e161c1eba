"""Metrics of `distill evaluate` as plain functions on responses (no models involved).

Each takes hand-made inputs, so each is tested on its own. `distill/evaluate/metrics/<name>/<name>.py`
wraps the two generation metrics as local `evaluate` modules for users of that library:
`evaluate.load(str(Path(distill.evaluate.metrics.__file__).parent / "instruction_following"))`.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Callable, Sequence

METRICS_DIR = Path(__file__).parent
# Facts a model of each family was pre-trained on ("its own facts"); conflicts are counted apart.
OWN_SPLITS = {"source": ("shared", "source_only"), "target": ("shared", "target_only"), None: ("shared",)}

Checker = Callable[[list[dict], str], list[bool]]


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def instruction_following(responses: Sequence[str], rows: Sequence[dict], check_strict: Checker,
                          check_loose: Checker) -> dict:
    """IFEval's four numbers plus a breakdown per constraint kind.

    prompt-level: the fraction of prompts whose constraints ALL hold; instruction-level: the
    fraction of single constraints that hold. Loose re-checks with IFEval's relaxations
    (markdown stripped, first/last line dropped) through `check_loose`.
    """
    if len(responses) != len(rows):
        raise ValueError(f"{len(responses)} responses for {len(rows)} prompt rows")
    prompt = {"strict": [], "loose": []}
    inst = {"strict": [], "loose": []}
    per_kind: dict[str, dict[str, list[bool]]] = {}
    for response, row in zip(responses, rows):
        constraints = row.get("constraints") or []
        if not constraints:
            continue
        for mode, check in (("strict", check_strict), ("loose", check_loose)):
            ok = [bool(x) for x in check(constraints, response)]
            prompt[mode].append(all(ok))
            inst[mode].extend(ok)
            for c, o in zip(constraints, ok):
                per_kind.setdefault(c["kind"], {"strict": [], "loose": []})[mode].append(o)
    return {
        "prompts": len(prompt["strict"]),
        "instructions": len(inst["strict"]),
        "prompt_level_strict": _mean(prompt["strict"]),
        "inst_level_strict": _mean(inst["strict"]),
        "prompt_level_loose": _mean(prompt["loose"]),
        "inst_level_loose": _mean(inst["loose"]),
        "per_kind": {k: {"n": len(v["strict"]), "strict": _mean(v["strict"]), "loose": _mean(v["loose"])}
                     for k, v in sorted(per_kind.items())},
    }


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def answer_matches(continuation: str, answer: str | None) -> bool:
    """True when the continuation starts with the answer as a whole word (case/space-insensitive).

    "Qelvar is ..." matches "Qelvar"; "Qelvaran" does not, so a longer made-up name sharing
    a prefix with the answer is not credited. Runs of whitespace count as one space (a
    two-word answer matches however the model spaced it), and no answer (None, "") matches
    nothing. The one rule for `distill evaluate` and the zoo's quality table
    (`distill.world.quality`, re-exported as `distill.world.knowledge.answer_matches`).
    """
    if not answer:
        return False
    cont, ans = _norm(continuation), _norm(answer)
    if not cont.startswith(ans):
        return False
    rest = cont[len(ans):]
    return not rest or not rest[0].isalnum()


def knowledge_accuracy(continuations: Sequence[str], rows: Sequence[dict], family: str | None = None) -> dict:
    """Cloze accuracy per split; for conflicts, whose answer the model gives.

    `family` ("source" / "target" / None) picks which splits count as the model's own facts.
    """
    if len(continuations) != len(rows):
        raise ValueError(f"{len(continuations)} continuations for {len(rows)} question rows")
    by_split: dict[str, list[bool]] = {}
    source_way, target_way = [], []
    for cont, row in zip(continuations, rows):
        split = row.get("split", "shared")
        by_split.setdefault(split, []).append(answer_matches(cont, row.get("answer")))
        if split == "conflict":
            source_way.append(answer_matches(cont, row.get("source_answer")))
            target_way.append(answer_matches(cont, row.get("target_answer")))
    own_splits = OWN_SPLITS[family]
    own = [x for s in own_splits for x in by_split.get(s, [])]
    every = [x for v in by_split.values() for x in v]
    return {
        "questions": len(every),
        "accuracy": _mean(every),
        "family": family,
        "own": {"splits": list(own_splits), "n": len(own), "accuracy": _mean(own)},
        "per_split": {s: {"n": len(v), "accuracy": _mean(v)} for s, v in sorted(by_split.items())},
        "conflict": {
            "n": len(source_way),
            "source_way": _mean(source_way),
            "target_way": _mean(target_way),
            "neither": _mean([not (s or t) for s, t in zip(source_way, target_way)]),
        },
    }


def perplexity(total_nll: float, tokens: int, n_bytes: int) -> dict:
    """Token perplexity, and bits per UTF-8 byte (comparable across tokenizers)."""
    if tokens <= 0:
        return {"tokens": 0, "bytes": n_bytes, "nll_per_token": None, "perplexity": None, "bits_per_byte": None}
    return {
        "tokens": tokens,
        "bytes": n_bytes,
        "nll_per_token": total_nll / tokens,
        "perplexity": math.exp(min(total_nll / tokens, 700.0)),
        "bits_per_byte": total_nll / math.log(2) / max(n_bytes, 1),
    }


_WORD = re.compile(r"\S+")


def length_stats(responses: Sequence[str], token_counts: Sequence[int] | None = None,
                 finish_reasons: Sequence[str] | None = None) -> dict:
    """Words and characters are tokenizer-independent, so rows of different families compare."""
    words = [len(_WORD.findall(r)) for r in responses]
    out = {
        "n": len(responses),
        "mean_words": _mean(words),
        "median_words": statistics.median(words) if words else None,
        "max_words": max(words) if words else None,
        "mean_chars": _mean(len(r) for r in responses),
        "empty": _mean(not r.strip() for r in responses),
    }
    if token_counts is not None:
        out["mean_tokens"] = _mean(token_counts)
    if finish_reasons is not None:
        out["truncated"] = _mean(f == "length" for f in finish_reasons)
    return out
