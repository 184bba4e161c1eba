"""A recipe's stages on several processes, one per GPU: training through DeepSpeed's launcher,
synthesis and evaluation through `torchrun` (their ranks split the work themselves:
`distill.synthesize.run`, `distill.evaluate.shards`), and what each stage holds, for the report.

A launched stage gets its config as the flags of its command, checked by parsing them back, so it
runs with exactly the config it would get in the pipeline's own process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

from distill import DistillError
from distill.config import config_flags, from_args
from distill.train.cli import train_flags

log = logging.getLogger("distill.recipe.launch")

# A launcher sets these for its workers; what an in-process stage (the Trainer) left in this
# process's environment must not reach it.
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def resolve_deepspeed_auto(model: str, num_gpus: int) -> str:
    """`--deepspeed auto` decided once, for all ranks of a launch (each rank deciding alone could see
    other free host RAM at the offload boundary). In a child process, so that this one never holds a
    CUDA context on a GPU the ranks train on."""
    code = ("import sys; from distill.io.models import resolve_model; from distill.train.memory import resolve_auto; "
            "print(resolve_auto(resolve_model(sys.argv[1], 'target model')))")
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV} | {"WORLD_SIZE": str(num_gpus)}
    done = subprocess.run([sys.executable, "-c", code, model], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise DistillError(f"--deepspeed auto could not be decided for {model}: "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    name = done.stdout.strip().splitlines()[-1]
    log.info("--deepspeed auto on %d GPUs: %s (DeepSpeed's estimators, distill/train/memory.py)", num_gpus, name)
    return name


def launch_train(cfg, num_gpus: int) -> None:
    """Multi-GPU training goes through DeepSpeed's own launcher, one process per GPU."""
    if cfg.deepspeed == "auto":
        cfg = dataclasses.replace(cfg, deepspeed=resolve_deepspeed_auto(cfg.model, num_gpus))
    cmd = ["deepspeed", "--num_gpus", str(num_gpus), "--module", "distill.train", *train_flags(cfg)]
    log.info("launching: %s", shlex.join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise DistillError(f"training failed; the launcher command was: {shlex.join(cmd)}")


def torchrun() -> list[str]:
    """torchrun of this interpreter's environment: the script beside it, else its module."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def torchrun_command(command: str, flags: list[str], processes: int) -> list[str]:
    # --standalone: a free port and a fresh run id per launch, so two launches on one node never meet
    return [*torchrun(), "--standalone", "--nproc_per_node", str(processes), "-m", "distill.cli", command, *flags]


def stage_flags(command: str, cfg, key: str, where: str = "") -> list[str]:
    """`cfg` as the flags of `distill COMMAND`, parsed back and compared: a value no flag can say is
    an error naming the recipe (`where`), its section (`key`, e.g. synthesis) and the way out."""
    from distill.cli import STAGES

    flags = config_flags(cfg)
    parser = argparse.ArgumentParser(prog="distill")
    importlib.import_module(next(m for c, m, _ in STAGES if c == command)).add_cli(parser.add_subparsers())
    way_out = f"set {key}.num_gpus: 1 to run the stage in the pipeline's own process"
    where = f"{where}: {key}" if where else key
    try:
        back = from_args(type(cfg), parser.parse_args([command, *flags]))
    except (SystemExit, DistillError) as exc:  # argparse has printed its reason
        why = f" ({exc})" if isinstance(exc, DistillError) else ""
        raise DistillError(f"{where}: the flags of `distill {command}` made from this recipe do not parse{why}: "
                           f"{shlex.join(flags)}; {way_out}") from None
    lost = [f.name for f in dataclasses.fields(cfg) if getattr(back, f.name) != getattr(cfg, f.name)]
    if lost:
        said = ", ".join(f"{n} = {getattr(cfg, n)!r}" for n in lost)
        raise DistillError(f"{where}: {said} cannot be given to `distill {command}` on its command line, which a "
                           f"launch across processes needs; set another value, or {way_out}")
    return flags


def launch_torchrun(command: str, flags: list[str], processes: int) -> None:
    """`distill COMMAND FLAGS` on `processes` ranks of this node; an error if any rank fails."""
    cmd = torchrun_command(command, flags, processes)
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    env["DISTILL_LAUNCH_ID"] = uuid.uuid4().hex  # the ranks' one identity for the output locks, new per launch
    log.info("launching: %s", shlex.join(cmd))
    if subprocess.run(cmd, env=env).returncode != 0:
        raise DistillError(f"`distill {command}` failed on {processes} processes; the launcher command was: "
                           f"{shlex.join(cmd)}")


def launch_synthesis(cfg, processes: int, where: str = "") -> None:
    """One method's synthesis on `processes` ranks; the last rank to finish writes the dataset.
    `where`: the recipe, named in errors."""
    from distill.synthesize.output import discard_before_launch
    from distill.synthesize.records import merge

    flags = stage_flags("synthesize", cfg, "synthesis", where)
    if discard_before_launch(cfg):  # the ranks may not discard an older run themselves
        log.info("%s held a run with other settings: its rows are discarded (overwrite)", cfg.out)
    launch_torchrun("synthesize", flags, processes)
    out = Path(cfg.out)
    if not (out / "data" / "train.jsonl").is_file() and merge(out) is None:
        raise DistillError(f"{out}: every rank finished but some prompts have no row; rerun `distill run` "
                           f"(finished stages are reused) to generate them")


def launch_evaluation(cfg, processes: int, where: str = "") -> None:
    """One model's evaluation on `processes` ranks; the last rank to finish writes the scores."""
    launch_torchrun("evaluate", stage_flags("evaluate", cfg, "evaluate", where), processes)
    if not Path(cfg.out).is_file():
        raise DistillError(f"`distill evaluate` finished on {processes} processes without writing {cfg.out}; "
                           f"rerun `distill run` (finished stages are reused)")


def gpus_held(device: str | None, processes: int = 1) -> int:
    """GPUs a stage holds: one per process where it runs on CUDA (auto/None: CUDA when present), none on the CPU."""
    if device in (None, "auto"):
        import torch

        return processes if torch.cuda.is_available() else 0
    return processes if str(device).startswith("cuda") else 0
