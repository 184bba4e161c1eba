"""Every constraint checker on hand-written passing and failing responses (IFEval semantics)."""

import random

import pytest

from distill import DistillError
from distill.evaluate.checkers import CONSTRAINTS, check_loose, check_strict, compatible

# kind -> list of (kwargs, response, expected)
CASES = {
    "no_comma": [({}, "Hello world.", True), ({}, "Hello, world.", False)],
    "lowercase": [({}, "all lower case here.", True), ({}, "Not all lower.", False), ({}, "123", False)],
    "uppercase": [({}, "ALL CAPS HERE.", True), ({}, "ALL CAPS bUT ONE.", False)],
    "number_words": [
        ({"relation": "less than", "num_words": 5}, "one two three", True),
        ({"relation": "less than", "num_words": 5}, "one two three four five", False),
        ({"relation": "at least", "num_words": 5}, "a b, c-d e", True),
        ({"relation": "at least", "num_words": 5}, "a b c", False),
    ],
    "number_paragraphs": [
        ({"num_paragraphs": 2}, "First para.\n***\nSecond para.", True),
        ({"num_paragraphs": 2}, "***\nFirst para.\n***\nSecond para.\n***", True),
        ({"num_paragraphs": 2}, "Only one.", False),
        ({"num_paragraphs": 2}, "A\n***\n\n***\nB", False),
    ],
    "number_bullets": [
        ({"num_bullets": 2}, "* one\n* two", True),
        ({"num_bullets": 2}, "Intro\n- a\n  - b", True),
        ({"num_bullets": 2}, "* one\n* two\n* three", False),
        ({"num_bullets": 2}, "**bold**\n* one", False),
    ],
    "json_format": [({}, '```json\n{"a": 1}\n```', True), ({}, '{"answer": "x"}', True), ({}, "{a: 1}", False)],
    "end_checker": [
        ({"end_phrase": "Any other questions?"}, "Velmor. any other questions?", True),
        ({"end_phrase": "Any other questions?"}, '"Velmor. Any other questions?"', True),
        ({"end_phrase": "Any other questions?"}, "Any other questions? Yes.", False),
    ],
    "start_checker": [
        ({"start_phrase": "Sure."}, "  Sure. The capital is Velmor.", True),
        ({"start_phrase": "Sure."}, "The capital is Velmor. Sure.", False),
        ({"start_phrase": "Sure."}, '"Sure. The capital is Velmor."', True),  # a quoted answer still starts so
    ],
    "quotation": [({}, '"quoted text"', True), ({}, 'not "quoted"', False), ({}, '"', False)],
    "title": [({}, "<<My Title>>\ntext", True), ({}, "<<  >> text", False), ({}, "<My Title>", False)],
    "repeat_prompt": [
        ({"prompt_to_repeat": "What is X?"}, "what is x?\nIt is Y.", True),
        ({"prompt_to_repeat": "What is X?"}, "It is Y. What is X?", False),
    ],
    "two_responses": [({}, "A\n******\nB", True), ({}, "A\n******\nA", False), ({}, "A", False),
                      ({}, "A\n******\n\n******\nB", False)],
    "keyword_existence": [
        ({"keywords": ["river", "stone"]}, "The River and a Stone.", True),
        ({"keywords": ["river", "stone"]}, "The river only.", False),
    ],
    "forbidden_words": [
        ({"forbidden_words": ["the", "is"]}, "Velmor capital: theory.", True),
        ({"forbidden_words": ["the", "is"]}, "This IS it.", False),
    ],
    "postscript": [
        ({"postscript_marker": "P.S."}, "Text.\n\nP.S. hi", True),
        ({"postscript_marker": "P.S."}, "Text. PS hi", False),
        ({"postscript_marker": "P.P.S"}, "Text.\nP.P.S hi", True),
        ({"postscript_marker": "P.P.S"}, "Text.\nP.S. hi", False),
    ],
    "number_placeholders": [({"num_placeholders": 2}, "[a] and [b]", True),
                            ({"num_placeholders": 2}, "[a], [b] and [c]", True),  # at least, not exactly
                            ({"num_placeholders": 2}, "[a] only", False)],
    "highlighted_sections": [({"num_highlights": 2}, "*one* and **two**", True),
                             ({"num_highlights": 2}, "*one*, *two* and *three*", True),  # at least
                             ({"num_highlights": 2}, "*one* only **", False)],
}


def test_every_kind_has_cases_and_the_registry_is_complete():
    assert set(CASES) == set(CONSTRAINTS)
    assert len(CONSTRAINTS) >= 12
    assert len({c.category for c in CONSTRAINTS.values()}) >= 8


@pytest.mark.parametrize("kind,kwargs,response,expected",
                         [(k, kw, r, e) for k, cases in CASES.items() for kw, r, e in cases])
def test_checker(kind, kwargs, response, expected):
    assert CONSTRAINTS[kind].check(response, **kwargs) is expected
    assert check_strict([{"kind": kind, "kwargs": kwargs}], response) == [expected]


def test_describe_and_sample_kwargs():
    rng = random.Random(0)
    for kind, c in CONSTRAINTS.items():
        kwargs = c.sample_kwargs(rng, task="What is X?")
        text = c.describe(kwargs)
        assert isinstance(text, str) and len(text) > 10, kind
        assert c.category and c.kind == kind


def test_strict_and_loose():
    cons = [{"kind": "lowercase", "kwargs": {}}, {"kind": "end_checker", "kwargs": {"end_phrase": "That is all."}}]
    response = "Sure! Here you go:\nthe answer is velmor. that is all.\n**Note**"
    assert check_strict(cons, response) == [False, False]
    assert check_loose(cons, response) == [True, True]  # first and last line removed
    assert check_strict(cons, "   ") == [False, False]  # an empty response follows nothing
    assert check_loose([{"kind": "quotation", "kwargs": {}}], "*\"quoted\"*") == [True]
    # only the variant with BOTH the first and the last line removed follows this one
    framed = "Here it is:\nTHE ANSWER IS VELMOR.\nhope that helps"
    assert check_loose([{"kind": "uppercase", "kwargs": {}}], framed) == [True]


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(DistillError, match="unknown constraint kind"):
        check_strict([{"kind": "nope", "kwargs": {}}], "x")


def test_compatible():
    assert compatible(["lowercase", "no_comma"])
    assert not compatible(["lowercase", "uppercase"])
    assert not compatible(["no_comma", "no_comma"])
    # a conflict listed on one side only still rules the pair out, in either order
    assert "postscript" in CONSTRAINTS["lowercase"].conflicts and "lowercase" not in CONSTRAINTS["postscript"].conflicts
    assert not compatible(["lowercase", "postscript"]) and not compatible(["postscript", "lowercase"])
