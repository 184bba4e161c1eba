"""distill's constraint checkers agree with IFEval's own checker code (from lm-evaluation-harness).

Needs the optional extra `lm-eval[ifeval]`; skipped cleanly without it. IFEval's word/sentence
counters need nltk's punkt_tab data, which nothing here downloads: kinds whose IFEval checker
cannot run offline are reported and skipped, the others must agree on every response.

One deliberate difference (distill/evaluate/checkers.py): IFEval's case checkers also demand
that langdetect call the text English, which made-up world words and short strings fail at
random; the comparison pins language detection to "en" so the case rules themselves are compared.
"""

import random

import pytest

from distill.evaluate.checkers import CONSTRAINTS, check_loose, check_strict

ifeval = pytest.importorskip("lm_eval.tasks.ifeval.utils", reason="lm-evaluation-harness (lm-eval[ifeval]) not installed")

TASK = "Describe the old stone market by the river"
POOL = [
    "", "   ", "hello world", "Hello, world.", "ALL CAPS HERE", "all lower case here with no commas",
    "* one\n* two", "* one\n* two\n* three\n* four", "- dash\n- list", "1. numbered\n2. list",
    '{"answer": "yes"}', '```json\n{"a": 1}\n```', "not json {", '"quoted response"', '"half quoted',
    "<<A Title>>\nbody text", "no title here", "Dear [name], meet me at [address].", "one [placeholder]",
    "This is *highlighted* and *another one* too.", "**bold** only", "Body.\nP.S. remember this",
    "Body.\nP.P.S also this", "para one\n***\npara two", "para one\n***\npara two\n***\npara three",
    "first answer\n******\nsecond answer", "same\n******\nsame", "Any other questions?",
    "Here it is. That is all.", "Sure. That is all.\nExtra line", "Is there anything else I can help with?",
    "Here is the answer. The famous ancient river runs north", "the market festival is in the stone garden",
    "Nothing of the kind is here", TASK + " The market is old.", "Intro line\n" + TASK + " done",
    "Sure. one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen",
    "Good question.\n* a\n* b\nThat is all.", "*quoted*\n\"x\"",
]


def _rows():
    rng = random.Random(0)
    for kind, c in sorted(CONSTRAINTS.items()):
        if not c.ifeval_id:
            continue
        seen = set()
        for _ in range(6):
            kwargs = c.sample_kwargs(rng, task=TASK)
            key = repr(sorted(kwargs.items()))
            if key not in seen:
                seen.add(key)
                yield kind, c.ifeval_id, kwargs


def test_constraint_checkers_agree_with_ifeval(monkeypatch):
    from lm_eval.tasks.ifeval import instructions

    monkeypatch.setattr(instructions.langdetect, "detect", lambda text: "en")
    compared, unavailable, disagreements = set(), {}, []
    for kind, ifeval_id, kwargs in _rows():
        inp = ifeval.InputExample(key=0, instruction_id_list=[ifeval_id], prompt=TASK, kwargs=[kwargs])
        for response in POOL:
            try:
                ref_strict = ifeval.test_instruction_following_strict(inp, response).follow_instruction_list[0]
                ref_loose = ifeval.test_instruction_following_loose(inp, response).follow_instruction_list[0]
            except LookupError as exc:  # nltk data absent offline
                unavailable[kind] = str(exc).strip().splitlines()[0][:80]
                break
            constraint = [{"kind": kind, "kwargs": kwargs}]
            ours = (check_strict(constraint, response)[0], check_loose(constraint, response)[0])
            if ours != (ref_strict, ref_loose):
                disagreements.append((kind, kwargs, response, ours, (ref_strict, ref_loose)))
            compared.add(kind)
    if unavailable:
        print(f"IFEval checkers not runnable offline (nltk data): {sorted(unavailable)}")
    assert not disagreements, "\n".join(f"{k} {kw} {r!r}: distill {o} vs IFEval {e}"
                                        for k, kw, r, o, e in disagreements[:20])
    with_counterpart = {k for k, c in CONSTRAINTS.items() if c.ifeval_id}
    assert compared | set(unavailable) == with_counterpart
    assert len(compared) >= len(with_counterpart) - 2, f"too few kinds compared: {sorted(compared)}"
