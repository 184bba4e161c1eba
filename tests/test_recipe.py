"""Recipes: schema validation, fail-fast preflight, and the real mistral-to-qwen recipe end to end
with tiny stand-ins of the same architectures (Mistral source pair, Qwen2 target)."""

import json
from pathlib import Path

import pytest

from distill import DistillError
from distill.cli import main
from distill.recipe.schema import load_recipe
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
    with pytest.raises(DistillError, match=r"'synthesis.max_new_tokens' must be int"):
        load_recipe(MISTRAL_TO_QWEN, ["synthesis.max_new_tokens=big"])
    with pytest.raises(DistillError, match=r"mistral-to-qwen.yaml: synthesis: batch_size must be a number of rows or "
                                           r"auto, got 'big'"):
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
    import distill.recipe.pipeline as recipe_mod

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
    from distill.recipe.pipeline import Pipeline
    from distill.recipe.schema import resolve_references

    recipe = resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, tmp_path)[1::2]), None)
    recipe.weight_arithmetic.target = str(stand_ins / "qwen-base")
    pipeline = Pipeline(recipe, MISTRAL_TO_QWEN)
    pipeline.preflight()
    names = [s.name for s in pipeline.plan()]
    assert "weight-arithmetic" not in names and "chat-vector" not in names
    assert any("same architecture" in n for n in pipeline.notes)


def _dry_run(stand_ins, run_dir, overrides=(), **run_kw) -> list[str]:
    """Pipeline.run with every stage's work replaced by a no-op: the names of the stages that ran."""
    from distill.recipe.pipeline import Pipeline
    from distill.recipe.schema import resolve_references

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

    import distill.recipe.pipeline as recipe_mod
    from distill.train.cli import add_cli
    from distill.recipe.schema import resolve_references

    recipe = resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, tmp_path)[1::2]), None)
    recipe.train.num_gpus = 8
    pipeline = recipe_mod.Pipeline(recipe, MISTRAL_TO_QWEN)
    pipeline.state.done["synthesize-codit"] = {"key": "k", "outputs": {"data": str(tmp_path / "data")}}
    seen = []
    import distill.recipe.launch as launch

    assert recipe.train.deepspeed == "auto"  # the recipe's; decided once for the launch (here: as 8 GPUs would)
    monkeypatch.setattr(launch, "resolve_deepspeed_auto", lambda model, gpus: "zero3" if gpus == 8 else "?")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    pipeline.stage_train("codit", 1)
    cmd = seen[0]
    assert cmd[:5] == ["deepspeed", "--num_gpus", "8", "--module", "distill.train"]
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["train", *cmd[5:], "--local_rank=0"])
    assert args.deepspeed == "zero3" and args.seed == 1 and args.packing and args.max_length == 256
    assert args.out == str(tmp_path / "models" / "codit-seed1")


THEORY_ON = ["theory.t1=true", "theory.t3=true"]


def test_theory_stages_are_planned_only_when_enabled_and_keyed_by_their_settings(stand_ins, tmp_path):
    from distill.recipe.pipeline import Pipeline
    from distill.recipe.schema import resolve_references

    def plan(overrides=()):
        recipe = resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, tmp_path)[1::2]
                                                + list(overrides)), None)
        pipeline = Pipeline(recipe, MISTRAL_TO_QWEN)
        pipeline.preflight()
        return {st.name: st for st in pipeline.plan()}

    off = list(plan())
    assert not [n for n in off if n.startswith("theory")]  # off by default, in every recipe
    for name in ("tiny", "mistral-to-qwen", "llama3.1-8b-to-qwen2.5-7b", "qwen3-8b-to-llama3.1-8b"):
        theory = load_recipe(ROOT / "recipes" / f"{name}.yaml").theory
        assert not theory.t1 and not theory.t3, name
    assert [n for n in plan(["theory.t1=true"]) if n.startswith("theory")] == ["theory-t1"]
    stages = plan(THEORY_ON)
    names = list(stages)
    # T1 reads the source pair alone: right after the parameter-space stages, before any synthesis;
    # T3 reads every dataset and tuned target: right after the last training stage.
    assert names[:3] == ["chat-vector", "weight-arithmetic", "theory-t1"] and names[3] == "synthesize-codit"
    last_train = max(i for i, n in enumerate(names) if n.startswith("train-"))
    assert names[last_train + 1] == "theory-t3" and names[last_train + 2].startswith("evaluate-")
    assert stages["theory-t3"].inputs == ["synthesize-codit", "synthesize-direct", "train-codit-seed0",
                                          "train-direct-seed0"]
    assert {"theory-t1", "theory-t3"} <= set(stages["report"].inputs)
    assert [n for n in names if n not in ("theory-t1", "theory-t3")] == off  # the rest is unchanged

    # Cached like the other stages: rerun only when what they read changes.
    run = tmp_path / "run"
    assert {"theory-t1", "theory-t3"} <= set(_dry_run(stand_ins, run, THEORY_ON))
    assert _dry_run(stand_ins, run, THEORY_ON) == ["report"]
    for change, rerun in ((["theory.max_new_tokens=8"], ["theory-t1"]),
                          (["theory.lambdas=[0.5]"], ["theory-t1"]),
                          (["theory.chunk_tokens=0"], ["theory-t1"]),
                          (["theory.t3_n=64"], ["theory-t3"]),
                          (["theory.batch_size=2"], ["theory-t1", "theory-t3"]),
                          (["synthesis.chat_template_kwargs={enable_thinking: false}"],
                           ["theory-t1", "synthesize-codit", "synthesize-direct", "train-codit-seed0",
                            "train-direct-seed0", "theory-t3", "evaluate-codit-seed0", "evaluate-direct-seed0"])):
        assert _dry_run(stand_ins, run, THEORY_ON + change) == rerun + ["report"], change
        assert _dry_run(stand_ins, run, THEORY_ON) == rerun + ["report"], change  # and back
    # a retrained target is a new input of T3, not of T1; turning a test off leaves the other as it is
    assert _dry_run(stand_ins, run, THEORY_ON + ["train.lr=3e-4"]) == [
        "train-codit-seed0", "train-direct-seed0", "theory-t3", "evaluate-codit-seed0", "evaluate-direct-seed0",
        "report"]
    assert _dry_run(stand_ins, run, ["theory.t1=true", "train.lr=3e-4"]) == ["report"]


def test_theory_settings_are_checked_when_the_recipe_loads():
    r = load_recipe(MISTRAL_TO_QWEN, ["theory.t1=true", "theory.lambdas=[1, 0.5]", "theory.dtype=bfloat16"])
    assert r.theory.t1 and not r.theory.t3 and r.theory.lambdas == [1.0, 0.5] and r.theory.prompts_limit == 32
    with pytest.raises(DistillError, match=r"unknown key theory.t5; known keys: .*theory.t3_n"):
        load_recipe(MISTRAL_TO_QWEN, ["theory.t5=true"])
    with pytest.raises(DistillError, match=r"mistral-to-qwen.yaml: theory.t3_n must be >= 3, got 1"):
        load_recipe(MISTRAL_TO_QWEN, ["theory.t3_n=1"])
    with pytest.raises(DistillError, match=r"theory.dtype must be auto, float32, bfloat16 or float16, got 'fp8'"):
        load_recipe(MISTRAL_TO_QWEN, ["theory.dtype=fp8"])


def test_theory_stages_run_on_the_stand_ins_and_the_report_links_them(stand_ins, tmp_path, one_thread):
    """T1 and T3 for real, on the pipeline's own synthesized data and tuned targets (a few seconds)."""
    import math

    run_dir = tmp_path / "run"
    sets = {"evaluate.zoo": "null", "prompts.limit": 4, "train.deepspeed": "null", "train.max_steps": 1,
            "theory.t1": "true", "theory.t3": "true", "theory.prompts_limit": 2, "theory.max_new_tokens": 4,
            "theory.t3_n": 6, "theory.lambdas": "[0.5]", "theory.dtype": "float32"}
    args = ["run", str(MISTRAL_TO_QWEN)] + _overrides(stand_ins, run_dir)
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    t1, t3 = (json.loads((run_dir / "theory" / d / f"{name}.json").read_text())
              for d, name in (("t1", "t1_linearisation"), ("t3", "t3_text_correlation")))
    for d, name in (("t1", "t1_linearisation"), ("t3", "t3_text_correlation")):
        for ext in ("md", "csv", "json"):
            assert (run_dir / "theory" / d / f"{name}.{ext}").is_file()
    rows = {r["key"]: r for r in t1["rows"]}
    assert {"cos", "kl_codit_lin", "cos@0.5"} <= set(rows) and rows["cos"]["positions"] == 8  # 2 prompts x 4
    assert all(math.isfinite(r[c]) for r in t1["rows"] for c in ("mean", "median", "p10", "p90"))
    assert [r["tuned target"] for r in t3["rows"]][:3] == ["control: −log p_target_base(y)", "codit-seed0",
                                                           "direct-seed0"]
    assert len(t3["s_src"]) == 6 and all(math.isfinite(x) for x in t3["s_src"])
    assert all(math.isfinite(r[c]) for r in t3["rows"] for c in ("pearson", "spearman", "pearson per word"))
    report = (run_dir / "report.md").read_text()
    assert "## Theory" in report
    for rel in ("theory/t1/t1_linearisation.md", "theory/t3/t3_text_correlation.md"):
        assert f"[{rel}]({rel})" in report
    # A rerun with the same settings reuses both tables.
    before = json.loads((run_dir / "stages.json").read_text())
    assert main(args) == 0
    after = json.loads((run_dir / "stages.json").read_text())
    assert {n: after[n] for n in after if n != "report"} == {n: before[n] for n in before if n != "report"}


def test_gold_sft_row_trains_on_the_teachers_own_data_and_is_checked_before_anything_runs(stand_ins, tmp_path,
                                                                                            monkeypatch):
    from distill.recipe.pipeline import Pipeline
    from distill.recipe.schema import resolve_references

    gold = tmp_path / "sft.jsonl"
    gold.write_text(json.dumps({"instruction": "Say hi.", "response": "hi"}) + "\n")
    ran = _dry_run(stand_ins, tmp_path / "run", [f"source.sft_data={gold}"])
    assert ran.index("train-gold-sft-seed0") < ran.index("evaluate-gold-sft-seed0") < ran.index("report")
    assert "train-gold-sft-seed0" not in _dry_run(stand_ins, tmp_path / "run2")  # only when the recipe names it

    import distill.train.run as train_mod

    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg: seen.append(cfg))
    recipe = resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, tmp_path / "run3")[1::2]
                                            + [f"source.sft_data={gold}"]), None)
    Pipeline(recipe, MISTRAL_TO_QWEN).stage_train("gold-sft", 0)
    assert seen[0].data == str(gold) and seen[0].out == str(tmp_path / "run3" / "models" / "gold-sft-seed0")
    assert seen[0].model == recipe.target.base

    recipe = resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, tmp_path / "run4")[1::2]
                                            + [f"source.sft_data={tmp_path / 'nope.jsonl'}"]), None)
    with pytest.raises(DistillError, match=r"source.sft_data = .*nope.jsonl: not found"):
        Pipeline(recipe, MISTRAL_TO_QWEN).preflight()
    assert not (tmp_path / "run4").exists()
    from distill.recipe.compare import ROW_LABELS

    assert ROW_LABELS["gold-sft"] == "target + SFT on the teacher's own SFT data (text-route ceiling)"
