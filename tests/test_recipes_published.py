"""The recipes for the public CoDIT code's pairs: each fails fast naming its checkpoints, and runs
end to end on stand-ins of its families (tokenizers that differ between base and instruct as on the Hub)."""

import json
from pathlib import Path

import pytest

from distill.cli import main
from family_pairs import make_pair

ROOT = Path(__file__).resolve().parents[1]
# recipe -> (its checkpoints, the stand-in families: source pair, target)
PUBLISHED = {
    "llama3.1-8b-to-qwen2.5-7b": (("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B"),
                                  ("llama3.1", "qwen2.5")),
    "qwen3-8b-to-llama3.1-8b": (("Qwen/Qwen3-8B-Base", "Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B"),
                                ("qwen3", "llama3.1")),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_recipe_without_checkpoints_fails_fast_naming_them(name, tmp_path, capsys, monkeypatch):
    import transformers

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("DISTILL_PROMPTS", raising=False)

    def no_model_loads(*args, **kwargs):
        raise AssertionError("the preflight loaded a model or tokenizer")

    for cls in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", no_model_loads)
    rc = main(["run", str(ROOT / "recipes" / f"{name}.yaml"), "--set", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "preflight loaded" not in err
    for ref in PUBLISHED[name][0]:
        assert f"hf download {ref}" in err
    assert "DISTILL_PROMPTS is not set" in err and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """Prompts and an evaluation directory of the world's layout, so the report has every row."""
    root = tmp_path_factory.mktemp("published")
    prompts = [{"id": f"p{i}", "instruction": f"write the answer in lowercase letters {i}",
                "constraints": [{"kind": "lowercase", "kwargs": {}}]} for i in range(8)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    for sub in ("prompts", "knowledge", "text"):
        (root / "eval" / sub).mkdir(parents=True)
    (root / "eval" / "prompts" / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:3]))
    qs = [{"id": f"q{i}", "prompt": "the capital of the made up country is", "answer": "a city",
           "split": ["shared", "source_only", "target_only", "conflict"][i % 4],
           "source_answer": "a city", "target_answer": "the river"} for i in range(4)]
    (root / "eval" / "knowledge" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (root / "eval" / "text" / "heldout.jsonl").write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_recipe_runs_end_to_end_on_stand_ins(name, eval_dir, tmp_path):
    source, target = PUBLISHED[name][1]
    post, base = make_pair(source, tmp_path / "models")
    _, target_base = make_pair(target, tmp_path / "models")
    run_dir = tmp_path / "run"
    sets = {"run_dir": run_dir, "source.base": base, "source.post": post, "target.base": target_base,
            "prompts.synthesis": eval_dir / "prompts.jsonl", "synthesis.max_new_tokens": 6,
            "synthesis.batch_size": 4, "synthesis.dtype": "null", "train.num_gpus": "null", "train.max_steps": 2,
            "train.max_length": 256, "train.batch_size": 2, "train.grad_accum": 1,
            "train.gradient_checkpointing": "false", "evaluate.zoo": eval_dir / "eval",
            "evaluate.max_new_tokens": 6, "evaluate.batch_size": 4}
    args = ["run", str(ROOT / "recipes" / f"{name}.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    done = json.loads((run_dir / "stages.json").read_text())
    for stage in ("synthesize-codit", "synthesize-direct", "train-codit-seed0", "evaluate-codit-seed0", "report"):
        assert stage in done, stage
    card = (run_dir / "data" / "codit" / "README.md").read_text()
    assert "eos token: expert" in card  # the pair's differences reach the card
    rows = [json.loads(line) for line in (run_dir / "data" / "codit" / "data" / "train.jsonl").open()]
    assert len(rows) == 8 and {r["method"] for r in rows} == {"codit"}
    if source == "qwen3":
        prov = json.loads((run_dir / "data" / "codit" / "provenance.json").read_text())
        assert prov["pair"]["chat_template_kwargs"] == {"enable_thinking": False}
    report = (run_dir / "report.md").read_text()
    assert "target + SFT on CoDIT responses" in report
    assert main(args) == 0  # a rerun reuses every stage
    assert json.loads((run_dir / "stages.json").read_text()) == done | {"report": json.loads(
        (run_dir / "stages.json").read_text())["report"]}


def test_a_recipe_whose_pair_cannot_be_decoded_together_stops_before_any_stage(eval_dir, tmp_path, capsys):
    post, _ = make_pair("llama3.1", tmp_path / "models")
    _, other_base = make_pair("qwen2.5", tmp_path / "models")  # another vocabulary
    run_dir = tmp_path / "run"
    rc = main(["run", str(ROOT / "recipes" / "llama3.1-8b-to-qwen2.5-7b.yaml"), "--set", f"run_dir={run_dir}",
               "--set", f"source.post={post}", "--set", f"source.base={other_base}", "--set",
               f"target.base={other_base}", "--set", f"prompts.synthesis={eval_dir / 'prompts.jsonl'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "source.post and source.base cannot be decoded together" in err
    assert "token -> id maps of" in err and not run_dir.exists()
