"""One judge interface: absolute scores (1..10) and pairwise preferences, from any backend.

A `Judge` takes items and returns one `Verdict` per item, in order. LLM judges (`TextJudge`: a
local Hugging Face model or a served endpoint) render distill's versioned templates, read the
answer with the mode's parser and ask again when it does not parse (up to `retries` times); what
still does not parse is a verdict without a value, with its reason: counted and reported by the
scores, never dropped. The rule judge of the embedded world implements the same two methods.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from distill.evaluate.judge.templates import PARSERS, load_templates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One response to judge on its own (absolute mode)."""

    prompt: str  # the user's request (the last user turn)
    response: str
    history: tuple[tuple[str, str], ...] = ()  # earlier turns as (role, content): MT-Bench's second turn
    checklist: tuple[str, ...] = ()  # WildBench's per-prompt checklist


@dataclass(frozen=True)
class Pair:
    """Two responses to one request (pairwise mode); the judge says which is better, A or B."""

    prompt: str
    a: str
    b: str
    history: tuple[tuple[str, str], ...] = ()


@dataclass
class Verdict:
    value: float | None  # absolute: 1..10; pairwise: 1.0 A better, 0.0 B better, 0.5 tie; None: no verdict
    raw: str = ""  # what the judge said (or the rule judge's reason)
    attempts: int = 1
    error: str | None = None  # why there is no value

    def as_dict(self) -> dict:
        return {"value": self.value, "raw": self.raw, "attempts": self.attempts, "error": self.error}


class Judge(ABC):
    """name: what the cache keys a judgment by (with the template version)."""

    name: str
    version: str = "rule-v1"

    @abstractmethod
    def absolute(self, items: Sequence[Item]) -> list[Verdict]: ...

    @abstractmethod
    def pairwise(self, pairs: Sequence[Pair]) -> list[Verdict]: ...

    def close(self) -> None:
        """Free what the judge holds (a loaded model, a client)."""


def _history(history) -> str:
    return "\n".join(f"{role.capitalize()}: {content}" for role, content in history) or "(none)"


@dataclass
class TextJudge(Judge):
    """A judge that answers in text: templates rendered, answers parsed, unparseable ones asked again."""

    retries: int = 2
    template_file: str | None = None
    _templates: dict = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self._templates, self.version = load_templates(self.template_file)

    @abstractmethod
    def complete(self, chats: list[list[dict]], attempt: int) -> list[str]:
        """One answer per chat (system + user messages). `attempt` > 0: a retry of unparseable answers
        (a local judge samples then instead of decoding greedily, so it can answer differently)."""

    def absolute(self, items: Sequence[Item]) -> list[Verdict]:
        t = self._templates["absolute"]
        chats = [t.render(prompt=i.prompt, response=i.response, history=_history(i.history),
                          checklist="\n".join(f"- {c}" for c in i.checklist) or "(none given)") for i in items]
        return self._ask(chats, "absolute")

    def pairwise(self, pairs: Sequence[Pair]) -> list[Verdict]:
        t = self._templates["pairwise"]
        chats = [t.render(prompt=p.prompt, response_a=p.a, response_b=p.b, history=_history(p.history))
                 for p in pairs]
        return self._ask(chats, "pairwise")

    def _ask(self, chats: list[list[dict]], mode: str) -> list[Verdict]:
        parse = PARSERS[mode]
        verdicts: list[Verdict | None] = [None] * len(chats)
        todo = list(range(len(chats)))
        for attempt in range(self.retries + 1):
            if not todo:
                break
            answers = self.complete([chats[i] for i in todo], attempt)
            still = []
            for i, text in zip(todo, answers):
                value = parse(text)
                verdicts[i] = Verdict(value, text, attempt + 1,
                                      None if value is not None else f"unparseable {mode} answer")
                if value is None:
                    still.append(i)
            todo = still
        if todo:
            log.warning("%s: %d of %d %s answers did not parse after %d attempts (counted, not dropped)",
                        self.name, len(todo), len(chats), mode, self.retries + 1)
        return verdicts
