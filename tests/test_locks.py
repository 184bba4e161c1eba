"""One writer per output (distill.io.locking): a second writer is refused at once naming the first,
a killed writer's lock is taken over, and the ranks of one launch are not second writers."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill import DistillError
from distill.io.locking import holders, launch_identity, output_lock
from test_faults import Run, assert_same_synthesis, leftovers, models, run, synth_args  # noqa: F401 (fixture)

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("lock-ref") / "data"
    rc, text = run(out.parent / "logs", synth_args(models, out))
    assert rc == 0, text
    return out


# ----------------------------------------------------------------------------- whole commands


def test_a_second_writer_is_refused_at_once_naming_the_first_and_nothing_is_lost(models, reference, tmp_path):
    out = tmp_path / "data"
    logs = tmp_path / "logs"
    first = Run(logs, synth_args(models, out), fault="synthesize.row:2:stop")  # holds the lock, paused mid-run
    try:
        assert first.stopped(), first.text()
        # other settings + --overwrite: without the lock this run deleted the first one's rows under it
        start = time.time()
        rc, text = run(logs, synth_args(models, out) + ["--alpha", "0.5", "--overwrite"])
        took = time.time() - start
        assert rc == 2, text
        assert f"is being written by pid {first.pid} on host {HOST}" in text and "distill synthesize" in text, text
        assert "Traceback" not in text and took < 30
        rc, text = run(logs, ["synthesize", "--merge", str(out)])  # a merge is a writer too
        assert rc == 2 and f"pid {first.pid}" in text, text
        assert [h["pid"] for h in holders(out)] == [first.pid]
    finally:
        first.resume()
    assert first.wait() == 0, first.text()
    assert "other ranks" not in first.text()  # a single process never talks of ranks
    assert_same_synthesis(reference, out)  # nothing lost, nothing duplicated
    assert leftovers(tmp_path) == []


def test_the_lock_of_a_killed_writer_is_taken_over(models, reference, tmp_path):
    out = tmp_path / "data"
    logs = tmp_path / "logs"
    killed = Run(logs, synth_args(models, out), fault="synthesize.row:3")
    assert killed.wait() == -signal.SIGKILL
    assert (tmp_path / ".data.lock.00000").exists()  # left by the kill; its flock went with the process
    rc, text = run(logs, synth_args(models, out))
    assert rc == 0, text
    assert f"taking over the lock of synthesis output {out} from pid {killed.pid} on host {HOST}" in text, text
    assert_same_synthesis(reference, out)
    assert leftovers(tmp_path) == []


def test_ranks_of_one_launch_share_the_output_and_other_launches_are_refused(models, reference, tmp_path):
    out = tmp_path / "data"
    logs = tmp_path / "logs"
    launch = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    args = synth_args(models, out) + ["--device", "cpu"]
    rank1 = Run(logs, args, fault="synthesize.row:1:stop", env=launch | {"RANK": "1", "LOCAL_RANK": "1"})
    try:
        assert rank1.stopped(), rank1.text()
        rc, text = run(logs, args, env=launch | {"RANK": "0", "LOCAL_RANK": "0"})  # its sibling: not refused
        assert rc == 0, text
        assert "other ranks still running" in text
        other = launch | {"RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "29512"}  # another launch
        rc, text = run(logs, args, env=other)
        assert rc == 2, text
        assert f"pid {rank1.pid} on host {HOST} (rank 1 of 2 of launch master=127.0.0.1:29511)" in text, text
        rc, text = run(logs, args)  # a single process
        assert rc == 2 and f"pid {rank1.pid}" in text, text
        rc, text = run(logs, args, env=launch | {"RANK": "1", "LOCAL_RANK": "1"})  # rank 1 twice
        assert rc == 2 and f"pid {rank1.pid}" in text, text
    finally:
        rank1.resume()
    assert rank1.wait() == 0, rank1.text()  # the last rank merges
    assert_same_synthesis(reference, out)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- the lock itself

HOLD = textwrap.dedent("""
    import os, sys, time
    from distill.io.locking import output_lock
    lock = output_lock(sys.argv[1], "test output")
    lock.__enter__()
    if sys.argv[2] == "fork":  # a forked child (a data loader worker) inherits the lock's fd
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
    print("held", flush=True)
    if sys.argv[2] == "fork":
        os.kill(os.getpid(), 9)
    time.sleep(60)
""")


def _holder(out: Path, mode: str = "hold") -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_refused_while_held_free_after_and_nothing_left(tmp_path):
    out = tmp_path / "new" / "dir" / "out"  # parents made for the lock are removed with it
    holder = _holder(out)
    try:
        with pytest.raises(DistillError, match=rf"test output {out} is being written by pid {holder.pid} on host "
                                               rf"{HOST}, running `.* {out} hold` since .*; one writer at a time"):
            with output_lock(out, "test output"):
                pass
        assert [h["pid"] for h in holders(out)] == [holder.pid]
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out, "test output") as lock:  # the kernel released the killed holder's flock
        with output_lock(out, "again") as inner:  # this process again: the same lock, counted
            assert inner is lock
        assert [h["pid"] for h in holders(out)] == [os.getpid()]
        assert lock.holder_path.exists()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the lock files are gone
    fresh = tmp_path / "fresh" / "dir" / "out"
    with output_lock(fresh, "test output"):
        assert fresh.parent.is_dir()
    assert not (tmp_path / "fresh").exists()  # nothing written: the parents made for the lock are gone too


def test_a_lock_held_only_by_a_dead_holders_forked_children_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    holder = _holder(out, "fork")
    holder.wait()  # killed itself; its forked child still holds the flock
    assert holder.returncode == -signal.SIGKILL
    orphans = [h for h in holders(out)]
    assert [h["pid"] for h in orphans] == [holder.pid]  # flock held, by a child of a dead pid
    try:
        with caplog.at_level(logging.WARNING, "distill.lock"), output_lock(out, "test output"):
            assert [h["pid"] for h in holders(out)] == [os.getpid()]
        assert f"from pid {holder.pid} on host {HOST}" in caplog.text and "no longer running" in caplog.text
    finally:
        for pid in _children_of_script(out):
            os.kill(pid, signal.SIGKILL)
    assert leftovers(tmp_path) == []


def _children_of_script(out: Path) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = stat.read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmd and b"fork" in cmd:
            pids.append(int(stat.parent.name))
    return pids


def test_launch_identity():
    assert launch_identity({}) == (None, 0, 1)
    assert launch_identity({"WORLD_SIZE": "1", "RANK": "0"}) == (None, 0, 1)
    assert launch_identity({"WORLD_SIZE": "4", "RANK": "2", "TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "h",
                            "MASTER_PORT": "1"}) == ("TORCHELASTIC_RUN_ID=abc", 2, 4)
    # torchrun's static rendezvous says "none": the launch's store address is what the ranks share
    assert launch_identity({"WORLD_SIZE": "2", "RANK": "1", "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "n1",
                            "MASTER_PORT": "29500"}) == ("master=n1:29500", 1, 2)
    assert launch_identity({"WORLD_SIZE": "2", "RANK": "1", "DISTILL_LAUNCH_ID": "job-7"}) == \
        ("DISTILL_LAUNCH_ID=job-7", 1, 2)
    assert launch_identity({"WORLD_SIZE": "2", "RANK": "1"}) == ("world=2", 1, 2)
    with pytest.raises(DistillError, match="not integers"):
        launch_identity({"WORLD_SIZE": "two"})


# ----------------------------------------------------------------------------- a finished single run


def test_a_single_process_missing_rows_is_an_error_not_other_ranks(models, tmp_path, monkeypatch, caplog):
    """Rows can only go missing under a single process if something else removed them: an error
    saying so, never "other ranks still running"."""
    from distill.synthesize.run import SynthesizeConfig, synthesize

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("distill.synthesize.run.merge", lambda out: None)
    cfg = SynthesizeConfig(expert=str(models / "post"), amateur=str(models / "base"),
                           prompts=str(models / "prompts.jsonl"), out=str(tmp_path / "data"), max_new_tokens=4,
                           limit=2, progress=False)
    with caplog.at_level(logging.INFO), pytest.raises(DistillError, match=r"prompt\(s\) have no row after this run"):
        synthesize(cfg)
    assert "other ranks" not in caplog.text


def test_a_failed_synthesis_leaves_no_skeleton(models, tmp_path, monkeypatch):
    from distill.synthesize.run import SynthesizeConfig, synthesize

    def broken(*args):
        raise DistillError("expert model is truncated")

    monkeypatch.setattr("distill.synthesize.run._load", broken)
    out = tmp_path / "made" / "data"
    cfg = SynthesizeConfig(expert=str(models / "post"), amateur=str(models / "base"),
                           prompts=str(models / "prompts.jsonl"), out=str(out), max_new_tokens=4, limit=2,
                           progress=False)
    with pytest.raises(DistillError, match="truncated"):
        synthesize(cfg)
    assert not (tmp_path / "made").exists()  # neither D nor the parent made for it, nor a lock file
    out.mkdir(parents=True)  # an existing empty D is kept, and left empty
    with pytest.raises(DistillError, match="truncated"):
        synthesize(cfg)
    assert out.is_dir() and list(out.iterdir()) == [] and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- the zoo


ZOO_HOLD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from distill.io.locking import output_lock
    with output_lock(sys.argv[1], "zoo"):
        print("held", flush=True)
        time.sleep(1.0)
        Path(sys.argv[1]).mkdir(parents=True)
        (Path(sys.argv[1]) / "world.json").write_text(json.dumps({"cache_key": sys.argv[2]}))
""")


def test_a_zoo_is_built_by_one_process_others_wait_for_the_cache_or_are_refused(tmp_path, monkeypatch, caplog):
    from distill.world.config import get_preset
    from distill.world.zoo import build_zoo, cache_root

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    key = get_preset("micro").cache_key()
    target = cache_root() / f"micro-{key}"
    builder = subprocess.Popen([sys.executable, "-c", ZOO_HOLD, str(target), key], stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline().strip() == "held"
    with caplog.at_level(logging.INFO):
        assert build_zoo("micro") == target  # waited for the other build, then reused it: nothing built twice
    assert builder.wait() == 0
    assert "waiting: zoo" in caplog.text and "built by another process meanwhile" in caplog.text
    out = tmp_path / "mine"
    builder = subprocess.Popen([sys.executable, "-c", ZOO_HOLD, str(out), key], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "held"
        with pytest.raises(DistillError, match=rf"zoo {out} is being written by pid {builder.pid}"):
            build_zoo("micro", out=out, force=True)  # an explicit --out: refused at once
    finally:
        builder.wait()
    assert leftovers(tmp_path) == []


def test_a_second_training_on_one_output_is_refused_while_the_first_holds_it(tmp_path):
    from distill.train.run import TrainConfig, train
    from tiny import make_model, make_tokenizer

    make_model(tmp_path / "m", tokenizer=make_tokenizer())
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "response": "there"}\n')
    out = tmp_path / "out"
    cfg = TrainConfig(model=str(tmp_path / "m"), data=str(data), out=str(out), deepspeed=None, max_steps=1)
    other = _holder(out)  # another process writes this output
    try:
        with pytest.raises(DistillError, match=rf"training output {out} is being written by pid {other.pid}"):
            train(cfg)
    finally:
        other.kill()
        other.wait()
    assert not out.exists()
    with output_lock(out, "training output"):  # the dead holder's lock is taken over
        pass
