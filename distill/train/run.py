"""`distill train`: supervised fine-tuning of a target on a (synthesized) dataset.

The Hugging Face Trainer does the training and DeepSpeed (ZeRO-2/3, through
`TrainingArguments(deepspeed=...)`) is the engine; the shipped DeepSpeed configs use "auto"
for everything the Trainer arguments below also set, so those are the one source of truth. The
exception is ZeRO-2's reduce bucket: 5e8 elements, DeepSpeed's own default, not HF's "auto"
(hidden_size², hundreds of small reductions per step: 46 % slower on an H100, BENCHMARKS.md). Data handling
(chat template, assistant-only labels, packing) lives in `distill.train.data`.

Runs as one process (no launcher needed), under `deepspeed --num_gpus N`, or multi-node with
`deepspeed --hostfile H`; every rank runs this same code.

Resume: a rerun continues from the newest complete checkpoint in `<out>.checkpoints/` (complete:
its manifest, written last, is there and every file matches it; `distill.train.outputs`), to
exactly the step budget, however the run was stopped. Nothing is unpickled outside
`weights_only=True` and an allow-list (`distill.train.runtime.weights_only_loads`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from distill import DistillError
from distill.train import data as td
from distill.train.config import TrainConfig, validate
from distill.io.files import check_output_dir, scratch_dir
from distill.io.models import resolve_model, stop_token_ids
from distill.io.progress import trainer_progress_callback
from distill.train.fused import compile_layers, fused_loss_trainer
from distill.train.outputs import (checkpoint_manifest_callback, finished_leftover, mean_train_loss,
                                   newest_complete, prepare_checkpoints, save_final, training_finished)
from distill.train.runtime import (checkpointing_kwarg, ensure_distributed_env, install_fault_points, is_zero3,
                                   load_deepspeed_config, release_deepspeed_shm_callback,
                                   use_bf16, weights_only_loads)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- helpers


def checkpoint_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoints"


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig, callbacks=()) -> Path:
    """Fine-tune `cfg.model` on `cfg.data`; returns the final model directory.

    Rerunning an interrupted run resumes from its newest complete checkpoint in
    `<out>.checkpoints/` (the module docstring); one killed after its final save returns at once.
    `callbacks` are extra `transformers.TrainerCallback`s (tests use them to interrupt).
    """
    validate(cfg)
    from distill.io.locking import output_lock
    from distill.io.validate import guard_path

    guard_path(Path(cfg.out))  # `--out a-file/sub`: say so before the lock makes its parent

    # One writer per output: the lock covers OUT, OUT.checkpoints/ and the temporary names beside
    # them; the ranks of one launch share it.
    with output_lock(cfg.out, "training output"):
        return _train(cfg, callbacks)


def _train(cfg: TrainConfig, callbacks) -> Path:
    out = Path(cfg.out)
    if finished_leftover(cfg, out, checkpoint_dir(out)):  # killed after its final save: that is the result
        with scratch_dir(out, "data"):
            pass  # entering it removes the data caches that the killed process left
        return out
    # Cheap checks first, so bad input fails before DeepSpeed spends seconds starting up.
    model_path = resolve_model(cfg.model, "target model")
    from distill.io.validate import check_model_dir, guard_path

    check_model_dir(model_path, "target model")  # config.json and every shard's header: one line naming the file
    from distill.io.models import load_tokenizer

    load_tokenizer(model_path, cfg.trust_remote_code, "target model")  # a damaged tokenizer, before anything is written
    guard_path(out)  # `--out a-file/sub`: an error, not a FileExistsError
    stats = td.DataStats()
    if cfg.deepspeed == "auto":  # chosen from the model's size and this machine's memory (train/memory.py)
        from distill.train.memory import resolve_auto

        stats.extra["deepspeed_auto"] = resolve_auto(model_path)  # train_summary.json records the choice
        ds_config = load_deepspeed_config(stats.extra["deepspeed_auto"])
    else:
        ds_config = load_deepspeed_config(cfg.deepspeed)
    check_output_dir(out, cfg.overwrite)
    # Each process (rank) keeps its data's Arrow cache in a folder of its own beside the output:
    # ranks loading one file into the shared HF cache at once raced on its cache files.
    try:
        with scratch_dir(out, "data") as scratch:
            chats = td.read_chats(cfg.data, cfg.repetitive, stats, cache_dir=scratch)
            return _run_trainer(cfg, out, model_path, ds_config, chats, stats, callbacks)
    finally:
        # A ZeRO-3 run registers a process-wide config that makes every later from_pretrained in
        # this process partition its weights; the next stage (evaluate, in-process) must not inherit it.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _run_trainer(cfg: TrainConfig, out: Path, model_path: Path, ds_config, chats, stats, callbacks) -> Path:
    ckpt = checkpoint_dir(out)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    if ds_config is not None:
        ensure_distributed_env()
    bf16 = use_bf16(cfg.precision)
    # TrainingArguments first: under ZeRO-3 it makes from_pretrained partition weights at load.
    args = TrainingArguments(
        output_dir=str(ckpt),
        deepspeed=ds_config,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        **checkpointing_kwarg(TrainingArguments, cfg.gradient_checkpointing),
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        # zero2/zero3 configs name no optimizer, so DeepSpeed wraps this one: torch's fused AdamW
        # needs no DeepSpeed op compiled with nvcc. zero3_offload names DeepSpeed's CPU Adam.
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        bf16=bf16,
        # Without CUDA, accelerate only counts launcher ranks (gloo) when told it is on CPU.
        use_cpu=not torch.cuda.is_available(),
        logging_steps=cfg.logging_steps,
        # The filter tests every batch's loss for nan/inf on the host: a GPU sync per batch that
        # keeps the host from preparing the next batch while the backward runs. A nan loss is then
        # logged as nan, not hidden.
        logging_nan_inf_filter=False,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="no",  # set below once we know there is an eval split
        eval_steps=cfg.eval_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )

    # Before the model loads: a checkpoint from other settings, or one whose files changed, is an
    # error worth raising early. The other ranks pick the checkpoint rank 0 verified.
    with args.main_process_first(local=False, desc="checking checkpoints"):
        if args.process_index == 0:
            last = prepare_checkpoints(cfg, ckpt)
        else:
            last = newest_complete(ckpt) if cfg.resume else None

    from distill.io.models import load_tokenizer

    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, "target model")  # a damaged one: one line
    td.ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # DeepSpeed bf16 keeps fp32 master weights in its optimizer, so bf16 weights lose nothing;
    # the plain Trainer instead trains fp32 weights under bf16 autocast.
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if bf16 and ds_config else torch.float32, use_safetensors=True,
        local_files_only=True, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # new rows start at the mean embedding
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False

    # No main_process_first: each rank's data cache is its own, so ranks tokenise in parallel.
    train_ds, eval_ds = _prepare_data(chats, tokenizer, cfg, stats)
    if eval_ds is not None:
        args.eval_strategy = transformers.IntervalStrategy.STEPS
    log.info("data: %s", td.dump_stats(stats))
    # Warm-up in whole steps, rounded down: transformers rounds a ratio up, so a run of a few
    # steps would spend its first step (or its only one) at learning rate 0.
    per_step = cfg.batch_size * cfg.grad_accum * max(args.world_size, 1)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * math.ceil(len(train_ds) / per_step))
    args.warmup_steps = int(cfg.warmup_ratio * total)

    fused = cfg.fused_loss and not is_zero3(ds_config)
    if cfg.fused_loss and not fused:
        log.warning("--fused-loss needs the whole lm_head on each rank; not available under ZeRO-3, using HF's loss")
    trainer_cls = fused_loss_trainer() if fused else Trainer
    if cfg.compile_layers:
        compile_layers(model, zero3=is_zero3(ds_config))
    # Compiled layers and packed rows: every batch max_length wide, one shape. Packed widths vary
    # by a few tokens, and each new one made dynamo compile again, then fall back to dynamic-shape
    # kernels; packed rows are nearly full, so the extra padding costs little.
    width = cfg.max_length if cfg.packing and cfg.compile_layers else 8
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=td.SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=width),
                          processing_class=tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(ProgressCallback)  # its bar redraws every step, even into a log file
    trainer.add_callback(trainer_progress_callback())
    trainer.add_callback(release_deepspeed_shm_callback())
    trainer.add_callback(checkpoint_manifest_callback())
    install_fault_points(trainer)  # tests only: inert unless DISTILL_FAULT_AT is set
    finished = last is not None and training_finished(last)
    if finished:
        # The Trainer would take one more optimizer step before it checks the budget: load the
        # checkpoint through its usual path, then stop before the first step.
        class StopBeforeTheFirstStep(transformers.TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                raise _AlreadyTrained

        trainer.add_callback(StopBeforeTheFirstStep())
    if last:
        log.info("resuming from %s%s", last, " (its training is complete; the final save remains)" if finished else "")
    resume = str(last) if last else None
    try:
        with weights_only_loads():
            result = trainer.train(resume_from_checkpoint=resume)
        train_loss = result.training_loss if resume is None else mean_train_loss(trainer.state.log_history)
    except _AlreadyTrained:
        trainer.is_in_train = False
        trainer.control = trainer.callback_handler.on_train_end(args, trainer.state, trainer.control)
        train_loss = mean_train_loss(trainer.state.log_history)
    step = trainer.state.global_step
    if eval_ds is not None and not any("eval_loss" in h and h.get("step") == step for h in trainer.state.log_history):
        trainer.evaluate()  # the held-out loss at the final weights, unless the last step just logged it
    save_final(trainer, cfg, out, ckpt, stats, resume, train_loss)
    return out


class _AlreadyTrained(Exception):
    """Raised at train begin of a finished run: the checkpoint, optimizer and state are loaded by then."""


def _prepare_data(chats, tokenizer, cfg: TrainConfig, stats: td.DataStats):
    n_eval = int(len(chats) * cfg.eval_fraction)
    eval_ds = None
    if n_eval >= 1 and len(chats) - n_eval >= 1:
        split = chats.train_test_split(test_size=n_eval, seed=cfg.seed)
        chats, eval_chats = split["train"], split["test"]
        eval_stats = td.DataStats()
        eval_ds = td.tokenize_dataset(eval_chats, tokenizer, cfg.max_length, cfg.truncation, eval_stats)
        stats.extra["eval_examples"] = eval_stats.examples
        if len(eval_ds) == 0:
            eval_ds = None
    train_ds = td.tokenize_dataset(chats, tokenizer, cfg.max_length, cfg.truncation, stats)
    if len(train_ds) == 0:
        raise DistillError(f"training data {cfg.data}: no example fits max_length={cfg.max_length} "
                           f"({stats.dropped_too_long} dropped as too long); raise --max-length or use "
                           "--truncation truncate")
    if cfg.packing:
        train_ds = td.pack(train_ds, cfg.max_length)
        stats.packed_rows = len(train_ds)
        if eval_ds is not None:
            eval_ds = td.pack(eval_ds, cfg.max_length)
    return train_ds, eval_ds
