"""Verifiable instruction constraints in the spirit of IFEval, each with a checker.

`CONSTRAINTS` maps a kind to a `Constraint`: `describe(kwargs)` renders the instruction
text, `sample_kwargs(rng)` draws its arguments, `check(response, **kwargs)` says whether a
response follows it. Kinds with an IFEval counterpart (`ifeval_id`) follow that checker's
semantics exactly (same regexes, same edge cases), so scores are comparable.

`check_strict` / `check_loose` are IFEval's two ways of scoring a response: loose also
accepts the response with its first and/or last line removed, and with `*` removed.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from distill import DistillError
# Small, closed argument vocabularies keep the tiny models' task learnable.
END_PHRASES = ["Is there anything else I can help with?", "Any other questions?", "That is all."]
START_PHRASES = ["Sure.", "Here is the answer.", "Good question."]
KEYWORDS = ["river", "ancient", "famous", "north", "market", "festival", "stone", "garden"]
FORBIDDEN = ["the", "is", "of"]
POSTSCRIPT_MARKERS = ["P.S.", "P.P.S"]


@dataclass(frozen=True)
class Constraint:
    kind: str
    category: str
    describe_fn: Callable[[dict], str]
    check_fn: Callable[..., bool]
    sample_fn: Callable[[random.Random], dict] = lambda rng: {}
    ifeval_id: str | None = None  # the IFEval instruction id with the same semantics
    conflicts: frozenset = field(default_factory=frozenset)  # kinds it cannot be combined with

    def describe(self, kwargs: dict) -> str:
        return self.describe_fn(kwargs)

    def sample_kwargs(self, rng: random.Random, task: str = "") -> dict:
        """Draw arguments; `task` is the task text (repeat_prompt repeats it)."""
        kwargs = self.sample_fn(rng)
        if self.kind == "repeat_prompt":
            kwargs["prompt_to_repeat"] = task
        return kwargs

    def check(self, response: str, **kwargs) -> bool:
        return bool(self.check_fn(response, **kwargs))


# ---- checkers (IFEval semantics where a counterpart exists) -----------------------------

def _no_comma(value: str) -> bool:
    return not re.search(r"\,", value)


def _lowercase(value: str) -> bool:
    return value.islower()  # IFEval also requires langdetect == "en"; our world is English


def _uppercase(value: str) -> bool:
    return value.isupper()


def _count_words(value: str) -> int:
    return len(re.findall(r"\w+", value))  # nltk RegexpTokenizer(r"\w+") as in IFEval


def _number_words(value: str, relation: str, num_words: int) -> bool:
    n = _count_words(value)
    if relation == "less than":
        return n < num_words
    if relation == "at least":
        return n >= num_words
    raise DistillError(f"number_words: relation must be 'less than' or 'at least', got {relation!r}")


def _number_paragraphs(value: str, num_paragraphs: int) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index == 0 or index == len(paragraphs) - 1:
                count -= 1
            else:
                return False
    return count == num_paragraphs


def _number_bullets(value: str, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def _json_format(value: str) -> bool:
    value = (value.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
             .removeprefix("```").removesuffix("```").strip())
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _end_checker(value: str, end_phrase: str) -> bool:
    return value.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _start_checker(value: str, start_phrase: str) -> bool:
    return value.strip().lstrip('"').lower().startswith(start_phrase.strip().lower())


def _quotation(value: str) -> bool:
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def _title(value: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", value))


def _repeat_prompt(value: str, prompt_to_repeat: str) -> bool:
    return value.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _two_responses(value: str) -> bool:
    valid = []
    parts = value.split("******")
    for index, part in enumerate(parts):
        if not part.strip():
            if index != 0 and index != len(parts) - 1:
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _keyword_existence(value: str, keywords: list) -> bool:
    return all(re.search(k, value, flags=re.IGNORECASE) for k in keywords)


def _forbidden_words(value: str, forbidden_words: list) -> bool:
    return not any(re.search(r"\b" + w + r"\b", value, flags=re.IGNORECASE) for w in forbidden_words)


def _postscript(value: str, postscript_marker: str) -> bool:
    value = value.lower()
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif postscript_marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + postscript_marker.lower() + r".*$"
    return bool(re.findall(pattern, value, flags=re.MULTILINE))


def _placeholders(value: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", value)) >= num_placeholders


def _highlights(value: str, num_highlights: int) -> bool:
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip())
    count += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h.removeprefix("**").removesuffix("**").strip())
    return count >= num_highlights


# ---- the registry -------------------------------------------------------------------------

_STRUCTURE = {"json_format", "number_bullets", "number_paragraphs", "two_responses", "title", "quotation",
              "postscript", "start_checker", "end_checker", "repeat_prompt", "number_placeholders",
              "highlighted_sections"}


def _c(kind, category, describe, check, sample=lambda rng: {}, ifeval_id=None, conflicts=()):
    return Constraint(kind, category, describe, check, sample, ifeval_id, frozenset(conflicts))


_ALL = [
    _c("no_comma", "punctuation", lambda k: "Do not use any commas in your response.", _no_comma,
       ifeval_id="punctuation:no_comma"),
    _c("lowercase", "case", lambda k: "Your entire response must be in lowercase letters.", _lowercase,
       ifeval_id="change_case:english_lowercase",
       conflicts={"uppercase", "title", "postscript", "start_checker", "end_checker", "repeat_prompt"}),
    _c("uppercase", "case", lambda k: "Your entire response must be in capital letters.", _uppercase,
       ifeval_id="change_case:english_capital",
       conflicts={"lowercase", "title", "postscript", "start_checker", "end_checker", "repeat_prompt",
                  "number_placeholders", "json_format"}),
    _c("number_words", "length",
       lambda k: f"Answer with {k['relation']} {k['num_words']} words.", _number_words,
       lambda rng: rng.choice([{"relation": "less than", "num_words": 15},
                               {"relation": "at least", "num_words": 30},
                               {"relation": "at least", "num_words": 50}]),
       ifeval_id="length_constraints:number_words",
       conflicts={"repeat_prompt", "two_responses", "number_paragraphs", "number_bullets"}),
    _c("number_paragraphs", "length",
       lambda k: f"Write exactly {k['num_paragraphs']} paragraphs separated by the markdown divider ***.",
       _number_paragraphs, lambda rng: {"num_paragraphs": rng.choice([2, 3])},
       ifeval_id="length_constraints:number_paragraphs", conflicts=_STRUCTURE - {"no_comma"}),
    _c("number_bullets", "lists",
       lambda k: f"Your answer must contain exactly {k['num_bullets']} bullet points in markdown, like * point.",
       _number_bullets, lambda rng: {"num_bullets": rng.choice([2, 3, 4])},
       ifeval_id="detectable_format:number_bullet_lists", conflicts=_STRUCTURE - {"title"}),
    _c("json_format", "json", lambda k: "Wrap your entire output in JSON format.", _json_format,
       ifeval_id="detectable_format:json_format", conflicts=_STRUCTURE),
    _c("end_checker", "startend",
       lambda k: f"Finish your response with the exact phrase: {k['end_phrase']}", _end_checker,
       lambda rng: {"end_phrase": rng.choice(END_PHRASES)}, ifeval_id="startend:end_checker",
       conflicts={"json_format", "two_responses", "postscript", "number_bullets", "number_paragraphs"}),
    _c("start_checker", "startend",
       lambda k: f"Begin your response with the exact phrase: {k['start_phrase']}", _start_checker,
       lambda rng: {"start_phrase": rng.choice(START_PHRASES)},
       conflicts={"json_format", "two_responses", "repeat_prompt", "title", "number_bullets",
                  "number_paragraphs"}),
    _c("quotation", "startend", lambda k: "Wrap your entire response in double quotation marks.", _quotation,
       ifeval_id="startend:quotation", conflicts=_STRUCTURE - {"start_checker", "end_checker"}),
    _c("title", "format", lambda k: "Include a title wrapped in double angular brackets, like <<title>>.",
       _title, ifeval_id="detectable_format:title",
       conflicts=_STRUCTURE - {"number_bullets", "end_checker", "postscript"}),
    _c("repeat_prompt", "combination",
       lambda k: "First repeat the request word for word without change, then give your answer.",
       _repeat_prompt, ifeval_id="combination:repeat_prompt", conflicts=_STRUCTURE - {"end_checker"}),
    _c("two_responses", "combination",
       lambda k: "Give two different responses separated by 6 asterisk symbols: ******.", _two_responses,
       ifeval_id="combination:two_responses", conflicts=_STRUCTURE),
    _c("keyword_existence", "keywords",
       lambda k: "Include the keywords " + " and ".join(k["keywords"]) + " in the response.",
       _keyword_existence, lambda rng: {"keywords": rng.sample(KEYWORDS, 2)},
       ifeval_id="keywords:existence", conflicts={"json_format"}),
    _c("forbidden_words", "keywords",
       lambda k: "Do not include the words " + " or ".join(k["forbidden_words"]) + " in the response.",
       _forbidden_words, lambda rng: {"forbidden_words": rng.sample(FORBIDDEN, 2)},
       ifeval_id="keywords:forbidden_words",
       conflicts=_STRUCTURE | {"keyword_existence", "number_words"}),
    _c("postscript", "content",
       lambda k: f"At the end of your response add a postscript starting with {k['postscript_marker']}",
       _postscript, lambda rng: {"postscript_marker": rng.choice(POSTSCRIPT_MARKERS)},
       ifeval_id="detectable_content:postscript", conflicts=_STRUCTURE - {"title"}),
    _c("number_placeholders", "content",
       lambda k: f"The response must contain at least {k['num_placeholders']} placeholders in square "
                 f"brackets, such as [address].",
       _placeholders, lambda rng: {"num_placeholders": rng.choice([1, 2])},
       ifeval_id="detectable_content:number_placeholders", conflicts=_STRUCTURE),
    _c("highlighted_sections", "format",
       lambda k: f"Highlight at least {k['num_highlights']} sections with markdown, like *highlighted section*.",
       _highlights, lambda rng: {"num_highlights": rng.choice([1, 2])},
       ifeval_id="detectable_format:number_highlighted_sections", conflicts=_STRUCTURE),
]

CONSTRAINTS: dict[str, Constraint] = {c.kind: c for c in _ALL}


def compatible(kinds: Iterable[str]) -> bool:
    """True if no two of `kinds` conflict (conflicts are checked in both directions)."""
    kinds = list(kinds)
    if len(set(kinds)) != len(kinds):
        return False
    return not any(b in CONSTRAINTS[a].conflicts or a in CONSTRAINTS[b].conflicts
                   for i, a in enumerate(kinds) for b in kinds[i + 1:])


def _lookup(kind: str) -> Constraint:
    try:
        return CONSTRAINTS[kind]
    except KeyError:
        raise DistillError(f"unknown constraint kind {kind!r}; known kinds: {', '.join(sorted(CONSTRAINTS))}") from None


def check_strict(constraints: list[dict], response: str) -> list[bool]:
    """One bool per constraint (`{"kind", "kwargs"}`), IFEval's strict rule: an empty
    response follows nothing."""
    return [bool(response.strip()) and _lookup(c["kind"]).check(response, **(c.get("kwargs") or {}))
            for c in constraints]


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: first / last / both lines removed, each also with `*` removed."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


def check_loose(constraints: list[dict], response: str) -> list[bool]:
    """One bool per constraint: followed by any of the loose variants of the response."""
    variants = loose_variants(response)
    return [any(v.strip() and _lookup(c["kind"]).check(v, **(c.get("kwargs") or {})) for v in variants)
            for c in constraints]
