"""`TrainConfig`: every option of `distill train` and the recipe's `train:` section (distill.config);
importing it loads no model code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from distill import DistillError
from distill.config import opt


@dataclass(kw_only=True)
class TrainConfig:
    """Everything `distill train` needs: its options and the recipe's `train:` section. The defaults
    work for the tiny demo and real targets."""

    model: str = opt(help="target model: a local HF directory or a hub id in the HF cache")
    data: str = opt(help="dataset directory (from `distill synthesize`) or a .jsonl with instruction+response or "
                         "messages rows")
    out: str = opt(help="directory for the fine-tuned model (safetensors + tokenizer, loss.csv/png, "
                        "train_config.json, data provenance)")
    deepspeed: Optional[str] = opt(
        "zero2", "DeepSpeed config: auto (chosen from the model's size and the GPUs' memory by DeepSpeed's "
                 "estimators: ZeRO-2 where it fits, else ZeRO-3, else ZeRO-3 with offload; it logs its choice), "
                 "zero2, zero2_1gpu (zero2 tuned for one GPU: overlap_comm and the bf16 overflow "
                 "check off), zero3, zero3_offload (ZeRO-3 with params and optimizer in CPU RAM), none (plain "
                 "Trainer), or a path to your own JSON ('auto' values are filled from these options)")
    epochs: float = opt(3.0, "passes over the training rows (ignored when --max-steps > 0)")
    max_steps: int = opt(-1, "optimizer steps to run; > 0 overrides --epochs")
    lr: float = opt(2e-5, "peak learning rate")
    batch_size: int = opt(4, "examples (or packed rows) per device per micro-step")
    grad_accum: int = opt(1, "micro-steps per optimizer step")
    max_length: int = opt(2048, "longest tokenised chat in tokens; also the packed row length")
    truncation: Literal["drop", "truncate"] = opt(
        "drop", "what to do with chats longer than --max-length: drop them or truncate them; the count is logged")
    packing: bool = opt(False, "pack several examples per row (position ids restart per example; no cross-example "
                               "attention)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, ~30% more "
                                              "compute")
    eval_fraction: float = opt(0.05, "share of rows held out for the eval loss (0 disables)")
    eval_steps: int = opt(50, "evaluate the held-out loss every N optimizer steps")
    logging_steps: int = opt(10, "log the training loss every N optimizer steps")
    save_steps: int = opt(200, "write a resumable checkpoint every N optimizer steps")
    warmup_ratio: float = opt(0.03, "share of steps with linear learning-rate warm-up (< 1)")
    lr_scheduler: str = opt("cosine", "learning-rate schedule after warm-up, a transformers name")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    precision: Literal["auto", "bf16", "fp32"] = opt(
        "auto", "auto: bf16 on a bf16-capable GPU, fp32 on CPU; or force bf16 / fp32")
    attn_implementation: str = opt(
        "sdpa", "attention kernel: sdpa, eager, flash_attention_2, or flex_attention (GPU only; with --packing it "
                "skips the blocks between packed examples)")
    fused_loss: bool = opt(False, "compute the loss chunk by chunk without the full [tokens x vocab] logits (saves "
                                  "GBs with large vocabularies; ZeRO-2 or no DeepSpeed)")
    compile_layers: bool = opt(False, "torch.compile each decoder layer once (faster steps on GPU after a compile of "
                                      "about a minute; ZeRO-2 or no DeepSpeed; with --packing every batch is padded "
                                      "to --max-length, so the layers compile for one shape only)")
    seed: int = opt(0, "random seed for init of new embeddings, data order and the eval split")
    repetitive: Literal["drop", "keep"] = opt(
        "drop", "rows that `distill synthesize` flagged `repetitive: true`: drop them, or keep them in the training "
                "data; either way train_summary.json counts them (data.flagged_repetitive, dropped_repetitive, "
                "kept_repetitive). The public CoDIT code only annotates such a flag (src/annotation.py writes "
                "repetition_flag next to its judge scores) and ships no training code, so it sets no policy to "
                "follow; distill drops them, as it always has")
    keep_repetitive: bool = opt(False, "the same as --repetitive keep (the older flag; folded into it on creation)")
    resume: bool = opt(True, "resume from <out>.checkpoints/ if an interrupted run left one (--no-resume: start "
                             "over, discarding it)")
    trust_remote_code: bool = opt(False, "allow the target's own modelling code (only for targets you trust)")
    overwrite: bool = opt(False, "replace --out if it already exists, and discard checkpoints an interrupted run "
                                 "with other settings left (without it, those are an error)")

    def __post_init__(self):
        if self.keep_repetitive:  # one canonical setting, so train_config.json and resumes see only `repetitive`
            self.repetitive, self.keep_repetitive = "keep", False


def validate(cfg: TrainConfig) -> None:
    """Value checks that need no file: `train` runs them first, recipes when they load."""
    from distill.io.validate import finite

    finite(epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
           eval_fraction=cfg.eval_fraction)
    for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "save_steps", "eval_steps"):
        if getattr(cfg, name) < 1:
            raise DistillError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.eval_fraction < 1:
        raise DistillError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.max_steps <= 0 and cfg.epochs <= 0:
        raise DistillError("set epochs > 0 or max_steps > 0")
    if not cfg.lr > 0 or cfg.weight_decay < 0:
        raise DistillError(f"need lr > 0 and weight_decay >= 0, got lr {cfg.lr}, weight_decay {cfg.weight_decay}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise DistillError(f"warmup_ratio is a share of the training steps, in [0, 1); got {cfg.warmup_ratio}")
    from distill.train.data import REPETITIVE_POLICIES
    from distill.train.runtime import use_bf16

    if cfg.repetitive not in REPETITIVE_POLICIES:
        raise DistillError(f"repetitive must be drop or keep, got {cfg.repetitive!r}")
    if cfg.truncation not in ("drop", "truncate"):
        raise DistillError(f"truncation must be drop or truncate, got {cfg.truncation!r}")
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if cfg.lr_scheduler not in schedulers:
        raise DistillError(f"unknown lr_scheduler {cfg.lr_scheduler!r}; one of {', '.join(schedulers)}")
    use_bf16(cfg.precision)  # raises on an unknown precision
    import torch

    if cfg.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        # otherwise the first backward fails deep inside torch, after the model has loaded
        raise DistillError("attn_implementation flex_attention trains on a GPU only (FlexAttention has no "
                           "backward on CPU); use sdpa")
