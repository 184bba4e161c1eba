"""`distill evaluate --suite judge`: the model answers the benchmark (greedy, its own chat template),
the judge scores the answers, and the scores join the others in scores.json.

absolute: each answer 1..10 (with the prompt's checklist when the benchmark has one); pairwise:
the answer against the reference, judged in both orders, as raw and length-controlled win rates;
mt-bench: the model answers the second turn after its own first answer, each turn judged 1..10.
"""

from __future__ import annotations

import logging
from pathlib import Path

from distill.evaluate.judge import JudgeSettings, make_judge
from distill.evaluate.judge.base import Item, Pair
from distill.evaluate.judge.benchmarks import Benchmark
from distill.evaluate.judge.cache import CachedJudge
from distill.evaluate.judge.scores import absolute_summary, position_bookkeeping, preferences, win_rates

log = logging.getLogger(__name__)


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """The model's own chat template with a generation prompt, or the turns as plain lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
    return "\n".join(m["content"] for m in messages) + "\n", False


def answer(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[dict]:
    from distill.evaluate.generate import encode_prompts, generate_greedy

    rendered = [render_chat(tokenizer, c) for c in conversations]
    ids = encode_prompts(tokenizer, [t for t, _ in rendered], rendered[0][1])
    return generate_greedy(model, tokenizer, ids, max_new_tokens, batch_size, desc="judge suite")


def prepare_judge(bench: Benchmark, settings: JudgeSettings):
    """The judge, built and (a served one) reached before the evaluated model loads."""
    judge = make_judge(settings, [it.row for it in bench.items])
    if hasattr(judge, "probe"):
        judge.probe()
    return judge


def judge_suite(model, tokenizer, bench: Benchmark, judge, cache: Path, max_new_tokens: int,
                batch_size: int, answered: dict[str, dict] | None = None) -> tuple[dict, list[dict]]:
    """`answered`: {id: generation} the model already gave to these very prompts (the `if` suite's, on
    the same file with the same settings): judged as they are, not generated again."""
    judge = CachedJudge(judge, cache)
    items = bench.items
    history = [[{"role": r, "content": c} for r, c in it.history] for it in items]
    if answered and all(it.id in answered and not it.history for it in items):
        first = [answered[it.id] for it in items]
    else:
        first = answer(model, tokenizer, [h + [{"role": "user", "content": it.turns[0]}]
                                          for h, it in zip(history, items)], max_new_tokens, batch_size)
    records = [{"suite": "judge", "id": it.id, "turn": 1, "response": g["text"], "finish_reason": g["finish_reason"]}
               for it, g in zip(items, first)]
    out = {"benchmark": bench.name, "mode": bench.mode, "judge": judge.name, "template_version": judge.version,
           "cache": str(cache)}
    try:
        if bench.mode == "pairwise":
            prompts = [it.turns[0] for it in items]
            hist = [tuple(it.history) for it in items]
            mine = [g["text"] for g in first]
            refs = [it.reference for it in items]
            v1 = judge.pairwise([Pair(p, m, r, h) for p, m, r, h in zip(prompts, mine, refs, hist)])
            v2 = judge.pairwise([Pair(p, r, m, h) for p, m, r, h in zip(prompts, mine, refs, hist)])
            prefs = preferences(v1, v2)
            out.update(win_rates(prefs, [len(m) for m in mine], [len(r) for r in refs]))
            out["positions"] = position_bookkeeping(v1, v2)
            for rec, a, b, p in zip(records, v1, v2, prefs):
                rec.update(preference=p, verdict_model_first=a.value, verdict_model_second=b.value)
        else:
            v = judge.absolute([Item(it.turns[0], g["text"], tuple(it.history), tuple(it.checklist))
                                for it, g in zip(items, first)])
            out["turn1"] = absolute_summary(v)
            for rec, x in zip(records, v):
                rec["score"] = x.value
            verdicts = list(v)
            if bench.mode == "mt-bench":
                two = [i for i, it in enumerate(items) if len(it.turns) > 1]
                convs = [history[i] + [{"role": "user", "content": items[i].turns[0]},
                                       {"role": "assistant", "content": first[i]["text"]},
                                       {"role": "user", "content": items[i].turns[1]}] for i in two]
                second = answer(model, tokenizer, convs, max_new_tokens, batch_size) if two else []
                v2 = judge.absolute([Item(items[i].turns[1], g["text"],
                                          (*items[i].history, ("user", items[i].turns[0]),
                                           ("assistant", first[i]["text"])), tuple(items[i].checklist))
                                     for i, g in zip(two, second)])
                out["turn2"] = absolute_summary(v2)
                verdicts += v2
                records += [{"suite": "judge", "id": items[i].id, "turn": 2, "response": g["text"],
                             "finish_reason": g["finish_reason"], "score": x.value}
                            for i, g, x in zip(two, second, v2)]
            out.update({k: val for k, val in absolute_summary(verdicts).items()})
    finally:
        judge.close()
    out["asked"] = judge.asked  # judgments asked in this run (the rest came from the cache)
    return out, records
