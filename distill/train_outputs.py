"""What `distill train` leaves behind: the model directory, written whole or not at all.

The final model (safetensors, tokenizer with its chat template, generation config), the loss
curve as CSV and PNG, the TrainConfig, a summary with the data statistics, and the dataset's
provenance/card, assembled in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from distill import DistillError
from distill import train_data as td
from distill.fsutil import atomic_write_json, atomic_write_text, replace_dir

log = logging.getLogger("distill.train")


# TrainConfig fields that do not change the trained model: a resume may differ in these.
RESUME_IGNORES = ("out", "resume", "overwrite", "logging_steps", "save_steps", "eval_steps", "trust_remote_code")
CHECKPOINT_SETTINGS = "distill_settings.json"


def prepare_checkpoints(cfg, ckpt: Path) -> None:
    """Keep `<out>.checkpoints` only to resume this very run, then record its settings there.

    A checkpoint left by a run with other settings (another lr, data, DeepSpeed stage, ...) would
    be resumed as if nothing had changed: with `overwrite` it is discarded, otherwise an error
    names the differences. `resume=False` always starts over. Run by the main process only.
    """
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_IGNORES}
    saved = ckpt / CHECKPOINT_SETTINGS
    if ckpt.is_dir():
        old = json.loads(saved.read_text()) if saved.is_file() else settings  # older runs wrote none
        changed = {k: [old.get(k), v] for k, v in settings.items() if old.get(k) != v}
        if changed and cfg.resume and not cfg.overwrite:
            raise DistillError(f"{ckpt} holds an interrupted run with other settings {changed}; rerun with the "
                               f"same settings to resume it, or pass --overwrite (or --no-resume) to start over")
        if changed or not cfg.resume:
            log.info("discarding the checkpoints in %s (%s)", ckpt, "other settings" if changed else "--no-resume")
            shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, settings)


def save_final(trainer, cfg, out: Path, ckpt: Path, stats, resumed_from, result) -> None:
    """All ranks join save_model (ZeRO-3 gathers the 16-bit weights); rank 0 writes the rest and
    renames the finished directory into place."""
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
            "train_loss": result.training_loss,
            "final_eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
            "resumed_from": resumed_from,
            "world_size": trainer.args.world_size,
            "deepspeed": cfg.deepspeed,
            "data": asdict(stats),
            "copied": td.copy_provenance(cfg.data, tmp),
        })
        replace_dir(tmp, out)  # replaces an old one only with overwrite=True (checked before training)
        shutil.rmtree(ckpt, ignore_errors=True)  # the run finished; checkpoints are not needed
        log.info("model written to %s (%d optimizer steps)", out, trainer.state.global_step)
    trainer.accelerator.wait_for_everyone()


def write_loss_log(history: list[dict], dest: Path) -> None:
    """loss.csv (step, loss, eval_loss, learning_rate) and loss.png."""
    rows = [h for h in history if "loss" in h or "eval_loss" in h]
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
