"""`distill train` resumed after faults, without DeepSpeed and with ZeRO-2 on CPU: killed with
SIGKILL at seeded points (inside checkpoint writes, inside the final save), out of disk inside a
checkpoint write; and a tampered checkpoint, refused without its pickle's payload ever running.

A fault chain: an uninterrupted reference run, then the same command killed at each chosen point
in turn (each rerun resumes what the one before left), then rerun without a fault; the result must
equal the reference's (step count, loss log, weights) and leave nothing beside the output. Each
run is `distill.cli.main(["train", ...])` in a process of its own, forked from a driver
interpreter that imported torch/transformers/DeepSpeed once (this file run as a script), so a run
costs its training, not the imports. `DISTILL_FAULT_AT=train.POINT.STEP:1` kills it at that point
(`distill.train.runtime.FAULT_POINTS`, through the shared hook `distill.io.files.fault_point`).

`DISTILL_SOAK=N` runs N more chains per mode with random seeds and 5 to 9 points each
(`-k soak`; about 20-30 s per chain and mode on 2 cores).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
from pathlib import Path

import pytest

MAX_STEPS = 6
ARGS = ["--max-steps", str(MAX_STEPS), "--save-steps", "1", "--batch-size", "4", "--max-length", "64",
        "--eval-fraction", "0.2", "--eval-steps", "4", "--logging-steps", "1", "--lr", "1e-2",
        "--warmup-ratio", "0.2", "--lr-scheduler", "cosine", "--precision", "fp32"]
CKPT_POINTS = {"none": ("ckpt-model", "ckpt-optim", "ckpt-manifest"),
               "zero2": ("ckpt-model", "ckpt-ds", "ckpt-optim", "ckpt-manifest")}


# ----------------------------------------------------------------------------- the driver (a script)


def _drive(plan_file: str) -> None:
    """Run each planned `distill` command in a forked child; record how each one ended."""
    import matplotlib

    matplotlib.use("Agg")
    import datasets  # noqa: F401 - imported once here, not in every child
    import deepspeed  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

    import distill.cli
    import distill.train.run  # noqa: F401

    plan = json.loads(Path(plan_file).read_text())
    codes = []
    for run in plan["runs"]:
        pid = os.fork()
        if pid == 0:  # the child: one `distill train`, with its own log
            code = 1
            try:
                fd = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if run.get("fault"):
                    os.environ["DISTILL_FAULT_AT"] = f"train.{run['fault']}:1"
                code = distill.cli.main(run["argv"])
            except BaseException:  # noqa: BLE001 - the log says what; the exit code says that it did
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    Path(plan["result"]).write_text(json.dumps(codes))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _drive(sys.argv[1])
    sys.exit(0)


# ----------------------------------------------------------------------------- helpers

import subprocess  # noqa: E402

import torch  # noqa: E402

from tiny import make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tok = make_tokenizer(chat_template=None)
    make_model(root / "target", arch="qwen2", vocab_size=len(tok), tokenizer=tok, hidden=32, layers=2)
    rows = [{"id": str(i), "instruction": f"repeat the request {i}", "response": "the lazy dog done"}
            for i in range(20)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(world: Path, out: Path, mode: str) -> list[str]:
    return ["train", "--model", str(world / "target"), "--data", str(world / "train.jsonl"), "--out", str(out),
            "--deepspeed", mode, *ARGS]


def _order(point: str) -> tuple[int, int]:
    from distill.train.runtime import FAULT_POINTS

    name, _, step = point.partition(".")
    return (int(step) if step else MAX_STEPS + 1, FAULT_POINTS.index(name))


def kill_points(mode: str, seed: int, n: int = 5) -> list[str]:
    """`n` kill points in the order a run passes them: two inside checkpoint writes, one inside the
    final save (the last checkpoint written, the model in its temporary directory) and one after
    its rename, the rest drawn from every point (after optimizer steps, inside checkpoint writes)."""
    rng = random.Random(seed)
    inside = [f"{p}.{s}" for s in range(1, MAX_STEPS + 1) for p in CKPT_POINTS[mode]]
    anywhere = inside + [f"step.{s}" for s in range(1, MAX_STEPS + 1)]
    chosen = rng.sample(inside, 2)
    chosen += rng.sample([p for p in anywhere if p not in chosen], max(n - 4, 0))
    return sorted([*chosen, "final-model", "final-commit"], key=_order)


def _drive_runs(tmp: Path, runs: list[dict]) -> list[int]:
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"runs": runs, "result": str(tmp / "codes.json")}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DISTILL_FAULT_AT"):
        env.pop(key, None)  # in-process runs of other tests set the first five
    for key in [k for k in env if k.startswith("ACCELERATE_")]:
        env.pop(key)  # and the Trainer's ACCELERATE_USE_DEEPSPEED after a DeepSpeed run
    proc = subprocess.run([sys.executable, __file__, str(plan)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "codes.json").read_text())


def _loss_rows(out: Path) -> list[tuple]:
    lines = (out / "loss.csv").read_text().splitlines()[1:]
    return [(int(r[0]), "eval" if r[3] else "train", float(r[3] or r[2])) for r in (line.split(",") for line in lines)]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2500:] if path.exists() else "(no log)"


def run_chain(world: Path, tmp: Path, mode: str, points: list[str]) -> None:
    """Reference run, the faulted runs, a clean rerun; then compare with the reference."""
    ref, chain, logs = tmp / "ref", tmp / "chain", tmp / "logs"
    for d in (ref, chain, logs):
        d.mkdir()
    runs = [{"argv": _argv(world, ref / "model", mode), "log": str(logs / "ref.log")}]
    runs += [{"argv": _argv(world, chain / "model", mode), "fault": p, "log": str(logs / f"{i}-{p}.log")}
             for i, p in enumerate(points)]
    runs.append({"argv": _argv(world, chain / "model", mode), "log": str(logs / "final.log")})
    codes = _drive_runs(tmp, runs)

    where = f"{mode} chain {points}"
    assert codes[0] == 0, _tail(Path(runs[0]["log"]))
    for run, code in zip(runs[1:-1], codes[1:-1]):
        assert code == -9, f"{where}: {run['fault']} was never reached (exit {code})\n{_tail(Path(run['log']))}"
    assert codes[-1] == 0, f"{where}: the clean rerun failed\n{_tail(Path(runs[-1]['log']))}"
    # What each rerun found: an incomplete checkpoint removed, a finished one saved, a finished model.
    for before, after in zip(runs[1:], runs[2:]):
        text = Path(after["log"]).read_text(errors="replace")
        fault = before["fault"]
        if fault.startswith("ckpt-"):
            assert "removing the incomplete checkpoint" in text, f"{where}: after {fault}\n{_tail(Path(after['log']))}"
        elif fault == "final-model":
            assert "the final save remains" in text, f"{where}: after {fault}\n{_tail(Path(after['log']))}"
        elif fault == "final-commit":
            assert "removing the checkpoints it left" in text, f"{where}: after {fault}\n{_tail(Path(after['log']))}"

    out, want = chain / "model", ref / "model"
    summary = json.loads((out / "train_summary.json").read_text())
    ref_summary = json.loads((want / "train_summary.json").read_text())
    assert summary["global_step"] == summary["max_steps"] == ref_summary["global_step"] == MAX_STEPS, where
    assert summary["train_loss"] == pytest.approx(ref_summary["train_loss"], rel=1e-3), where
    rows, ref_rows = _loss_rows(out), _loss_rows(want)
    assert len({r[:2] for r in rows}) == len(rows), f"{where}: duplicate loss.csv rows {rows}"
    assert [r[:2] for r in rows] == [r[:2] for r in ref_rows], where
    assert [r[2] for r in rows] == pytest.approx([r[2] for r in ref_rows], rel=1e-4, abs=1e-4), where
    got, ref_weights = _weights(out), _weights(want)
    assert got.keys() == ref_weights.keys()
    for name in got:
        torch.testing.assert_close(got[name], ref_weights[name], rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")
    # Nothing left beside the output: no checkpoints, no temporary final or data-cache directories.
    assert sorted(p.name for p in chain.iterdir()) == ["model"], where
    assert sorted(p.name for p in ref.iterdir()) == ["model"], where


# ----------------------------------------------------------------------------- fault chains


@pytest.mark.parametrize("mode", ["none", "zero2"])
def test_killed_at_seeded_points_resumes_to_the_uninterrupted_result(world, tmp_path, mode):
    points = kill_points(mode, seed=13)
    assert len(points) >= 5 and any(p.startswith("ckpt-") for p in points) and "final-model" in points
    run_chain(world, tmp_path, mode, points)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DISTILL_SOAK"), reason="set DISTILL_SOAK=N for N random fault chains")
@pytest.mark.parametrize("mode", ["none", "zero2"])
def test_soak_random_fault_chains(world, tmp_path, mode):
    seeds = [random.SystemRandom().randrange(1 << 30) for _ in range(int(os.environ["DISTILL_SOAK"]))]
    for seed in seeds:
        points = kill_points(mode, seed, n=random.Random(seed).randint(5, 9))
        print(f"soak {mode} seed {seed}: {points}")
        (tmp_path / f"seed-{seed}").mkdir()
        run_chain(world, tmp_path / f"seed-{seed}", mode, points)


# ----------------------------------------------------------------------------- tampering


class Payload:
    """Unpickled, it creates `marker`: what a planted checkpoint file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_tampered_deepspeed_checkpoint_is_refused_and_its_payload_never_runs(world, tmp_path):
    from transformers import TrainerCallback

    from distill import DistillError
    from distill.train.run import TrainConfig, train
    from distill.train.outputs import MANIFEST, write_manifest

    class Stop(Exception):
        pass

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise Stop

    cfg = TrainConfig(model=str(world / "target"), data=str(world / "train.jsonl"), out=str(tmp_path / "model"),
                      deepspeed="zero2", max_steps=4, save_steps=2, batch_size=4, max_length=64, eval_fraction=0.0,
                      lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant")
    with pytest.raises(Stop):
        train(cfg, callbacks=[StopAt()])
    ckpt = tmp_path / "model.checkpoints" / "checkpoint-2"
    victim = ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert (ckpt / MANIFEST).is_file() and victim.is_file()

    # The payload is real: an ordinary torch.load of such a file runs it.
    probe, marker = tmp_path / "probe.pt", tmp_path / "payload-ran"
    torch.save({"optimizer_state_dict": Payload(tmp_path / "probe-ran")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    torch.save({"optimizer_state_dict": Payload(marker)}, victim)
    with pytest.raises(DistillError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt changed after checkpoint "
                                           r"checkpoint-2 was written.*nothing in it was loaded.*--no-resume"):
        train(cfg)
    assert not marker.exists()

    # One who also rewrites the manifest gets past it, but not past the loader's allow-list.
    write_manifest(ckpt)
    with pytest.raises(DistillError, match=r"refusing to unpickle .*zero_pp_rank_0_mp_rank_00_optim_states\.pt.*"
                                           r"it needs io\.open.*--no-resume"):
        train(cfg)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ and torch.load is torch.serialization.load

    # A file added to a checkpoint is refused as well; --no-resume starts over and finishes.
    (ckpt / "extra.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DistillError, match=r"extra\.pt was added after checkpoint checkpoint-2 was written"):
        train(cfg)
    import dataclasses

    train(dataclasses.replace(cfg, resume=False))
    assert json.loads((tmp_path / "model" / "train_summary.json").read_text())["global_step"] == 4
    assert not marker.exists() and not (tmp_path / "model.checkpoints").exists()


# ----------------------------------------------------------------------------- pieces


def test_the_loss_log_keeps_one_row_per_step_and_kind(tmp_path):
    from distill.train.outputs import mean_train_loss, write_loss_log

    history = [{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 3}, {"eval_loss": 1.5, "step": 3},
               {"loss": 1.1, "step": 3}, {"eval_loss": 1.4, "step": 3}, {"train_loss": 1.2, "step": 3}]
    write_loss_log(history, tmp_path)
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[1:] == ["1,,2.0,,", "3,,1.1,,", "3,,,1.4,"]
    assert mean_train_loss(history) == pytest.approx((2.0 + 2 * 1.1) / 3)  # steps 2-3 averaged 1.1
    assert mean_train_loss([{"eval_loss": 1.0, "step": 2}]) is None


def test_the_seeded_kill_points_are_fixed_and_cover_checkpoint_writes_and_the_final_save():
    for mode in ("none", "zero2"):
        points = kill_points(mode, 13)
        assert points == kill_points(mode, 13) and len(points) == 5
        assert sum(p.startswith("ckpt-") for p in points) >= 2 and points[-2:] == ["final-model", "final-commit"]


def test_a_full_disk_inside_a_checkpoint_write_resumes_from_the_one_before(world, tmp_path, monkeypatch, caplog):
    # The case: checkpoint-2 left without trainer_state.json; every rerun died on it.
    import errno
    import logging

    from transformers import Trainer

    from distill.train.run import TrainConfig, train
    from distill.train.outputs import MANIFEST

    cfg = TrainConfig(model=str(world / "target"), data=str(world / "train.jsonl"), out=str(tmp_path / "model"),
                      deepspeed="none", max_steps=3, save_steps=1, batch_size=4, max_length=64, eval_fraction=0.0,
                      lr=1e-2, warmup_ratio=0.0, lr_scheduler="constant", logging_steps=1)
    save_rng = Trainer._save_rng_state

    def full_at_two(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_at_two)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    monkeypatch.undo()
    ckpts = tmp_path / "model.checkpoints"
    assert (ckpts / "checkpoint-1" / MANIFEST).is_file()
    assert not (ckpts / "checkpoint-2" / "trainer_state.json").exists() and not (ckpts / "checkpoint-2" / MANIFEST).exists()
    with caplog.at_level(logging.INFO, logger="distill.train.run"):
        train(cfg)
    assert "removing the incomplete checkpoint" in caplog.text and "checkpoint-2" in caplog.text
    summary = json.loads((tmp_path / "model" / "train_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["resumed_from"].endswith("checkpoint-1")
    assert [r[:2] for r in _loss_rows(tmp_path / "model")] == [(1, "train"), (2, "train"), (3, "train")]
