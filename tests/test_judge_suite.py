"""`distill evaluate --suite judge` on named and file benchmarks, Best-of-N synthesis, and the
recipe with Best-of-N as a fourth data method, on the embedded (micro) world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill import DistillError
from distill.cli import main
from distill.evaluate.judge.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hub_snapshot(hub: Path, name: str, rows: list[dict]) -> None:
    """What `hf download NAME --repo-type dataset` leaves in the hub cache."""
    repo = hub / f"datasets--{name.replace('/', '--')}"
    _write(repo / "snapshots" / "abc" / "data" / "eval.jsonl", rows)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")


def test_named_benchmarks_from_the_local_cache_and_their_layouts(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    _hub_snapshot(hub, "tatsu-lab/alpaca_eval", [{"instruction": "Say hi", "output": "Hi!", "generator": "gpt4"}])
    _hub_snapshot(hub, "allenai/WildBench", [{"session_id": "s1", "checklist": ["greets"], "conversation_input": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "how are you"}]}])
    _hub_snapshot(hub, "HuggingFaceH4/mt_bench_prompts", [{"prompt_id": 81, "prompt": ["Write a poem.", "Shorter."],
                                                           "category": "writing", "reference": []}])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    a = load_benchmark("alpaca_eval")
    assert a.mode == "pairwise" and a.items[0].turns == ["Say hi"] and a.items[0].reference == "Hi!"
    w = load_benchmark("wildbench")
    assert w.mode == "absolute" and w.items[0].turns == ["how are you"] and w.items[0].checklist == ["greets"]
    assert w.items[0].history == [("user", "hello"), ("assistant", "hey")] and w.items[0].id == "s1"
    m = load_benchmark("mt_bench")
    assert m.mode == "mt-bench" and m.items[0].turns == ["Write a poem.", "Shorter."] and m.items[0].id == "81"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(DistillError, match=r"judge benchmark alpaca_eval \(tatsu-lab/alpaca_eval\): .*no copy of the "
                                           r"Hugging Face dataset 'tatsu-lab/alpaca_eval'.*hf download tatsu-lab/alpaca_eval"):
        load_benchmark("alpaca_eval")
    with pytest.raises(DistillError, match=r"unknown judge benchmark 'alpacaeval'; use alpaca_eval, wildbench, mt_bench"):
        load_benchmark("alpacaeval")
    with pytest.raises(DistillError, match="pairwise mode needs a reference response"):
        load_benchmark(str(_write(tmp_path / "p.jsonl", [{"instruction": "x"}])), mode="pairwise")


def test_evaluate_judge_suite_on_the_world_with_the_rule_judge(micro_zoo, tmp_path, one_thread, capsys):
    model = micro_zoo / "source-post"
    out = tmp_path / "s.json"
    argv = ["evaluate", "--model", str(model), "--zoo", str(micro_zoo), "--suite", "if,judge", "--out", str(out),
            "--max-new-tokens", "32"]
    assert main(argv) == 0
    scores = json.loads(out.read_text())
    j = scores["judge"]
    assert j["judge"] == "rule" and j["mode"] == "absolute" and j["n"] == len(
        (micro_zoo / "prompts" / "eval.jsonl").read_text().splitlines())
    # the rule judge's mean is 1 + 9 × the mean share of constraints followed: the if suite's instruction-level
    # number when every prompt carries one constraint (else a per-prompt mean of shares)
    recs = [json.loads(x) for x in (tmp_path / "s.responses.jsonl").read_text().splitlines()]
    shares = [sum(r["strict"]) / len(r["strict"]) for r in recs if r["suite"] == "if"]
    assert j["mean"] == pytest.approx(1 + 9 * sum(shares) / len(shares))
    assert j["asked"] == j["n"] and "judge (rule" in capsys.readouterr().out
    assert main(argv) == 0  # a rerun asks the judge nothing: every judgment is in the cache
    assert json.loads(out.read_text())["judge"]["asked"] == 0


def test_pairwise_and_two_turn_suites_with_a_served_judge(micro_zoo, tmp_path, one_thread):
    import time

    port_file, log = tmp_path / "port", tmp_path / "log.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fixtures" / "judge_server.py"), str(port_file),
                             str(log)])
    try:
        for _ in range(200):
            if port_file.exists():
                break
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}/v1"
        bench = _write(tmp_path / "b.jsonl", [{"id": f"p{i}", "instruction": f"Describe item {i}.",
                                                "reference": "ok" * (i + 1)} for i in range(6)])
        out = tmp_path / "pw.json"
        assert main(["evaluate", "--model", str(micro_zoo / "source-post"), "--suite", "judge", "--judge",
                     "served:good", "--judge-url", url, "--judge-benchmark", str(bench), "--out", str(out),
                     "--max-new-tokens", "16"]) == 0
        j = json.loads(out.read_text())["judge"]
        assert j["mode"] == "pairwise" and j["n"] == 6 and j["positions"]["pairs_with_both_orders"] == 6
        recs = [json.loads(x) for x in (tmp_path / "pw.responses.jsonl").read_text().splitlines()]
        # the server prefers the longer response: the model's preference per prompt follows the lengths
        for r, i in zip(recs, range(6)):
            mine, ref = len(r["response"]), len("ok" * (i + 1))
            assert r["preference"] == (1.0 if mine > ref else 0.0 if mine < ref else 1.0 if mine >= ref else 0.0) or \
                mine == ref
        assert j["win_rate"] == pytest.approx(100 * sum(r["preference"] for r in recs) / 6)
        two = _write(tmp_path / "mt.jsonl", [{"id": "m1", "turns": ["Name a river.", "Now a mountain."]},
                                              {"id": "m2", "turns": ["Name a city.", "Now a sea."]}])
        out2 = tmp_path / "mt.json"
        assert main(["evaluate", "--model", str(micro_zoo / "source-post"), "--suite", "judge", "--judge",
                     "served:good", "--judge-url", url, "--judge-benchmark", str(two), "--out", str(out2),
                     "--max-new-tokens", "16"]) == 0
        j2 = json.loads(out2.read_text())["judge"]
        assert j2["mode"] == "mt-bench" and j2["turn1"]["n"] == 2 and j2["turn2"]["n"] == 2 and j2["n"] == 4
        seen = [json.loads(x)["user"] for x in log.read_text().splitlines()]
        second = [u for u in seen if "Now a mountain." in u]
        recs2 = [json.loads(x) for x in (tmp_path / "mt.responses.jsonl").read_text().splitlines()]
        first_answer = next(r["response"] for r in recs2 if r["id"] == "m1" and r["turn"] == 1)
        # the second turn is judged with the model's own first answer in the conversation
        assert second and "User: Name a river." in second[0] and f"Assistant: {first_answer}" in second[0]
    finally:
        proc.kill()
        proc.wait()


def test_judge_bad_input_is_one_line(micro_zoo, tmp_path, capsys):
    base = ["evaluate", "--model", str(micro_zoo / "source-post"), "--suite", "judge", "--out", str(tmp_path / "x.json")]
    cases = [
        (["--judge-benchmark", "alpacaeval"], "unknown judge benchmark 'alpacaeval'"),
        (["--zoo", str(micro_zoo), "--judge", "served:m", "--judge-url", "http://127.0.0.1:9/v1",
          "--judge-timeout", "2"], "cannot connect"),
        (["--zoo", str(micro_zoo), "--judge-template", str(_write(tmp_path / "t.json", []))], "a JSON object"),
        (["--zoo", str(micro_zoo), "--judge", "nope"], "unknown judge 'nope'"),
        (["--zoo", str(micro_zoo), "--judge-concurrency", "0"], "judge_concurrency must be an integer >= 1"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
        assert not (tmp_path / "x.json").exists()


def test_best_of_n_keeps_the_judges_argmax_and_resumes(micro_zoo, tmp_path, one_thread):
    argv = ["synthesize", "--method", "best-of-n", "--n", "3", "--expert", str(micro_zoo / "source-post"),
            "--prompts", str(micro_zoo / "prompts" / "synthesis.jsonl"), "--max-new-tokens", "24",
            "--batch-size", "6", "--no-progress"]
    ref = tmp_path / "ref"
    assert main(argv + ["--out", str(ref)]) == 0
    rows = [json.loads(x) for x in (ref / "data" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["method"] == "best-of-n" and len(r["best_of_n"]["scores"]) == 3 for r in rows)
    for r in rows:
        s = r["best_of_n"]["scores"]
        assert r["best_of_n"]["chosen"] == max(range(3), key=lambda k: (s[k], -k))  # argmax, the first on ties
    # the kept response is the chosen sample: judged alone it gets the recorded score
    from distill.evaluate.judge.base import Item
    from distill.evaluate.judge.rule import RuleJudge

    judge = RuleJudge(json.loads(x) for x in (micro_zoo / "prompts" / "synthesis.jsonl").read_text().splitlines())
    got = judge.absolute([Item(r["instruction"], r["response"]) for r in rows])
    assert [v.value for v in got] == [r["best_of_n"]["scores"][r["best_of_n"]["chosen"]] for r in rows]
    card = (ref / "README.md").read_text()
    assert "Best-of-3: judge `rule`" in card and "best_of_n" in json.loads((ref / "provenance.json").read_text())["counts"]
    # killed after its 4th row, then rerun: the same rows, and no judgment asked twice
    out = tmp_path / "out"
    env = dict(os.environ, DISTILL_FAULT_AT="synthesize.row:4")
    killed = subprocess.run([sys.executable, "-m", "distill.cli", *argv, "--out", str(out)], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9
    assert main(argv + ["--out", str(out)]) == 0
    assert (out / "data" / "train.jsonl").read_text() == (ref / "data" / "train.jsonl").read_text()
    keys = [json.loads(x)["key"] for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys))


def test_recipe_with_best_of_n_as_a_fourth_data_method(micro_zoo, tmp_path, one_thread, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: bon
run_dir: {tmp_path / 'run'}
source: {{base: {micro_zoo}/source-base, post: {micro_zoo}/source-post}}
target: {{base: {micro_zoo}/target-base}}
prompts: {{synthesis: {micro_zoo}/prompts/synthesis.jsonl, limit: 8}}
synthesis: {{methods: [codit, direct, direct-masked, best-of-n], n: 2, max_new_tokens: 16, batch_size: 8}}
train: {{deepspeed: null, max_steps: 2, batch_size: 4, max_length: 128, seeds: [0], eval_fraction: 0}}
evaluate: {{zoo: {micro_zoo}, suites: [if, judge], limit: 6, max_new_tokens: 16}}
""")
    assert main(["run", str(recipe)]) == 0
    comparison = (tmp_path / "run" / "comparison" / "comparison.md").read_text()
    assert "| target + SFT on Best-of-N responses (judge-picked direct samples) | 1 |" in comparison
    assert "judge score (1-10)" in comparison
    report = (tmp_path / "run" / "report.md").read_text()
    assert "best-of-n" in report


def test_the_worlds_teacher_as_a_judge_against_the_rule_judge(micro_zoo, tmp_path, one_thread):
    """analysis/judge_agreement.py: the teacher judges its own answers; what it manages to score is
    counted next to the rule judge's, and agreement is computed only on answers both scored."""
    out = subprocess.run([sys.executable, str(ROOT / "analysis" / "judge_agreement.py"), "--zoo", str(micro_zoo),
                          "--limit", "4", "--max-new-tokens", "16", "--judge-max-new-tokens", "8", "--out",
                          str(tmp_path / "a")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "a" / "agreement.json").read_text())
    assert res["n"] == 4 and res["rule_scored"] == 4 and res["llm_judge"].startswith("local:")
    assert res["both_scored"] == min(res["rule_scored"], res["llm_scored"])
    assert (res["spearman"] is None) == (res["both_scored"] < 3)
    assert "| 4 | 4 |" in (tmp_path / "a" / "agreement.md").read_text()
