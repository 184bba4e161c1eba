"""A judge without a model: IFEval-style verifiable constraints decide. It knows each prompt's
constraints (prompt rows with a `constraints` list, as the embedded world writes them), so it
judges offline what an LLM judge would judge for those prompts, and is exact about them (and about
nothing else: a response can follow every constraint and still be wrong)."""

from __future__ import annotations

from typing import Iterable, Sequence

from distill.evaluate.checkers import check_strict
from distill.evaluate.judge.base import Item, Judge, Pair, Verdict


class RuleJudge(Judge):
    """absolute: 1 + 9 × the share of the prompt's constraints followed (strict); pairwise: the
    response that follows more of them wins, equal shares tie."""

    version = "rule-v1"

    def __init__(self, rows: Iterable[dict], name: str = "rule"):
        self.name = name
        self.constraints = {r["instruction"].strip(): r["constraints"] for r in rows
                            if isinstance(r.get("constraints"), list) and r.get("instruction")}

    def _share(self, prompt: str, response: str) -> float | None:
        cons = self.constraints.get(prompt.strip())
        if not cons:
            return None
        return sum(check_strict(cons, response)) / len(cons)

    def absolute(self, items: Sequence[Item]) -> list[Verdict]:
        out = []
        for it in items:
            share = self._share(it.prompt, it.response)
            out.append(Verdict(None, "", 1, "the rule judge knows no constraints for this prompt") if share is None
                       else Verdict(round(1 + 9 * share, 6), f"{share:.3f} of the constraints followed"))
        return out

    def pairwise(self, pairs: Sequence[Pair]) -> list[Verdict]:
        out = []
        for p in pairs:
            a, b = self._share(p.prompt, p.a), self._share(p.prompt, p.b)
            if a is None:
                out.append(Verdict(None, "", 1, "the rule judge knows no constraints for this prompt"))
            else:
                out.append(Verdict(1.0 if a > b else 0.0 if a < b else 0.5, f"A {a:.3f}, B {b:.3f}"))
        return out
