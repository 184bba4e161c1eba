"""How far an LLM judge agrees with the rule judge on the same responses.

    python analysis/judge_agreement.py --zoo ZOO [--model M] [--judge local:DIR | served:NAME] \
        [--limit N] --out analysis/results/judge_agreement

The model (default: the world's source-post, the teacher) answers the world's eval prompts; the
rule judge (verifiable constraints) and the LLM judge (default: the teacher itself, on distill's
engine) score every answer 1..10. Written: agreement.json and agreement.md with how many answers
each judge could score, Spearman's rho and the mean absolute difference on the answers both
scored. The rule judge is exact about constraints and blind to everything else; a tiny LLM judge
mostly fails to answer in the template's format at all, so agreement there says little.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill import DistillError


def agreement(rule: list, llm: list) -> dict:
    from distill.theory.stats import spearman

    both = [(a.value, b.value) for a, b in zip(rule, llm) if a.value is not None and b.value is not None]
    out = {"n": len(rule), "rule_scored": sum(v.value is not None for v in rule),
           "llm_scored": sum(v.value is not None for v in llm), "both_scored": len(both)}
    if len(both) >= 3:
        out["spearman"] = spearman([a for a, _ in both], [b for _, b in both])
        out["mean_abs_diff"] = sum(abs(a - b) for a, b in both) / len(both)
    else:
        out["spearman"] = out["mean_abs_diff"] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True, help="a world directory (prompts/eval.jsonl with constraints)")
    p.add_argument("--model", help="the model whose answers are judged (default: ZOO/source-post)")
    p.add_argument("--judge", help="the LLM judge (default: local:ZOO/source-post, the world's teacher)")
    p.add_argument("--judge-url", help="base URL of a served judge")
    p.add_argument("--limit", type=int, default=None, help="the first N eval prompts")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--judge-max-new-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        from distill.evaluate.generate import resolve_device_dtype
        from distill.evaluate.judge import JudgeSettings, make_judge
        from distill.evaluate.judge.base import Item
        from distill.evaluate.judge.cache import CachedJudge
        from distill.evaluate.judge.suite import answer
        from distill.io.models import load_causal_lm, load_tokenizer
        from distill.theory.tables import write_table

        zoo, out = Path(a.zoo), Path(a.out)
        rows = [json.loads(x) for x in (zoo / "prompts" / "eval.jsonl").read_text().splitlines()][: a.limit]
        model_dir = a.model or str(zoo / "source-post")
        device, dtype = resolve_device_dtype(None, None)
        model, tok = load_causal_lm(model_dir, dtype, device), load_tokenizer(model_dir)
        gens = answer(model, tok, [[{"role": "user", "content": r["instruction"]}] for r in rows], a.max_new_tokens, 32)
        del model
        items = [Item(r["instruction"], g["text"]) for r, g in zip(rows, gens)]
        rule = make_judge(JudgeSettings(spec="rule"), rows).absolute(items)
        spec = a.judge or f"local:{zoo / 'source-post'}"
        llm = CachedJudge(make_judge(JudgeSettings(spec=spec, url=a.judge_url, max_new_tokens=a.judge_max_new_tokens)),
                          out / "judgments.jsonl")
        res = agreement(rule, llm.absolute(items)) | {"model": model_dir, "llm_judge": llm.name, "rule_judge": "rule"}
    except DistillError as exc:
        print(f"judge_agreement: error: {exc}", file=sys.stderr)
        return 2
    cols = ["answers", "rule judge scored", "LLM judge scored", "both scored", "Spearman rho", "mean abs. difference"]
    row = dict(zip(cols, [res["n"], res["rule_scored"], res["llm_scored"], res["both_scored"], res["spearman"],
                          res["mean_abs_diff"]]))
    write_table(out, "agreement", f"Judge agreement: {res['llm_judge']} vs the rule judge on {model_dir}", cols, [row],
                extra=res)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
