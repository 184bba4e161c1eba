"""Recipes: schema validation, fail-fast preflight, and the real mistral-to-qwen recipe end to end
with tiny stand-ins of the same architectures (Mistral source pair, Qwen2 target)."""

import json
from pathlib import Path

import pytest

from distill import DistillError
from distill.cli import main
from distill.recipe_schema import load_recipe
from tiny import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_TO_QWEN = ROOT / "recipes" / "mistral-to-qwen.yaml"

# Mistral-Instruct's own template shape: [INST] ... [/INST] answer</s>
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def test_schema_rejects_unknown_keys_and_wrong_types(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  epoch: 3\n")
    with pytest.raises(DistillError, match=r"bad.yaml: unknown key train.epoch; known keys: .*train.epochs"):
        load_recipe(bad)
    bad.write_text("name: x\ntrain:\n  seeds: zero\n")
    with pytest.raises(DistillError, match=r"'train.seeds' must be a list"):
        load_recipe(bad)
    with pytest.raises(DistillError, match=r"'synthesis.batch_size' must be int"):
        load_recipe(MISTRAL_TO_QWEN, ["synthesis.batch_size=big"])
    with pytest.raises(DistillError, match="expected key=value"):
        load_recipe(MISTRAL_TO_QWEN, ["synthesis.batch_size"])
    r = load_recipe(MISTRAL_TO_QWEN, ["train.seeds=[1, 2]", "train.lr=0.001", "weight_arithmetic.target=/m"])
    assert r.train.seeds == [1, 2] and r.train.lr == 0.001 and r.weight_arithmetic.target == "/m"
    assert load_recipe(MISTRAL_TO_QWEN, ["train.lr=3e-4"]).train.lr == 3e-4  # YAML 1.1 reads this as a string
    with pytest.raises(DistillError, match=r"'train.lr' must be float, got '3e-4x'"):
        load_recipe(MISTRAL_TO_QWEN, ["train.lr=3e-4x"])
    with pytest.raises(DistillError, match=r"synthesis.methods: unknown \['contrast'\]; use any of codit, direct"):
        load_recipe(MISTRAL_TO_QWEN, ["synthesis.methods=[codit, contrast]"])
    # values out of range fail when the recipe loads, not when their stage starts hours later
    with pytest.raises(DistillError, match=r"mistral-to-qwen.yaml: synthesis: alpha must be in \[0, 1\], got 2.0"):
        load_recipe(MISTRAL_TO_QWEN, ["synthesis.alpha=2"])
    with pytest.raises(DistillError, match=r"mistral-to-qwen.yaml: train: need lr > 0"):
        load_recipe(MISTRAL_TO_QWEN, ["train.lr=-1"])


def test_real_recipe_without_checkpoints_fails_fast_naming_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("DISTILL_PROMPTS", raising=False)
    import transformers

    def no_model_loads(*args, **kwargs):  # fail fast = before any model or tokenizer is loaded
        raise AssertionError("the preflight loaded a model or tokenizer")

    for cls in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", no_model_loads)
    rc = main(["run", str(MISTRAL_TO_QWEN), "--set", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "preflight loaded" not in err
    for ref in ("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen2.5-7B"):
        assert ref in err and f"hf download {ref}" in err
    assert "--set source.base=" in err and "the environment variable DISTILL_PROMPTS is not set" in err
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was left behind
    rc = main(["run", str(MISTRAL_TO_QWEN), "--set", f"run_dir={tmp_path / 'run'}", "--set", "source.base=/nope/base"])
    err = capsys.readouterr().err  # a local path that is not there: no `hf download` advice for it
    assert rc == 2 and "source.base directory /nope/base does not exist" in err and "hf download /nope" not in err


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny Mistral base/post sharing a tokenizer with a chat template; a tiny Qwen2 base with another."""
    root = tmp_path_factory.mktemp("stand-ins")
    src_tok = make_tokenizer(chat_template=MISTRAL_TEMPLATE)
    tgt_tok = make_tokenizer(chat_template=None, model="wordpiece", vocab_size=150)
    make_model(root / "mistral-base", "mistral", seed=0, tokenizer=src_tok)
    make_model(root / "mistral-post", "mistral", seed=1, tokenizer=src_tok)
    make_model(root / "mistral-cp", "mistral", seed=2, tokenizer=src_tok)
    make_model(root / "qwen-base", "qwen2", seed=3, tokenizer=tgt_tok)
    prompts = [{"id": f"p{i}", "instruction": f"write the answer in lowercase letters {i}",
                "constraints": [{"kind": "lowercase", "kwargs": {}}]} for i in range(12)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    # An evaluation directory of the world's layout, so the report has every row.
    (root / "eval" / "prompts").mkdir(parents=True)
    (root / "eval" / "knowledge").mkdir()
    (root / "eval" / "text").mkdir()
    (root / "eval" / "prompts" / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:4]))
    qs = [{"id": f"q{i}", "prompt": "the capital of the made up country is", "answer": "a city",
           "split": ["shared", "source_only", "target_only", "conflict"][i % 4],
           "source_answer": "a city", "target_answer": "the river"} for i in range(4)]
    (root / "eval" / "knowledge" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (root / "eval" / "text" / "heldout.jsonl").write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    return root


def _overrides(root: Path, run_dir: Path) -> list[str]:
    sets = {
        "run_dir": run_dir,
        "source.base": root / "mistral-base", "source.post": root / "mistral-post",
        "target.base": root / "qwen-base", "prompts.synthesis": root / "prompts.jsonl",
        "weight_arithmetic.target": root / "mistral-cp",
        "synthesis.max_new_tokens": 6, "synthesis.batch_size": 4, "synthesis.dtype": "null",
        "train.num_gpus": "null", "train.max_steps": 2, "train.max_length": 256, "train.batch_size": 2,
        "train.grad_accum": 1, "train.gradient_checkpointing": "false",
        "evaluate.zoo": root / "eval", "evaluate.max_new_tokens": 6, "evaluate.batch_size": 4,
    }
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


@pytest.mark.slow
def test_mistral_to_qwen_recipe_runs_end_to_end_with_stand_ins_and_resumes(stand_ins, tmp_path, monkeypatch):
    import distill.recipe as recipe_mod

    run_dir = tmp_path / "run"
    args = ["run", str(MISTRAL_TO_QWEN)] + _overrides(stand_ins, run_dir)

    # First attempt: training "crashes" on its first call, after synthesis finished.
    real_stage_train = recipe_mod.Pipeline.stage_train

    def crash(self, method, seed):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_mod.Pipeline, "stage_train", crash)
    assert main(args) == 130
    done = json.loads((run_dir / "stages.json").read_text())
    assert set(done) == {"chat-vector", "weight-arithmetic", "synthesize-codit", "synthesize-direct"}
    rows_before = (run_dir / "data" / "codit" / "data" / "train.jsonl").read_text()

    # Rerun: finished stages are skipped (not redone), the rest completes.
    monkeypatch.setattr(recipe_mod.Pipeline, "stage_train", real_stage_train)
    real_synthesize = recipe_mod.Pipeline.stage_synthesize
    calls = []
    monkeypatch.setattr(recipe_mod.Pipeline, "stage_synthesize", lambda self, m: calls.append(m))
    assert main(args) == 0
    assert calls == []
    assert (run_dir / "data" / "codit" / "data" / "train.jsonl").read_text() == rows_before
    done = json.loads((run_dir / "stages.json").read_text())
    for stage in ("train-codit-seed0", "train-direct-seed0", "evaluate-target-base", "evaluate-codit-seed0",
                  "evaluate-direct-seed0", "evaluate-weight-arithmetic", "evaluate-source-post", "report"):
        assert stage in done, stage
    report = (run_dir / "report.md").read_text()
    for row in ("target base (no tuning)", "target + SFT on direct responses", "target + SFT on CoDIT responses",
                "same-arch target + chat vector", "source post (teacher, upper bound)"):
        assert row in report, row
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "codit-seed0")
    assert tuned.config.model_type == "qwen2"

    # Adding the mask ablation runs only its own stages; codit and direct are reused as they are.
    monkeypatch.setattr(recipe_mod.Pipeline, "stage_synthesize", real_synthesize)
    before = json.loads((run_dir / "stages.json").read_text())
    assert main(args + ["--set", "synthesis.methods=[codit, direct, direct-masked]"]) == 0
    after = json.loads((run_dir / "stages.json").read_text())
    rerun = {name for name in after if name != "report" and after[name] != before.get(name)}
    assert rerun == {"synthesize-direct-masked", "train-direct-masked-seed0", "evaluate-direct-masked-seed0"}
    masked = [json.loads(line) for line in (run_dir / "data" / "direct-masked" / "data" / "train.jsonl").open()]
    assert {(r["method"], r["alpha"], r["beta"], r["amateur"]) for r in masked} == {("direct", 0.01, 0.0, None)}
    assert "target + SFT on direct responses with CoDIT's mask (beta 0)" in (run_dir / "report.md").read_text()

    # A deleted output is made again, though its settings did not change.
    import shutil

    shutil.rmtree(run_dir / "models" / "direct-masked-seed0")
    assert main(args + ["--set", "synthesis.methods=[codit, direct, direct-masked]"]) == 0
    assert (run_dir / "models" / "direct-masked-seed0" / "model.safetensors").is_file()

    # A changed setting reruns the stages it touches and replaces their outputs (no "already exists").
    assert main(args + ["--set", "synthesis.methods=[codit, direct, direct-masked]", "--set", "train.lr=3e-4"]) == 0
    final = json.loads((run_dir / "stages.json").read_text())
    # exactly the retrained models and their scores (evaluating the unchanged models again would be waste)
    retrained = {f"{stage}-{m}-seed0" for stage in ("train", "evaluate") for m in ("codit", "direct", "direct-masked")}
    assert {n for n in final if final[n]["key"] != after[n]["key"]} == retrained | {"report"}
    assert final["synthesize-codit"] == after["synthesize-codit"]
    assert json.loads((run_dir / "models" / "codit-seed0" / "train_config.json").read_text())["lr"] == 3e-4


def test_cross_architecture_weight_arithmetic_is_skipped_and_said(stand_ins, tmp_path):
    from distill.recipe import Pipeline
    from distill.recipe_schema import resolve_references

    recipe = resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, tmp_path)[1::2]), None)
    recipe.weight_arithmetic.target = str(stand_ins / "qwen-base")
    pipeline = Pipeline(recipe, MISTRAL_TO_QWEN)
    pipeline.preflight()
    names = [s.name for s in pipeline.plan()]
    assert "weight-arithmetic" not in names and "chat-vector" not in names
    assert any("same architecture" in n for n in pipeline.notes)


def _dry_run(stand_ins, run_dir, overrides=(), **run_kw) -> list[str]:
    """Pipeline.run with every stage's work replaced by a no-op: the names of the stages that ran."""
    from distill.recipe import Pipeline
    from distill.recipe_schema import resolve_references

    recipe = resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, run_dir)[1::2] + list(overrides)),
                                None)
    pipeline = Pipeline(recipe, MISTRAL_TO_QWEN)
    pipeline.preflight()
    ran, real_plan = [], pipeline.plan

    def plan():
        stages = real_plan()
        for st in stages:
            st.run = lambda name=st.name: ran.append(name) or {}
        return stages

    pipeline.plan = plan
    pipeline.run(**run_kw)
    return ran


def test_changed_train_settings_rerun_the_evaluations_of_the_retrained_models_only(stand_ins, tmp_path):
    everything = _dry_run(stand_ins, tmp_path)
    assert "evaluate-codit-seed0" in everything and "evaluate-weight-arithmetic" in everything
    assert _dry_run(stand_ins, tmp_path) == ["report"]  # nothing changed: only the report is rewritten
    before = json.loads((tmp_path / "stages.json").read_text())
    # A retrained model must be scored again (its stage key includes its producer's key), else the
    # report shows stale scores; the models training does not touch keep theirs.
    ran = _dry_run(stand_ins, tmp_path, ["train.lr=3e-4"])
    assert ran == ["train-codit-seed0", "train-direct-seed0", "evaluate-codit-seed0", "evaluate-direct-seed0",
                   "report"]
    after = json.loads((tmp_path / "stages.json").read_text())
    assert {n for n in after if after[n]["key"] != before[n]["key"]} == set(ran)


def test_from_reruns_the_named_stage_and_everything_after_it(stand_ins, tmp_path):
    names = _dry_run(stand_ins, tmp_path)
    for start, first in (("train", "train-codit-seed0"), ("evaluate-codit-seed0", "evaluate-codit-seed0"),
                         ("synthesize-*", "synthesize-codit")):
        assert _dry_run(stand_ins, tmp_path, start_from=start) == names[names.index(first):], start
    with pytest.raises(DistillError, match=r"--from trian: no such stage; stages: chat-vector, "):
        _dry_run(stand_ins, tmp_path, start_from="trian")


def test_multi_gpu_training_goes_through_the_deepspeed_launcher_with_parseable_flags(stand_ins, tmp_path,
                                                                                     monkeypatch):
    import argparse
    import subprocess

    import distill.recipe as recipe_mod
    from distill.train import add_cli
    from distill.recipe_schema import resolve_references

    recipe = resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, tmp_path)[1::2]), None)
    recipe.train.num_gpus = 8
    pipeline = recipe_mod.Pipeline(recipe, MISTRAL_TO_QWEN)
    pipeline.state.done["synthesize-codit"] = {"key": "k", "outputs": {"data": str(tmp_path / "data")}}
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    pipeline.stage_train("codit", 1)
    cmd = seen[0]
    assert cmd[:5] == ["deepspeed", "--num_gpus", "8", "--module", "distill.train"]
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["train", *cmd[5:], "--local_rank=0"])
    assert args.deepspeed == "zero3" and args.seed == 1 and args.packing and args.max_length == 256
    assert args.out == str(tmp_path / "models" / "codit-seed1")
