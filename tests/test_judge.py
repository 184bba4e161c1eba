"""The judge: served (a real HTTP server process on 127.0.0.1), local (a tiny model), rule; its
cache across kill -9; the win rates, raw and length-controlled; position-swap bookkeeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distill import DistillError
from distill.evaluate.judge import JudgeSettings, make_judge
from distill.evaluate.judge.backends import ServedJudge
from distill.evaluate.judge.base import Item, Pair, Verdict
from distill.evaluate.judge.cache import CachedJudge
from distill.evaluate.judge.scores import (absolute_summary, position_bookkeeping, preferences, win_rates)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("judge-server")
    port_file, log = d / "port", d / "requests.jsonl"
    proc = subprocess.Popen([sys.executable, str(FIXTURES / "judge_server.py"), str(port_file), str(log)])
    for _ in range(200):
        if port_file.exists():
            break
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port_file.read_text()}/v1", "log": log}
    proc.kill()
    proc.wait()


def _requests(log: Path, model: str) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["model"] == model] if log.exists() else []


ITEMS = [Item(f"question {i}", "x" * i, checklist=("be right",)) for i in range(12)]


def test_served_judge_scores_in_order_with_bounded_concurrency(server):
    judge = ServedJudge(model="good", url=server["url"], concurrency=4, timeout=5)
    verdicts = judge.absolute(ITEMS)
    assert [v.value for v in verdicts] == [1.0 + i % 10 for i in range(12)]
    assert all(v.error is None and v.attempts == 1 for v in verdicts)
    seen = _requests(server["log"], "good")
    assert len(seen) == 12 and "- be right" in seen[0]["user"]  # the checklist reaches the judge


def test_served_judge_retries_errors_malformed_bodies_and_stalls(server):
    # the server cycles 500, not-JSON, a 3 s stall, a good answer: every judgment needs four tries
    judge = ServedJudge(model="flaky", url=server["url"], concurrency=1, timeout=1.0, transport_retries=4,
                        backoff=0.01)
    verdicts = judge.absolute(ITEMS[:3])
    assert [v.value for v in verdicts] == [1.0, 2.0, 3.0]
    kinds = [r["kind"] for r in _requests(server["log"], "flaky")]
    assert kinds == ["500", "notjson", "stall", "good"] * 3


def test_served_judge_that_answers_garbage_or_refuses_is_a_clear_error(server):
    judge = ServedJudge(model="garbage", url=server["url"], transport_retries=1, backoff=0.01)
    with pytest.raises(DistillError, match="not a chat completion"):
        judge.absolute(ITEMS[:1])
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    judge = ServedJudge(model="good", url=f"http://127.0.0.1:{port}/v1", transport_retries=1, backoff=0.01)
    with pytest.raises(DistillError, match=r"cannot connect .*is the server running"):
        judge.absolute(ITEMS[:1])
    with pytest.raises(DistillError, match="needs its endpoint"):
        os.environ.pop("DISTILL_JUDGE_URL", None), os.environ.pop("OPENAI_BASE_URL", None)
        ServedJudge(model="good")


def test_unparseable_judgments_are_retried_then_counted_not_dropped(server):
    judge = ServedJudge(model="mumble", url=server["url"], retries=2)
    verdicts = judge.absolute(ITEMS[:4])
    assert all(v.value is None and v.attempts == 3 and v.error == "unparseable absolute answer" for v in verdicts)
    assert len(_requests(server["log"], "mumble")) == 4 * 3
    s = absolute_summary(verdicts + [Verdict(8.0)])
    assert s["n"] == 5 and s["judged"] == 1 and s["unjudged"] == 4 and s["mean"] == 8.0
    assert s["unjudged_reasons"] == {"unparseable absolute answer": 4}


def test_cache_resumes_after_kill_9_and_asks_nothing_twice(server, tmp_path):
    script = ("import json, sys\n"
              "from distill.evaluate.judge.backends import ServedJudge\n"
              "from distill.evaluate.judge.base import Item\n"
              "from distill.evaluate.judge.cache import CachedJudge\n"
              f"j = CachedJudge(ServedJudge(model='good', url={server['url']!r}, concurrency=2), sys.argv[1], chunk=5)\n"
              "v = j.absolute([Item(f'q{i}', 'y' * i) for i in range(23)])\n"
              "print(json.dumps([x.value for x in v]))\n")
    before = len(_requests(server["log"], "good"))
    cache = tmp_path / "judgments.jsonl"
    env = dict(os.environ, DISTILL_FAULT_AT="judge.chunk:3")  # SIGKILL after the third chunk is appended
    killed = subprocess.run([sys.executable, "-c", script, str(cache)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9 and len(cache.read_text().splitlines()) == 15
    done = subprocess.run([sys.executable, "-c", script, str(cache)], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [1.0 + i % 10 for i in range(23)]
    asked = [r["user"] for r in _requests(server["log"], "good")[before:]]
    assert len(asked) == 23 and len(set(asked)) == 23  # each item asked once over both processes
    # a torn last line (a kill in mid-write) is cut, and that judgment asked again
    with open(cache, "ab") as f:
        f.write(b'{"key": "torn')
    again = CachedJudge(ServedJudge(model="good", url=server["url"]), cache)
    assert len(again.known) == 23 and cache.read_bytes().endswith(b"\n")


def test_cache_keys_by_judge_and_template_version(tmp_path, server):
    a = CachedJudge(ServedJudge(model="good", url=server["url"]), tmp_path / "c.jsonl")
    a.absolute(ITEMS[:2])
    assert a.asked == 2
    b = CachedJudge(ServedJudge(model="good", url=server["url"]), tmp_path / "c.jsonl")
    b.absolute(ITEMS[:2])
    assert b.asked == 0
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"absolute": {"user": "Rate the answer to {prompt}.\n[Response]\n{response}\n\n[Checklist]\n{checklist}"}}))
    c = CachedJudge(ServedJudge(model="good", url=server["url"], template_file=str(t)), tmp_path / "c.jsonl")
    assert c.version.startswith("user-")
    assert [v.value for v in c.absolute(ITEMS[:2])] == [1.0, 2.0]
    assert c.asked == 2  # another template: asked again, not read from the other template's judgments
    assert "Rate the answer to" in _requests(server["log"], "good")[-1]["user"]


def test_a_template_without_its_placeholders_is_refused(tmp_path):
    from distill.evaluate.judge.templates import load_templates

    t = tmp_path / "t.json"
    t.write_text(json.dumps({"pairwise": {"user": "Which is better, {response_a} or the other?"}}))
    with pytest.raises(DistillError, match=r"t.json: the pairwise template lacks the placeholder\(s\) \{prompt\}, "
                                           r"\{response_b\}"):
        load_templates(str(t))
    t.write_text(json.dumps({"absolute": {"user": "{prompt} {response} {answer}"}}))
    with pytest.raises(DistillError, match=r"unknown placeholder\(s\) \{answer\}"):
        load_templates(str(t))


def test_length_controlled_win_rate_removes_a_win_by_length_alone():
    """The model is longer on 80 % of prompts and the judge prefers the longer response (with noise):
    the raw win rate is far above 50 %, the length-controlled one near 50 %."""
    rng = np.random.default_rng(0)
    n = 800
    ref = rng.integers(200, 600, n)
    model = ref + np.where(rng.random(n) < 0.8, rng.integers(50, 400, n), -rng.integers(50, 400, n))
    d = (model - ref) / np.std(model - ref)
    prefs = (rng.random(n) < 1 / (1 + np.exp(-3 * np.tanh(d)))).astype(float)
    out = win_rates(list(prefs), list(model), list(ref))
    assert out["win_rate"] > 70 and 42 < out["lc_win_rate"] < 58
    assert out["win_rate_ci95"][0] < out["win_rate"] < out["win_rate_ci95"][1]
    assert out["lc_win_rate_ci95"][0] < out["lc_win_rate"] < out["lc_win_rate_ci95"][1]
    # a model that is better whatever its length keeps its lead under length control
    better = (rng.random(n) < 1 / (1 + np.exp(-(1.5 + 3 * np.tanh(d))))).astype(float)
    assert win_rates(list(better), list(model), list(ref))["lc_win_rate"] > 75


def test_position_swap_bookkeeping(server):
    """Each pair is judged in both orders; a judge that always picks A prefers neither response."""
    judge = ServedJudge(model="first", url=server["url"])
    pairs = [Pair(f"q{i}", "long answer" * 3, "short") for i in range(6)]
    first = judge.pairwise(pairs)  # model shown as A
    second = judge.pairwise([Pair(p.prompt, p.b, p.a) for p in pairs])  # model shown as B
    assert [v.value for v in first] == [1.0] * 6 and [v.value for v in second] == [1.0] * 6
    prefs = preferences(first, second)
    assert prefs == [0.5] * 6
    book = position_bookkeeping(first, second)
    assert book == {"pairs_with_both_orders": 6, "order_consistency": 0.0, "first_position_preference": 1.0}
    honest = ServedJudge(model="good", url=server["url"])
    f2, s2 = honest.pairwise(pairs), honest.pairwise([Pair(p.prompt, p.b, p.a) for p in pairs])
    assert preferences(f2, s2) == [1.0] * 6 and position_bookkeeping(f2, s2)["order_consistency"] == 1.0
    # one order without a verdict: the other decides; neither: no preference, counted
    none = Verdict(None, error="unparseable pairwise answer")
    assert preferences([none, Verdict(0.0), none], [Verdict(0.0), none, none]) == [1.0, 0.0, None]


def test_local_judge_runs_on_the_decoding_engine(tmp_path):
    """A tiny random model as the judge: it generates through distill's engine; its answers do not
    parse, so each is retried (sampling) and then counted as unjudged."""
    from tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(vocab_size=len(tok))
    model.save_pretrained(tmp_path / "judge", safe_serialization=True)
    tok.save_pretrained(tmp_path / "judge")
    judge = make_judge(JudgeSettings(spec=f"local:{tmp_path / 'judge'}", max_new_tokens=8, retries=1, device="cpu"))
    cached = CachedJudge(judge, tmp_path / "c.jsonl")
    verdicts = cached.absolute(ITEMS[:3])
    assert all(v.value is None and v.attempts == 2 and isinstance(v.raw, str) for v in verdicts)
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 3
    assert cached.name.startswith("local:")


def test_rule_judge_scores_by_the_prompts_constraints(micro_zoo):
    rows = [json.loads(x) for x in (micro_zoo / "prompts" / "eval.jsonl").read_text().splitlines()]
    judge = make_judge(JudgeSettings(spec="rule"), rows)
    upper = next(r for r in rows if [c["kind"] for c in r["constraints"]] == ["uppercase"])
    good, bad = judge.absolute([Item(upper["instruction"], "ALL CAPS HERE"), Item(upper["instruction"], "lower")])
    assert (good.value, bad.value) == (10.0, 1.0)
    assert judge.pairwise([Pair(upper["instruction"], "lower", "ALL CAPS")])[0].value == 0.0
    assert judge.absolute([Item("a prompt it does not know", "x")])[0].value is None
    with pytest.raises(DistillError, match="rule judge needs prompts with verifiable 'constraints'"):
        make_judge(JudgeSettings(spec="rule"), [{"instruction": "hi"}])
    with pytest.raises(DistillError, match="unknown judge 'gpt'"):
        make_judge(JudgeSettings(spec="gpt"), rows)
