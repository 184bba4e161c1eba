"""Fault injection: the non-training stages killed with SIGKILL at named points, then rerun.

Each stage (synthesize, chat-vector extract / apply, zoo build, `distill run` up to its training
stages) first runs uninterrupted with DISTILL_FAULT_TRACE, which lists every fault point it passes
(distill.io.files.fault_point). Five (point, n) pairs are then drawn with a fixed seed, always
including the renames of an atomic output (the moments a killed run leaked its full temporary
directory), and the stage is killed (SIGKILL, DISTILL_FAULT_AT=point:n) there and rerun without
faults. The rerun's output must equal the uninterrupted run's (rows; tensors to float
tolerance), nothing may be duplicated, and no temporary directory, temporary file or lock may be
left anywhere under the run's directory.

Every run is a process forked from one forkserver that has imported torch and transformers
already, so a run costs its work, not three seconds of imports. `distill run` stops before
training (train.seeds = []): training resume is the train stage's own to test (with the same
hook: `fault_point` names and DISTILL_FAULT_AT work anywhere).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest

from tiny import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SEED = 22
KILLS = 5
RENAMES = ("atomic_dir.filled", "replace_dir.swap")
TALLY: dict[str, dict] = {}  # stage -> {"tried": n, "killed": n, "failed": n}

PRELOAD = ["torch", "transformers", "safetensors.torch", "distill.cli", "distill.chat_vector.core", "distill.synthesize.run",
           "distill.decoding.engine", "distill.recipe.pipeline", "distill.world.zoo", "distill.world.training",
           "transformers.models.mistral.modeling_mistral", "transformers.models.qwen2.modeling_qwen2"]

# ----------------------------------------------------------------------------- running a command


def _child(argv: list[str], env: dict, log_path: str) -> None:
    """Runs in a process forked from the forkserver: `distill ARGV` with ENV, output to LOG_PATH."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)
    os.environ["DISTILL_FAULT_PID"] = str(os.getpid())  # kill this process, never a stage's workers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)  # the same arithmetic in every run, whatever the machine's load
    tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock: a killed run would leak its semaphore
    sys.argv = ["distill"] + list(argv)
    try:
        from distill.cli import main

        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a traceback is a failure the test reports
        traceback.print_exc()
        rc = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc or 0))


_CTX = None
_COUNTER = itertools.count()


def _ctx():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


class Run:
    """A `distill` command in a forked process."""

    def __init__(self, logs: Path, argv: list[str], fault: str | None = None, env: dict | None = None,
                 trace: Path | None = None):
        self.log = logs / f"run-{next(_COUNTER):03d}.log"
        logs.mkdir(parents=True, exist_ok=True)
        full_env = {"DISTILL_FAULT_AT": fault, "DISTILL_FAULT_TRACE": str(trace) if trace else None}
        full_env.update(env or {})
        self.argv = argv
        self.process = _ctx().Process(target=_child, args=(argv, full_env, str(self.log)))
        self.process.start()
        self.pid = self.process.pid

    def wait(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.join()
            raise AssertionError(f"distill {' '.join(self.argv)} did not finish in {timeout} s:\n{self.text()}")
        return self.process.exitcode

    def stopped(self, timeout: float = 120) -> bool:
        """Wait until the process has stopped itself (a `:stop` fault point) or ended."""
        end = time.time() + timeout
        while time.time() < end:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return False
            if state in ("T", "t"):
                return True
            if state == "Z":
                return False
            time.sleep(0.05)
        return False

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def run(logs: Path, argv: list[str], fault=None, env=None, trace=None) -> tuple[int, str]:
    r = Run(logs, argv, fault, env, trace)
    rc = r.wait()
    return rc, r.text()


# ----------------------------------------------------------------------------- choosing kill points


def trace_counts(path: Path) -> Counter:
    return Counter(path.read_text().split())


def choose_kills(counts: Counter, rng: random.Random, k: int = KILLS, must=()) -> list[tuple[str, int]]:
    """k (point, n) pairs: the `must` points present first, then the others in a seeded order
    (each point once before any point twice), n drawn from 1..times passed."""
    picks = [(p, rng.randint(1, counts[p])) for p in must if counts.get(p)]
    others = sorted(p for p in counts if p not in must)
    rng.shuffle(others)
    pool = sum(counts.values())
    for p in itertools.cycle(others or list(must)):
        if len(picks) >= min(k, pool):
            break
        choice = (p, rng.randint(1, counts[p]))
        if choice not in picks:
            picks.append(choice)
    return picks


LEFTOVER = re.compile(r"^\..*\.(tmp|old)-|^\..*\.lock(\.\d{5})?$")


def leftovers(root: Path) -> list[str]:
    """Temporary directories and files, moved-aside outputs and lock files anywhere under root."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if LEFTOVER.search(p.name))


def tally(stage: str, killed: bool, ok: bool, point: str = "") -> None:
    t = TALLY.setdefault(stage, {"tried": 0, "killed": 0, "failed": 0, "points": []})
    t["tried"] += 1
    t["points"].append(point)
    t["killed"] += killed
    t["failed"] += not ok


@pytest.fixture(scope="module", autouse=True)
def report_tally():
    yield
    lines = [f"  {stage:20s} tried {t['tried']}, killed {t['killed']}, failed {t['failed']}: {', '.join(t['points'])}"
             for stage, t in TALLY.items()]
    total = {k: sum(t[k] for t in TALLY.values()) for k in ("tried", "killed", "failed")}
    sys.__stdout__.write("\nfault injection (stage x kill points):\n" + "\n".join(lines)
                         + f"\n  total: {total['tried']} tried, {total['killed']} killed, {total['failed']} failed\n")


# ----------------------------------------------------------------------------- comparing outputs


def tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    import torch

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), f"{b}: other tensors than {a}"
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.allclose(ta[name].float(), tb[name].float(), rtol=1e-5, atol=1e-6), f"{b}: tensor {name} differs"


def files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_synthesis(ref: Path, got: Path) -> None:
    assert jsonl(got / "data" / "train.jsonl") == jsonl(ref / "data" / "train.jsonl")
    ids = [r["id"] for f in sorted((got / "shards").glob("rank-*.jsonl")) for r in jsonl(f)]
    assert len(ids) == len(set(ids)), f"{got}: a row was written twice: {sorted(Counter(ids) - Counter(set(ids)))}"
    assert sorted(ids) == sorted(r["id"] for r in jsonl(ref / "data" / "train.jsonl"))
    assert json.loads((got / "provenance.json").read_text())["counts"] == \
        json.loads((ref / "provenance.json").read_text())["counts"]
    assert (got / "README.md").read_text() == (ref / "README.md").read_text()


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Mistral base/post/cp sharing a tokenizer with a chat template, a Qwen2 target, prompts."""
    root = tmp_path_factory.mktemp("fault-models")
    tok = make_tokenizer()
    make_model(root / "base", "mistral", seed=0, tokenizer=tok)
    make_model(root / "post", "mistral", seed=1, tokenizer=tok)
    make_model(root / "cp", "mistral", seed=2, tokenizer=tok)
    make_model(root / "qwen", "qwen2", seed=3, tokenizer=make_tokenizer(chat_template=None, model="wordpiece",
                                                                        vocab_size=150))
    rows = [{"id": f"q{i}", "instruction": "the quick brown fox " * (i % 3 + 1) + str(i)} for i in range(7)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def synth_args(models: Path, out: Path) -> list[str]:
    return ["synthesize", "--expert", str(models / "post"), "--amateur", str(models / "base"),
            "--prompts", str(models / "prompts.jsonl"), "--out", str(out), "--max-new-tokens", "8",
            "--batch-size", "3", "--seed", "5", "--no-progress"]


# ----------------------------------------------------------------------------- stages


def test_synthesize_killed_anywhere_resumes_to_the_uninterrupted_rows(models, tmp_path):
    rng = random.Random(SEED)
    trace = tmp_path / "trace.txt"
    ref = tmp_path / "ref" / "data"
    rc, text = run(tmp_path / "logs", synth_args(models, ref), trace=trace)
    assert rc == 0, text
    kills = choose_kills(trace_counts(trace), rng, must=("synthesize.prepared",))
    for i, (point, n) in enumerate(kills):
        root = tmp_path / f"s{i}"
        out = root / "data"
        rc, text = run(tmp_path / "logs", synth_args(models, out), fault=f"{point}:{n}")
        killed = rc == -signal.SIGKILL
        rc2, text2 = run(tmp_path / "logs", synth_args(models, out))
        ok = False
        try:
            assert killed, f"{point}:{n} did not kill (rc {rc}):\n{text}"
            assert rc2 == 0, text2
            assert "other ranks" not in text2  # a single process
            assert_same_synthesis(ref, out)
            assert leftovers(root) == [], f"after {point}:{n}"
            ok = True
        finally:
            tally("synthesize", killed, ok, f"{point}:{n}")


def _vector_case(tmp_path, models, action: str) -> None:
    """chat-vector extract or apply: killed at each chosen point, then rerun the same command."""
    rng = random.Random(f"{SEED}-{action}")
    logs = tmp_path / "logs"
    vector = None
    if action == "apply":
        vector = tmp_path / "vector"
        rc, text = run(logs, ["chat-vector", "extract", "--base", str(models / "base"), "--post",
                              str(models / "post"), "--out", str(vector), "--no-progress"])
        assert rc == 0, text

    def argv(out: Path, overwrite: bool) -> list[str]:
        if action == "extract":
            a = ["chat-vector", "extract", "--base", str(models / "base"), "--post", str(models / "post")]
        else:
            a = ["chat-vector", "apply", "--target", str(models / "cp"), "--vector", str(vector), "--scale", "0.5"]
        # small shards: several files, so a kill lands between shards too
        return a + ["--out", str(out), "--no-progress", "--max-shard-size", "20KB"] + (["--overwrite"] * overwrite)

    def old_output(out: Path) -> None:  # what --overwrite replaces
        out.mkdir(parents=True)
        (out / "old.txt").write_text("the output of an earlier run\n")

    trace = tmp_path / "trace.txt"
    ref = tmp_path / "ref" / "out"
    old_output(ref)  # the reference passes the rename points too
    rc, text = run(logs, argv(ref, True), trace=trace)
    assert rc == 0, text
    for i, (point, n) in enumerate(choose_kills(trace_counts(trace), rng, must=RENAMES)):
        root = tmp_path / f"k{i}"
        out = root / "out"
        replacing = point == "replace_dir.swap" or i % 2 == 1  # the others half as first runs, half as reruns
        if replacing:
            old_output(out)
        rc, text = run(logs, argv(out, replacing), fault=f"{point}:{n}")
        killed = rc == -signal.SIGKILL
        rc2, text2 = run(logs, argv(out, replacing))  # the same command again
        ok = False
        try:
            assert killed, f"{point}:{n} did not kill (rc {rc}):\n{text}"
            assert rc2 == 0, text2
            assert files(out) == [f for f in files(ref)]
            assert_same_tensors(ref, out)
            for name in ("chat_vector.json", "config.json", "model.safetensors.index.json"):
                if (ref / name).exists():
                    assert (out / name).read_text() == (ref / name).read_text(), name
            assert leftovers(root) == [], f"after {point}:{n}"
            ok = True
        finally:
            tally(f"chat-vector {action}", killed, ok, f"{point}:{n}")


def test_chat_vector_extract_killed_anywhere_leaves_nothing_and_reruns_equal(models, tmp_path):
    _vector_case(tmp_path, models, "extract")


def test_chat_vector_apply_killed_anywhere_leaves_nothing_and_reruns_equal(models, tmp_path):
    _vector_case(tmp_path, models, "apply")


def test_zoo_build_killed_anywhere_leaves_nothing_and_rebuilds_equal(tmp_path):
    """One chain, as a user would live it: build, killed, rerun killed elsewhere, ..., rerun."""
    rng = random.Random(f"{SEED}-zoo")
    logs = tmp_path / "logs"
    env = {"DISTILL_CACHE": str(tmp_path / "cache")}
    trace = tmp_path / "trace.txt"
    ref = tmp_path / "ref" / "zoo"
    ref.mkdir(parents=True)
    (ref / "old.txt").write_text("x")
    rc, text = run(logs, ["zoo", "build", "--preset", "micro", "--out", str(ref), "--overwrite"], env=env, trace=trace)
    assert rc == 0, text
    out = tmp_path / "chain" / "zoo"
    shutil.copytree(ref, out)
    (out / "old.txt").write_text("an older zoo\n")
    kills = choose_kills(trace_counts(trace), rng, must=RENAMES)
    kills.sort(key=lambda k: (k[0] in RENAMES, k[0] == "replace_dir.swap"))  # the swap (removes OUT) last
    argv = ["zoo", "build", "--preset", "micro", "--out", str(out), "--overwrite"]

    def temporary() -> set[str]:  # lock files keep their names from run to run; temporary outputs do not
        return {p for p in leftovers(out.parent) if ".lock" not in p}

    for point, n in kills:
        before = temporary()
        rc, text = run(logs, argv, fault=f"{point}:{n}", env=env)
        killed = rc == -signal.SIGKILL
        kept = before & temporary()  # the previous kill's leftovers must be gone
        tally("zoo build", killed, killed and not kept, f"{point}:{n}")
        assert killed, f"{point}:{n} did not kill (rc {rc}):\n{text}"
        assert not kept, f"{point}:{n}: the rerun kept {sorted(kept)}"
    rc, text = run(logs, argv, env=env)
    try:
        assert rc == 0, text
        assert files(out) == files(ref) and not (out / "old.txt").exists()
        for name in MODELS:
            assert_same_tensors(ref / name, out / name)
            assert (out / name / "tokenizer.json").read_text() == (ref / name / "tokenizer.json").read_text()
        for f in ("prompts/sft.jsonl", "prompts/synthesis.jsonl", "prompts/eval.jsonl", "knowledge/questions.jsonl",
                  "text/heldout.jsonl", "quality.json"):
            assert (out / f).read_text() == (ref / f).read_text(), f
        assert json.loads((out / "world.json").read_text())["cache_key"] == \
            json.loads((ref / "world.json").read_text())["cache_key"]
        assert leftovers(out.parent) == []
    except AssertionError:
        TALLY["zoo build"]["failed"] += 1  # the final rerun is what every kill is judged by
        raise


MODELS = ("source-base", "source-post", "source-cp", "target-base")
MISTRAL_TO_QWEN = ROOT / "recipes" / "mistral-to-qwen.yaml"


def recipe_args(models: Path, run_dir: Path) -> list[str]:
    sets = {
        "run_dir": run_dir, "source.base": models / "base", "source.post": models / "post",
        "target.base": models / "qwen", "prompts.synthesis": models / "prompts.jsonl", "prompts.limit": 5,
        "weight_arithmetic.target": models / "cp",
        "synthesis.max_new_tokens": 6, "synthesis.batch_size": 2, "synthesis.dtype": "null",
        "train.num_gpus": "null", "train.seeds": "[]",  # stop before training (its resume is tested in test_train)
    }
    out = ["run", str(MISTRAL_TO_QWEN)]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def test_distill_run_killed_anywhere_resumes_to_the_uninterrupted_run(models, tmp_path):
    rng = random.Random(f"{SEED}-run")
    logs = tmp_path / "logs"
    trace = tmp_path / "trace.txt"
    ref = tmp_path / "ref" / "run"
    rc, text = run(logs, recipe_args(models, ref), trace=trace)
    assert rc == 0, text
    ref_stages = json.loads((ref / "stages.json").read_text())
    assert {"chat-vector", "weight-arithmetic", "synthesize-codit", "synthesize-direct"} <= set(ref_stages)
    for i, (point, n) in enumerate(choose_kills(trace_counts(trace), rng, must=("run.stage",))):
        root = tmp_path / f"r{i}"
        out = root / "run"
        rc, text = run(logs, recipe_args(models, out), fault=f"{point}:{n}")
        killed = rc == -signal.SIGKILL
        rc2, text2 = run(logs, recipe_args(models, out))
        ok = False
        try:
            assert killed, f"{point}:{n} did not kill (rc {rc}):\n{text}"
            assert rc2 == 0, text2
            stages = json.loads((out / "stages.json").read_text())
            assert {k: v["key"] for k, v in stages.items()} == {k: v["key"] for k, v in ref_stages.items()}
            for method in ("codit", "direct"):
                assert_same_synthesis(ref / "data" / method, out / "data" / method)
            assert_same_tensors(ref / "chat_vector", out / "chat_vector")
            assert_same_tensors(ref / "models" / "weight-arithmetic", out / "models" / "weight-arithmetic")
            assert leftovers(root) == [], f"after {point}:{n}"
            ok = True
        finally:
            tally("distill run", killed, ok, f"{point}:{n}")


def test_what_an_older_distills_killed_run_left_is_removed_by_the_next_run(models, tmp_path):
    """Before host and pid were in the names: `.OUT.tmp-XXXXXXXX` (mkdtemp's) with full shards, and
    `.OUT.old-PID` from a replace killed between its two renames. Removed under the output's lock."""
    from distill.chat_vector.core import extract

    out = tmp_path / "vector"
    legacy = tmp_path / ".vector.tmp-k2x_9qzb"
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"\0" * 4096)
    dead = subprocess_dead_pid()
    old = tmp_path / f".vector.old-{dead}"
    old.mkdir()
    unrelated = tmp_path / ".vector.tmp-final"  # train's fixed name: not ours to judge
    unrelated.mkdir()
    extract(models / "base", models / "post", out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vector.tmp-final", "vector"]


def subprocess_dead_pid() -> int:
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
