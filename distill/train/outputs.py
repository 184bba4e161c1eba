"""What `distill train` leaves behind: resumable checkpoints and the model directory, each one
complete or absent.

Checkpoints: `<out>.checkpoints/checkpoint-N/` as the HF Trainer (and DeepSpeed) write them, plus
`distill_manifest.json`, written last, once every rank's files are on disk: the size and sha256
of every file in the checkpoint. A checkpoint is complete when its manifest is there. One killed
(or out of disk) while it was written has none: the next run removes it with a log line and
resumes from the newest complete one, whose files it first checks against the manifest; a
missing, added or changed file is refused with a DistillError naming it, before anything in the
checkpoint is read. What is then loaded is unpickled only under `weights_only=True` and an
allow-list (`distill.train.runtime.weights_only_loads`). A checkpoint at the final step (the
Trainer always writes one there) resumes to the final save without another optimizer step.

The final model (safetensors, tokenizer with its chat template, generation config), the loss
curve as CSV and PNG, the TrainConfig, a summary with the data statistics, and the dataset's
provenance/card, assembled in a temporary sibling and renamed into place. The rename is the
commit: a run killed after it has finished, and its rerun only removes the checkpoints left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from distill import DistillError
from distill.train import data as td
from distill.io.files import atomic_write_json, atomic_write_text, replace_dir
from distill.io.locking import pid_alive
from distill.train.runtime import fault_point

log = logging.getLogger("distill.train.run")


# TrainConfig fields that do not change the trained model: a resume may differ in these.
RESUME_IGNORES = ("out", "resume", "overwrite", "logging_steps", "save_steps", "eval_steps", "trust_remote_code")
CHECKPOINT_SETTINGS = "distill_settings.json"
MANIFEST = "distill_manifest.json"
MANIFEST_FORMAT = "distill-checkpoint-manifest/1"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


# ----------------------------------------------------------------------------- checkpoint manifests


def _checkpoints(ckpt: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `checkpoint-N` in `ckpt`, oldest first."""
    if not ckpt.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted(found)


def _files(directory: Path) -> list[str]:
    """Every file under `directory` (relative, '/'-separated), but the manifest and its temporaries."""
    names = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            rel = (Path(root) / name).relative_to(directory).as_posix()
            if rel != MANIFEST and not rel.startswith(f".{MANIFEST}.tmp-"):
                names.append(rel)
    return names


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def _digests(directory: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    """sha256 of each file, several at once (hashlib releases the GIL: one per rank's state file)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: _digest(directory / n), names)))


def write_manifest(directory: Path) -> None:
    """Record size and sha256 of every file of a checkpoint just written; this marks it complete."""
    digests = _digests(directory, _files(directory))
    step = int(_CHECKPOINT.fullmatch(directory.name).group(1))
    atomic_write_json(directory / MANIFEST, {
        "format": MANIFEST_FORMAT, "global_step": step,
        "files": {name: {"bytes": size, "sha256": sha} for name, (size, sha) in digests.items()}})


def read_manifest(directory: Path) -> dict | None:
    """The checkpoint's manifest, or None where there is none (or none that distill wrote)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def checkpoint_manifest_callback():
    """A TrainerCallback that writes each checkpoint's manifest once all its files are written."""
    from transformers import TrainerCallback

    class WriteManifest(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()  # every rank's files of this checkpoint (DeepSpeed states, RNG) are written
            if state.is_world_process_zero:
                fault_point("ckpt-manifest", state.global_step)
                write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return WriteManifest()


def _discard(path: Path) -> None:
    """Remove a directory; renamed aside first, so a kill midway leaves nothing that looks like
    it (only a `.NAME.removing-HOST-PID` that `sweep_removals` takes away)."""
    aside = path.parent / f".{path.name}.removing-{_host()}-{os.getpid()}"
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def sweep_removals(ckpt: Path) -> None:
    """Finish the removals that killed processes on this host began (`_discard`)."""
    mine = f".removing-{_host()}-"
    for folder in (ckpt.parent, ckpt):
        if not folder.is_dir():
            continue
        for path in folder.glob(f".*{mine}*"):
            pid = path.name.rsplit(mine, 1)[1]
            if pid.isdigit() and not pid_alive(int(pid)) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)




def newest_complete(ckpt: Path) -> Path | None:
    """The newest checkpoint with a manifest (unverified: `verify_checkpoint` checks its files)."""
    complete = [path for _, path in _checkpoints(ckpt) if read_manifest(path) is not None]
    return complete[-1] if complete else None


def discard_incomplete(ckpt: Path) -> None:
    """Remove the checkpoints without a manifest: their writing was interrupted (a kill, a full disk)."""
    for _, path in _checkpoints(ckpt):
        if read_manifest(path) is None:
            log.warning("removing the incomplete checkpoint %s (no %s: the run stopped while writing it)",
                        path, MANIFEST)
            _discard(path)


def verify_checkpoint(directory: Path) -> None:
    """Check every file of a checkpoint against its manifest before anything in it is loaded."""
    fix = (f"refusing to resume from it (nothing in it was loaded). Delete {directory} to resume from the "
           "checkpoint before it, or rerun with --no-resume to start over")
    manifest = read_manifest(directory)
    if manifest is None:
        raise DistillError(f"checkpoint {directory} has no valid {MANIFEST}; {fix}")
    listed, present = manifest["files"], _files(directory)
    if missing := sorted(set(listed) - set(present)):
        raise DistillError(f"checkpoint {directory} lacks {missing[0]}, which its manifest lists; {fix}")
    if added := sorted(set(present) - set(listed)):
        raise DistillError(f"{directory / added[0]} was added after checkpoint {directory.name} was written "
                           f"(it is not in its manifest); {fix}")
    for name, (size, sha) in sorted(_digests(directory, present).items()):
        entry = listed[name]
        if not isinstance(entry, dict) or entry.get("bytes") != size or entry.get("sha256") != sha:
            raise DistillError(f"{directory / name} changed after checkpoint {directory.name} was written "
                               f"(its sha256 differs from the manifest's); {fix}")
    state = trainer_state(directory)
    if state.get("global_step") != manifest.get("global_step"):
        raise DistillError(f"{directory / TRAINER_STATE} is at step {state.get('global_step')}, its manifest at "
                           f"{manifest.get('global_step')}; {fix}")


def trainer_state(directory: Path) -> dict:
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise DistillError(f"checkpoint {directory}: {TRAINER_STATE} is unreadable ({exc}); delete {directory} "
                           "to resume from the checkpoint before it, or rerun with --no-resume") from None
    if not isinstance(state, dict):
        raise DistillError(f"checkpoint {directory}: {TRAINER_STATE} is not a JSON object; delete {directory}")
    return state


def training_finished(directory: Path) -> bool:
    """The checkpoint is at the end of the step budget: only the final save remains."""
    state = trainer_state(directory)
    steps, budget = state.get("global_step"), state.get("max_steps")
    return isinstance(steps, int) and isinstance(budget, int) and 0 < budget <= steps


def _settings(cfg) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUME_IGNORES}


def prepare_checkpoints(cfg, ckpt: Path) -> Path | None:
    """Keep `<out>.checkpoints` only to resume this very run, record its settings there, and
    return the checkpoint to resume from: the newest complete one, its files verified.

    A checkpoint left by a run with other settings (another lr, data, DeepSpeed stage, ...) would
    be resumed as if nothing had changed: with `overwrite` it is discarded, otherwise an error
    names the differences. `resume=False` always starts over. Incomplete checkpoints are removed,
    the earlier complete ones kept. Run by the main process only.
    """
    settings = _settings(cfg)
    saved = ckpt / CHECKPOINT_SETTINGS
    if ckpt.is_dir():
        try:
            old = json.loads(saved.read_text()) if saved.is_file() else settings  # older runs wrote none
        except ValueError:
            old = {}  # cut short while written (it is renamed into place, so hardly): settings unknown
        changed = {k: [old.get(k), v] for k, v in settings.items() if old.get(k) != v}
        if changed and cfg.resume and not cfg.overwrite:
            raise DistillError(f"{ckpt} holds an interrupted run with other settings {changed}; rerun with the "
                               f"same settings to resume it, or pass --overwrite (or --no-resume) to start over")
        if changed or not cfg.resume:
            log.info("discarding the checkpoints in %s (%s)", ckpt, "other settings" if changed else "--no-resume")
            _discard(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, settings)
    if not cfg.resume:
        return None
    discard_incomplete(ckpt)
    last = newest_complete(ckpt)
    if last is not None:
        verify_checkpoint(last)
    return last


def finished_leftover(cfg, out: Path, ckpt: Path) -> bool:
    """A run killed between renaming its model into place and removing its checkpoints has
    finished: its rerun removes the checkpoints and reuses the model (one process; True then)."""
    sweep_removals(ckpt)
    if not cfg.resume or not ckpt.is_dir() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    try:
        summary = json.loads((out / "train_summary.json").read_text())
        settings = json.loads((ckpt / CHECKPOINT_SETTINGS).read_text())
    except (OSError, ValueError):
        return False
    last = newest_complete(ckpt)
    if settings != _settings(cfg) or last is None or not isinstance(summary, dict):
        return False
    try:
        state = trainer_state(last)
    except DistillError:
        return False
    if not training_finished(last) or summary.get("global_step") != state["global_step"]:
        return False
    log.info("%s is this run's finished model (stopped after its final save); removing the checkpoints it left "
             "in %s", out, ckpt)
    _discard(ckpt)
    return True


def save_final(trainer, cfg, out: Path, ckpt: Path, stats, resumed_from, train_loss: float | None) -> None:
    """All ranks join save_model (ZeRO-3 gathers the 16-bit weights); rank 0 writes the rest and
    renames the finished directory into place, then removes the checkpoints."""
    tmp = out.parent / f".{out.name}.tmp-final"
    main = trainer.is_world_process_zero()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.model.config.use_cache = True  # off for training only; generation wants the KV cache
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if main:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; train_config.json says it all
        trainer.model.generation_config.save_pretrained(tmp)
        atomic_write_json(tmp / "train_config.json", asdict(cfg))
        history = trainer.state.log_history
        write_loss_log(history, tmp)
        atomic_write_json(tmp / "train_summary.json", {
            "global_step": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "train_loss": train_loss,
            "final_eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
            "resumed_from": resumed_from,
            "world_size": trainer.args.world_size,
            "deepspeed": cfg.deepspeed,
            "data": asdict(stats),
            "copied": td.copy_provenance(cfg.data, tmp),
        })
        fault_point("final-model")
        replace_dir(tmp, out)  # replaces an old one only with overwrite=True (checked before training)
        fault_point("final-commit")
        if ckpt.is_dir():
            _discard(ckpt)  # the run finished; checkpoints are not needed
        log.info("model written to %s (%d optimizer steps)", out, trainer.state.global_step)
    trainer.accelerator.wait_for_everyone()


def mean_train_loss(history: list[dict]) -> float | None:
    """The mean training loss over the steps the log covers (each logged loss is the mean since the
    one before): the summary's train_loss for a resumed run, whose Trainer counts its own steps only.
    Like the loss log, a later entry for a step replaces an earlier one."""
    losses = {h["step"]: h["loss"] for h in history if "loss" in h and isinstance(h.get("step"), int)}
    total = last = 0
    for step in sorted(s for s in losses if s > 0):
        total += losses[step] * (step - last)
        last = step
    return total / last if last else None


def write_loss_log(history: list[dict], dest: Path) -> None:
    """loss.csv (step, loss, eval_loss, learning_rate) and loss.png; one row per step and kind
    (a later entry for the same step replaces an earlier one)."""
    kept = {}
    for h in history:
        if "loss" in h or "eval_loss" in h:
            kept[(h.get("step"), "loss" in h, "eval_loss" in h)] = h
    rows = sorted(kept.values(), key=lambda h: h.get("step") or 0)
    lines = ["step,epoch,loss,eval_loss,learning_rate"]
    for h in rows:
        lines.append(",".join(str(h.get(k, "")) for k in ("step", "epoch", "loss", "eval_loss", "learning_rate")))
    atomic_write_text(dest / "loss.csv", "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(h["step"], h["loss"]) for h in rows if "loss" in h]
    held = [(h["step"], h["eval_loss"]) for h in rows if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest / "loss.png", dpi=100)
    plt.close(fig)
