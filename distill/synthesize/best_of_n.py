"""Best-of-N: N direct samples per prompt, a judge scores each (absolute, 1..10), the best is kept.

The strongest baseline of the public CoDIT code (its judge: gpt-oss-120b on vLLM with a WildBench-
style 1..10 prompt). Sample k of prompt p draws with the seed derived from (seed, "p#k"), so a
resumed run regenerates an unfinished prompt's samples exactly; the judgments are cached in
D/judgments.jsonl, so nothing is judged twice. Ties go to the lowest k; a prompt none of whose
samples got a verdict keeps sample 0, and is counted in the card.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from distill.decoding.engine import Request, Result, derive_seed
from distill.evaluate.judge import JudgeSettings, make_judge
from distill.evaluate.judge.base import Item
from distill.evaluate.judge.cache import CachedJudge

SEP = "\x1f"  # between a prompt id and its sample index in a request key


def sample_key(pid: str, k: int) -> str:
    return f"{pid}{SEP}{k}"


@dataclass
class BestOfN:
    n: int
    seed: int
    settings: JudgeSettings
    cache: Path
    rule_rows: list[dict] = field(default_factory=list)  # prompt rows with constraints (the rule judge)

    def __post_init__(self):
        judge = make_judge(self.settings, self.rule_rows)
        if hasattr(judge, "probe"):
            judge.probe()  # a served judge that is not there: an error before the models load
        self.judge = CachedJudge(judge, self.cache)

    def requests(self, prompts: list[dict], render) -> list[Request]:
        return [Request(sample_key(p["id"], k), render(p), derive_seed(self.seed, f"{p['id']}#{k}"))
                for p in prompts for k in range(self.n)]

    def pick(self, results: Iterable[Result], decode, prompts: dict[str, dict],
             flush_every: int = 8) -> Iterator[tuple[Result, dict]]:
        """(the chosen sample, with the prompt id as key; the row's `best_of_n` record) per prompt,
        as its N samples are done; judged in groups of `flush_every` prompts."""
        samples: dict[str, dict[int, Result]] = defaultdict(dict)
        ready: list[str] = []
        for r in results:
            pid, k = r.key.rsplit(SEP, 1)
            samples[pid][int(k)] = r
            if len(samples[pid]) == self.n:
                ready.append(pid)
            if len(ready) >= flush_every:
                yield from self._judge(ready, samples, decode, prompts)
                ready = []
        yield from self._judge(ready, samples, decode, prompts)

    def _judge(self, ready, samples, decode, prompts):
        if not ready:
            return
        texts = {pid: [decode(samples[pid][k]) for k in range(self.n)] for pid in ready}
        items = [Item(_last_user(prompts[pid]), t) for pid in ready for t in texts[pid]]
        verdicts = self.judge.absolute(items)
        for j, pid in enumerate(ready):
            scores = [v.value for v in verdicts[j * self.n:(j + 1) * self.n]]
            judged = [(s, -k) for k, s in enumerate(scores) if s is not None]
            chosen = -max(judged)[1] if judged else 0
            best = samples.pop(pid)[chosen]
            yield (Result(pid, best.tokens, best.finish_reason, best.prompt_tokens, best.extra),
                   {"row_seed": derive_seed(self.seed, f"{pid}#{chosen}"), "best_of_n": {"n": self.n, "scores": scores, "chosen": chosen, "judge": self.judge.name,
                                  "template_version": self.judge.version}})

    def close(self) -> None:
        self.judge.close()


def _last_user(prompt: dict) -> str:
    return next(m["content"] for m in reversed(prompt["messages"]) if m["role"] == "user")


def summary(rows: list[dict]) -> dict | None:
    """The card's Best-of-N numbers: N, the judge, the chosen and all samples' mean scores."""
    recs = [r["best_of_n"] for r in rows if isinstance(r.get("best_of_n"), dict)]
    if not recs:
        return None
    chosen = [r["scores"][r["chosen"]] for r in recs if r["scores"][r["chosen"]] is not None]
    every = [s for r in recs for s in r["scores"] if s is not None]
    from collections import Counter

    return {"n": recs[0]["n"], "judge": recs[0]["judge"], "template_version": recs[0]["template_version"],
            "rows": len(recs), "samples": sum(len(r["scores"]) for r in recs), "unjudged_samples":
            sum(s is None for r in recs for s in r["scores"]), "rows_without_verdict": len(recs) - len(chosen),
            "mean_chosen": sum(chosen) / len(chosen) if chosen else None,
            "mean_all": sum(every) / len(every) if every else None,
            "chosen_histogram": {str(k): v for k, v in sorted(Counter(round(s) for s in chosen).items())}}
