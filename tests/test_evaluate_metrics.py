"""Metrics of `distill evaluate` on hand-made responses (no models)."""

import json
import math

import pytest

from distill.evaluate.metrics import (METRICS_DIR, answer_matches, instruction_following, knowledge_accuracy, length_stats,
                             perplexity)
from distill.evaluate.checkers import check_loose, check_strict

ROWS = [
    {"id": "a", "constraints": [{"kind": "lowercase", "kwargs": {}}, {"kind": "no_comma", "kwargs": {}}]},
    {"id": "b", "constraints": [{"kind": "end_checker", "kwargs": {"end_phrase": "That is all."}}]},
    {"id": "c", "constraints": [{"kind": "number_bullets", "kwargs": {"num_bullets": 2}}]},
    {"id": "d", "constraints": []},  # no constraints: not counted
]
RESPONSES = [
    "all lowercase, but a comma",          # lowercase ok, no_comma fails
    "Here you go.\nThat is all.\nThanks!",  # strict fails; loose (last line dropped) passes
    "* one\n* two",                         # passes both
    "anything",
]


def test_instruction_following_prompt_and_instruction_levels():
    s = instruction_following(RESPONSES, ROWS, check_strict, check_loose)
    assert s["prompts"] == 3 and s["instructions"] == 4
    assert s["prompt_level_strict"] == pytest.approx(1 / 3)
    assert s["inst_level_strict"] == pytest.approx(2 / 4)
    assert s["prompt_level_loose"] == pytest.approx(2 / 3)
    assert s["inst_level_loose"] == pytest.approx(3 / 4)
    assert s["per_kind"]["no_comma"] == {"n": 1, "strict": 0.0, "loose": 0.0}
    assert s["per_kind"]["end_checker"] == {"n": 1, "strict": 0.0, "loose": 1.0}
    assert s["per_kind"]["number_bullets"]["strict"] == 1.0


def test_instruction_following_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        instruction_following(RESPONSES[:2], ROWS, check_strict, check_loose)


def test_empty_response_follows_nothing():
    s = instruction_following([""], [{"constraints": [{"kind": "no_comma", "kwargs": {}}]}], check_strict, check_loose)
    assert s["prompt_level_strict"] == 0.0 and s["prompt_level_loose"] == 0.0


@pytest.mark.parametrize("cont,answer,ok", [
    (" Qelvar is a city", "Qelvar", True),
    ("qelvar.", "Qelvar", True),
    ("  Qelvar  river", "Qelvar river", True),
    (" Qelvaran", "Qelvar", False),   # a longer name sharing the prefix is not the answer
    (" the Qelvar", "Qelvar", False),
    ("Qelvar", None, False),
])
def test_answer_matches(cont, answer, ok):
    assert answer_matches(cont, answer) is ok


def test_knowledge_accuracy_splits_and_conflicts():
    rows = [
        {"answer": "A", "split": "shared"},
        {"answer": "B", "split": "source_only"},
        {"answer": "C", "split": "target_only"},
        {"answer": "T", "split": "conflict", "source_answer": "S", "target_answer": "T"},
        {"answer": "T2", "split": "conflict", "source_answer": "S2", "target_answer": "T2"},
    ]
    conts = ["A x", "nope", "C", "S said", "zzz"]
    k = knowledge_accuracy(conts, rows, family="target")
    assert k["per_split"]["shared"]["accuracy"] == 1.0
    assert k["per_split"]["source_only"]["accuracy"] == 0.0
    assert k["own"] == {"splits": ["shared", "target_only"], "n": 2, "accuracy": 1.0}
    assert k["conflict"] == {"n": 2, "source_way": 0.5, "target_way": 0.0, "neither": 0.5}
    assert knowledge_accuracy(conts, rows, family="source")["own"]["accuracy"] == 0.5


def test_perplexity_and_bits_per_byte():
    p = perplexity(total_nll=10 * math.log(4), tokens=10, n_bytes=20)
    assert p["perplexity"] == pytest.approx(4.0)
    assert p["bits_per_byte"] == pytest.approx(10 * 2 / 20)
    assert perplexity(0.0, 0, 0)["perplexity"] is None


def test_length_stats():
    s = length_stats(["one two three", "", "a b"], token_counts=[5, 0, 3], finish_reasons=["stop", "stop", "length"])
    assert s["mean_words"] == pytest.approx(5 / 3)
    assert s["median_words"] == 2 and s["max_words"] == 3
    assert s["empty"] == pytest.approx(1 / 3) and s["truncated"] == pytest.approx(1 / 3)
    assert s["mean_tokens"] == pytest.approx(8 / 3)


def test_local_evaluate_modules_match_plain_functions():
    evaluate = pytest.importorskip("evaluate")
    m = evaluate.load(str(METRICS_DIR / "instruction_following"))
    got = m.compute(predictions=RESPONSES[:3], references=[json.dumps(r["constraints"]) for r in ROWS[:3]])
    assert got == instruction_following(RESPONSES[:3], ROWS[:3], check_strict, check_loose)
    k = evaluate.load(str(METRICS_DIR / "knowledge_accuracy"))
    rows = [{"answer": "A", "split": "shared"}, {"answer": "B", "split": "conflict", "source_answer": "C",
                                                  "target_answer": "B"}]
    got = k.compute(predictions=["A", "C"], references=[json.dumps(r) for r in rows], family="source")
    assert got["conflict"]["source_way"] == 1.0 and got["own"]["accuracy"] == 1.0
