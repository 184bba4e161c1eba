"""`distill evaluate` end to end on tiny random models and the fixture world (tests/fixtures/eval_zoo)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from distill import DistillError
from distill.evaluate.run import default_scores_path, evaluate, responses_path
from distill.evaluate.metrics import instruction_following, knowledge_accuracy
from distill.evaluate.checkers import check_loose, check_strict
from tiny import make_model, make_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "eval_zoo"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    z = tmp_path_factory.mktemp("zoo") / "zoo"
    shutil.copytree(FIXTURE, z)
    # Two families with different tokenizers; only the source one has a chat template.
    make_model(z / "source-base", arch="mistral", vocab_size=200, tokenizer=make_tokenizer(vocab_size=200))
    tgt_tok = make_tokenizer(vocab_size=150, chat_template=None, model="wordpiece")
    make_model(z / "target-base", arch="qwen2", vocab_size=len(tgt_tok), tokenizer=tgt_tok, seed=1)
    return z


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_scores_are_consistent_with_written_responses(zoo, tmp_path):
    out = tmp_path / "s.json"
    scores = evaluate(zoo / "source-base", zoo, out=out, max_new_tokens=6, batch_size=2)
    assert json.loads(out.read_text()) == scores
    assert scores["family"] == "source" and scores["chat_template"] is True
    assert scores["if"]["prompt_format"] == "chat_template"
    recs = _rows(responses_path(out))
    prompts = _rows(zoo / "prompts" / "eval.jsonl")
    responses = [r["response"] for r in recs if r["suite"] == "if"]
    expected = instruction_following(responses, prompts, check_strict, check_loose)
    assert {k: scores["if"][k] for k in expected} == expected
    assert all(r["tokens"] <= 6 for r in recs if r["suite"] == "if")
    questions = _rows(zoo / "knowledge" / "questions.jsonl")
    conts = [r["continuation"] for r in recs if r["suite"] == "knowledge"]
    assert scores["knowledge"] == knowledge_accuracy(conts, questions, "source")
    assert set(scores["knowledge"]["per_split"]) == {"shared", "source_only", "target_only", "conflict"}


def test_perplexity_matches_the_models_own_loss(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scores = evaluate(zoo / "target-base", zoo, suites=("ppl",), out=tmp_path / "p.json", batch_size=2)
    tok = AutoTokenizer.from_pretrained(zoo / "target-base")
    model = AutoModelForCausalLM.from_pretrained(zoo / "target-base", dtype=torch.float32)
    nll = n = 0
    for row in _rows(zoo / "text" / "heldout.jsonl"):
        ids = torch.tensor([tok(row["text"])["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert scores["ppl"]["tokens"] == n
    assert scores["ppl"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert scores["family"] == "target"


def test_model_without_chat_template_gets_plain_prompts_and_default_out(zoo):
    scores = evaluate(zoo / "target-base", zoo, suites=("if",), max_new_tokens=4)
    assert scores["chat_template"] is False and scores["if"]["prompt_format"].startswith("plain")
    assert (zoo / "target-base" / "scores.json").exists()


def test_missing_and_bad_inputs_are_clear_errors(zoo, tmp_path):
    with pytest.raises(DistillError, match="eval.jsonl not found"):
        evaluate(zoo / "source-base", tmp_path, suites=("if",), out=tmp_path / "x.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi"}\n')
    with pytest.raises(DistillError, match=r"bad.jsonl:1: row lacks \['constraints'\]"):
        evaluate(zoo / "source-base", zoo, suites=("if",), out=tmp_path / "x.json", prompts=str(bad))
    with pytest.raises(DistillError, match="unknown suite"):
        evaluate(zoo / "source-base", zoo, suites=("vibes",))


def test_lm_eval_pass_through_says_how_to_get_it(zoo, tmp_path):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(DistillError, match=r"pip install 'distill\[lmeval\]'"):
            evaluate(zoo / "source-base", None, suites=(), out=tmp_path / "x.json", lm_eval_tasks=["ifeval"])
    else:  # installed, but no task data cached here: still a DistillError naming the cache
        with pytest.raises(DistillError, match="datasets cache"):
            evaluate(zoo / "source-base", None, suites=(), out=tmp_path / "x.json", lm_eval_tasks=["no_such_task_x"])


def test_cli_help_explains_every_option(capsys):
    from distill.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for opt in ("--model", "--zoo", "--suite", "--out", "--batch-size", "--max-new-tokens", "--device", "--dtype",
                "--lm-eval", "--family", "--limit"):
        assert opt in text


def test_on_the_micro_world(micro_zoo, tmp_path):
    """The real zoo layout: every split present, families recognised, conflicts counted."""
    for name, family in (("source-post", "source"), ("target-base", "target")):
        s = evaluate(micro_zoo / name, micro_zoo, out=tmp_path / f"{name}.json", max_new_tokens=4, limit=8)
        assert s["family"] == family
        assert s["if"]["prompts"] == 8 and s["if"]["instructions"] >= 8
        assert s["knowledge"]["questions"] == 8 and s["ppl"]["tokens"] > 0
    full = evaluate(micro_zoo / "source-cp", micro_zoo, suites=("knowledge",), out=tmp_path / "cp.json")
    assert set(full["knowledge"]["per_split"]) == {"shared", "source_only", "target_only", "conflict"}
    assert full["knowledge"]["conflict"]["n"] == full["knowledge"]["per_split"]["conflict"]["n"] > 0


def test_scores_of_a_hub_model_do_not_go_into_the_hf_cache(tmp_path):
    local = tmp_path / "m"
    local.mkdir()
    assert default_scores_path(str(local), local) == local / "scores.json"
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"  # where a hub id resolves
    assert default_scores_path("org/name", snapshot) == Path("scores") / "org--name.json"
