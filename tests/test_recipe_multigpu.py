"""A recipe on every GPU of a node: synthesis and evaluation launched through torchrun with the
config they get in process, evaluation split across ranks with the one-process scores, and the
report's wall times and GPU-hours. CPU only: two CPU processes stand in for two GPUs."""

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest

from distill import DistillError
from distill.cli import build_parser
from distill.config import config_flags, from_args
from distill.evaluate.config import EvaluateConfig
from distill.recipe.launch import stage_flags
from distill.recipe.pipeline import Pipeline
from distill.recipe.schema import evaluate_config, load_recipe, resolve_references, synthesize_config
from distill.synthesize.config import SynthesizeConfig
from test_recipe import MISTRAL_TO_QWEN, _overrides, stand_ins  # noqa: F401 - stand_ins: the module fixture
from test_stage_configs import _fields, _other


def _recipe(stand_ins, run_dir, sets=()):
    return resolve_references(load_recipe(MISTRAL_TO_QWEN, _overrides(stand_ins, run_dir)[1::2] + list(sets)), None)


def _parse(cmd: list[str], cls):
    """The config a launched rank builds from its command line (`-m distill.cli COMMAND FLAGS`)."""
    argv = cmd[cmd.index("distill.cli") + 1:]
    return from_args(cls, build_parser(argv).parse_args(argv))


def _fake_launcher(monkeypatch):
    """subprocess.run recording each command and writing what the ranks would have written."""
    seen = []

    def run(cmd, **kw):
        seen.append((cmd, kw.get("env") or {}))
        out = Path(cmd[cmd.index("--out") + 1])
        if "synthesize" in cmd:
            (out / "data").mkdir(parents=True)
            (out / "data" / "train.jsonl").write_text("")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", run)
    return seen


def test_a_multi_gpu_recipe_launches_synthesis_and_evaluation_through_torchrun(stand_ins, tmp_path, monkeypatch):
    recipe = _recipe(stand_ins, tmp_path, ["train.num_gpus=8"])
    pipeline = Pipeline(recipe, MISTRAL_TO_QWEN)
    seen = _fake_launcher(monkeypatch)
    pipeline.stage_synthesize("direct")
    pipeline.stage_evaluate("target-base", recipe.target.base)
    (synth, env), (evaluate, _) = seen
    for cmd, command in ((synth, "synthesize"), (evaluate, "evaluate")):
        at = cmd.index("--standalone")
        assert cmd[0].endswith("torchrun") or cmd[1:at] == ["-m", "torch.distributed.run"]
        assert cmd[at:at + 6] == ["--standalone", "--nproc_per_node", "8", "-m", "distill.cli", command]
    # each rank builds exactly the config the stage would run with in the pipeline's own process
    assert _parse(synth, SynthesizeConfig) == synthesize_config(recipe, "direct", str(tmp_path / "data" / "direct"))
    assert _parse(evaluate, EvaluateConfig) == evaluate_config(recipe, recipe.target.base,
                                                               str(tmp_path / "scores" / "target-base.json"))
    # the launch's own identity, and none of the rank variables an in-process stage may have left
    assert env["DISTILL_LAUNCH_ID"] and not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(env)

    # each stage's own num_gpus wins over train's; one process runs in the pipeline's
    import distill.evaluate.run as evaluate_mod
    import distill.synthesize.run as synth_mod

    seen.clear()
    in_process = []
    monkeypatch.setattr(synth_mod, "synthesize", lambda cfg: in_process.append(cfg.method))
    monkeypatch.setattr(evaluate_mod, "run_evaluation", lambda cfg: in_process.append(cfg.model))
    pipeline = Pipeline(_recipe(stand_ins, tmp_path / "r2", ["train.num_gpus=8", "synthesis.num_gpus=1",
                                                            "evaluate.num_gpus=2"]), MISTRAL_TO_QWEN)
    pipeline.stage_synthesize("codit")
    pipeline.stage_evaluate("target-base", recipe.target.base)
    assert in_process == ["codit"] and [c[c.index("--nproc_per_node") + 1] for c, _ in seen] == ["2"]
    with pytest.raises(DistillError, match=r"synthesis.num_gpus must be >= 1 \(or null: train.num_gpus\), got 0"):
        load_recipe(MISTRAL_TO_QWEN, ["synthesis.num_gpus=0"])
    # a setting no flag can carry stops the stage before anything is launched, naming the recipe and the way out
    seen.clear()
    pipeline = Pipeline(_recipe(stand_ins, tmp_path / "r3", ["train.num_gpus=8", "prompts.max_prompt_chars=null"]),
                        MISTRAL_TO_QWEN)
    with pytest.raises(DistillError, match=r"mistral-to-qwen.yaml: synthesis: max_prompt_chars = None cannot be "
                                           r"given .* or set synthesis.num_gpus: 1"):
        pipeline.stage_synthesize("codit")
    assert seen == []


def test_the_gpu_count_is_no_part_of_a_stages_key_and_the_plan_records_it(stand_ins, tmp_path, monkeypatch):
    import torch

    def plan(sets):
        pipeline = Pipeline(_recipe(stand_ins, tmp_path, sets), MISTRAL_TO_QWEN)
        pipeline.preflight()
        return {st.name: st for st in pipeline.plan()}

    one, eight = plan([]), plan(["train.num_gpus=8"])
    for name in ("synthesize-codit", "evaluate-codit-seed0", "evaluate-target-base"):
        assert one[name].settings == eight[name].settings, name  # the same output on one GPU or many: reused
        assert (one[name].processes, eight[name].processes, eight[name].gpus) == (1, 8, 0), name  # no CUDA here
    assert one["train-codit-seed0"].settings != eight["train-codit-seed0"].settings  # more ranks: another global batch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    on_gpus = plan(["train.num_gpus=8", "evaluate.device=cpu"])
    assert {n: on_gpus[n].gpus for n in ("chat-vector", "synthesize-codit", "train-codit-seed0",
                                         "evaluate-target-base", "report")} == {
        "chat-vector": 0, "synthesize-codit": 8, "train-codit-seed0": 8, "evaluate-target-base": 0, "report": 0}


@pytest.mark.parametrize("cls", [SynthesizeConfig, EvaluateConfig])
def test_every_setting_reaches_a_launched_rank(cls):
    """Each field set to another value alone: its flags parse back to the very same config."""
    base = {SynthesizeConfig: dict(expert="E", amateur="A", prompts="P", out="D"),
            EvaluateConfig: dict(model="M", out="S.json")}[cls]
    command = "synthesize" if cls is SynthesizeConfig else "evaluate"
    for f, tp, default in _fields(cls):
        if f.name in base:
            continue
        cfg = cls(**base, **{f.name: _other(f.name, tp, default)})
        assert _parse(["distill.cli", command, *stage_flags(command, cfg, "x")], cls) == cfg, f.name
    # what no flag can say is an error naming the value and the way out, not a rank running with another one
    cfg = cls(**base, **({"max_prompt_chars": None} if cls is SynthesizeConfig else {"suites": []}))
    with pytest.raises(DistillError, match=r"x: (max_prompt_chars = None|suites = \[\]) cannot be given to "
                                           r"`distill \w+` on its command line.*set x.num_gpus: 1"):
        stage_flags(command, cfg, "x")
    assert config_flags(EvaluateConfig(model="M")) == ["--model", "M"]  # defaults: no flag


def _eval_dir(root: Path) -> Path:
    """A world-layout directory with items of many lengths: several batches per rank at batch size 2."""
    ev = root / "eval-many"
    for d in ("prompts", "knowledge", "text"):
        (ev / d).mkdir(parents=True)
    prompts = [{"id": f"p{i}", "instruction": "write the answer in lowercase letters" + " now" * (i * 3 % 7),
                "constraints": [{"kind": "lowercase", "kwargs": {}}]} for i in range(7)]
    qs = [{"id": f"q{i}", "prompt": "the capital of the made up country is" + " big" * i, "answer": "a city",
           "split": ["shared", "source_only", "target_only", "conflict"][i % 4], "source_answer": "a city",
           "target_answer": "the river"} for i in range(5)]
    texts = [{"text": "the quick brown fox " * (i + 1)} for i in range(3)]
    for rel, rows in (("prompts/eval.jsonl", prompts), ("knowledge/questions.jsonl", qs), ("text/heldout.jsonl", texts)):
        (ev / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ev


def test_evaluation_on_two_ranks_scores_exactly_as_one_process(stand_ins, tmp_path, one_thread):
    from distill.evaluate.run import responses_path, run_evaluation
    from distill.evaluate.shards import Shard
    from distill.recipe.launch import launch_evaluation

    # one process batches the items longest first, two at a time; rank r takes every other batch from its r-th
    assert Shard(0, 2).items([3, 9, 1, 7, 5], 2) == [1, 3, 2] and Shard(1, 2).items([3, 9, 1, 7, 5], 2) == [4, 0]
    cfg = EvaluateConfig(model=str(stand_ins / "mistral-post"), zoo=str(_eval_dir(tmp_path)), batch_size=2,
                         max_new_tokens=6, out=str(tmp_path / "one" / "scores.json"))
    (tmp_path / "one").mkdir()
    one = run_evaluation(cfg)
    two = dataclasses.replace(cfg, out=str(tmp_path / "two" / "scores.json"))
    (tmp_path / "two").mkdir()
    launch_evaluation(two, 2)  # torchrun, two CPU ranks
    merged = json.loads(Path(two.out).read_text())
    assert {k: v for k, v in merged.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
    assert responses_path(Path(two.out)).read_text() == responses_path(Path(cfg.out)).read_text()
    # no part and no lock left beside the scores
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["scores.json", "scores.responses.jsonl"]


def test_synthesis_on_two_ranks_writes_the_one_process_dataset(stand_ins, tmp_path, one_thread):
    from distill.synthesize.output import discard_before_launch

    sets = ["prompts.limit=6", "synthesis.max_new_tokens=5", "synthesis.batch_size=2"]
    single = Pipeline(_recipe(stand_ins, tmp_path / "one", sets), MISTRAL_TO_QWEN)
    single.stage_synthesize("codit")
    Pipeline(_recipe(stand_ins, tmp_path / "two", sets + ["synthesis.num_gpus=2"]), MISTRAL_TO_QWEN) \
        .stage_synthesize("codit")

    def rows(run):
        return [json.loads(line) for line in (run / "data" / "codit" / "data" / "train.jsonl").open()]

    assert rows(tmp_path / "two") == rows(tmp_path / "one") and len(rows(tmp_path / "one")) == 6
    shards = tmp_path / "two" / "data" / "codit" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    # Other settings on a rerun: the launching process discards the older rows once (ranks may not).
    cfg = synthesize_config(_recipe(stand_ins, tmp_path / "two", sets + ["synthesis.temperature=0.5"]), "codit",
                            str(tmp_path / "two" / "data" / "codit"))
    assert discard_before_launch(cfg)
    assert not any(shards.iterdir()) and not (shards.parent / "provenance.json").exists()
    assert not discard_before_launch(cfg)


def test_report_gives_each_stages_wall_time_and_gpu_hours_and_says_what_was_cached(stand_ins, tmp_path):
    from distill.recipe.report import stage_lines

    stages = {"synthesize-codit": {"outputs": {"data": "D"}, "seconds": 1800.0, "processes": 8, "gpus": 8},
              "chat-vector": {"outputs": {}, "seconds": 30.0, "processes": 1, "gpus": 0},
              "evaluate-x": {"outputs": {}, "seconds": 12.0, "processes": 2, "gpus": 0},
              "older": {"outputs": {}}, "report": {"outputs": {}, "seconds": 1.0}}
    text = "\n".join(stage_lines(stages, ran=["synthesize-codit", "evaluate-x"]))
    assert "| synthesize-codit | ran | 30.0 min | 8 | 4.00 | data: `D` |" in text
    assert "| chat-vector | cached | 30.0 s when it ran | cpu | 0 |  |" in text
    assert "| evaluate-x | ran | 12.0 s | cpu, 2 processes | 0 |  |" in text
    assert "| older | cached | not recorded | not recorded | not recorded |  |" in text and "| report |" not in text
    assert ("This run: 2 stages, 30.2 min, 4.00 GPU-hours; 2 stages cached, which took 30.0 s and 0 GPU-hours "
            "when they ran.") in text

    # A real run of the pipeline (the stages' work left out, the report written): times on the CPU, then cached.
    def run():
        pipeline = Pipeline(_recipe(stand_ins, tmp_path / "run"), MISTRAL_TO_QWEN)
        pipeline.preflight()
        real_plan = pipeline.plan

        def plan():
            stages = real_plan()
            for st in stages:
                if st.name != "report":
                    st.run = lambda: {}
            return stages

        pipeline.plan = plan
        return pipeline.run().read_text()

    first = run()
    assert "| synthesize-codit | ran | 0.0 s | cpu | 0 |" in first and "(every stage ran on the CPU)." in first
    done = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert {k: done["synthesize-codit"][k] for k in ("seconds", "processes", "gpus")} == \
        {"seconds": 0.0, "processes": 1, "gpus": 0}
    again = run()
    assert "| synthesize-codit | cached | 0.0 s when it ran | cpu | 0 |" in again
    assert "This run: 0 stages, 0.0 s, 0 GPU-hours (every stage ran on the CPU); " in again


def test_deepspeed_auto_is_decided_once_for_all_ranks_of_a_launch(tmp_path, monkeypatch):
    import distill.recipe.launch as launch
    from distill.train.config import TrainConfig
    from tiny import make_model

    model = tmp_path / "target"
    make_model(model)
    assert launch.resolve_deepspeed_auto(str(model), 8) == "zero2"  # a child process; without CUDA: zero2
    commands = []
    monkeypatch.setattr(launch, "resolve_deepspeed_auto", lambda m, n: f"zero3-for-{n}")
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    launch.launch_train(TrainConfig(model=str(model), data="d.jsonl", out=str(tmp_path / "m"), deepspeed="auto"), 4)
    flags = commands[0]
    assert flags[:3] == ["deepspeed", "--num_gpus", "4"] and flags[flags.index("--deepspeed") + 1] == "zero3-for-4"
