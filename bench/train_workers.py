"""The workers of bench/train_bench.py: each configuration runs in its own process, as
`python bench/train_bench.py --worker NAME ...`, and prints one `RESULT {json}` line.

GPU (the mfu suite): the hand loop (plain, fast, fast-packed[-flex]) and `distill.train.run.train`
(zero2, zero3, trainer, with -compile, -flex, -eagerloss, and for zero2 the ZERO2_LEVERS). CPU (the trl suite):
`distill train` and TRL's SFTTrainer on the same small target and rows.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from train_timing import (CompileWatch, durations, mark, no_last_checkpoint_callback, peak, profile_callback,
                          profiled, reset_peak, sync, timer_callback, timing)

H100_BF16_FLOPS = 989e12
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
CPU_TARGET = dict(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=384, tie_word_embeddings=True,
                  max_position_embeddings=512)
WORDS = ("the quick brown fox jumps over the lazy dog answer in json with a list of three bullet points "
         "write the response in lowercase letters and end with the word done capital made up country city "
         "river please repeat request word for then give your").split()


def flops_per_token(n_params: int, layers: int, hidden: int, seq: int) -> float:
    return 6 * n_params + 12 * layers * hidden * seq


def _result(**kw):
    print("RESULT " + json.dumps({**kw, **_fallbacks()}), flush=True)


def _fallbacks() -> dict:
    """A compiled lever that fell back to eager (distill.decoding.compiled logs why), such as the fused loss's
    chunk (compiled by default on CUDA), measures something else: the row says so."""
    compiled = sys.modules.get("distill.decoding.compiled")  # not imported (TRL's worker): nothing of ours compiled
    failed = compiled.fell_back_to_eager() if compiled else []
    return {"fell_back_to_eager": failed} if failed else {}


# ----------------------------------------------------------------------------- GPU workers


def _model_shape(device):
    """The 1.5B shape on GPU; on CPU a small one, only to check the script runs."""
    return QWEN25_15B if device == "cuda" else dict(QWEN25_15B, hidden_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=256)


def _qwen(seq, device, attn="sdpa", shape=None):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**(shape or _model_shape(device)))
    with torch.device(device):  # random init on the GPU itself: seconds, not a minute on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    model.config.use_cache = False
    return model


def _rows(batch, seq, vocab, docs_per_row, device, generator):
    import torch

    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=generator)
    if docs_per_row <= 1:
        return {"input_ids": ids, "labels": ids}
    doc = seq // docs_per_row
    pos = torch.arange(seq, device=device) % doc
    labels = ids.clone()
    labels[:, ::doc] = -100  # nothing predicts a new document's first token
    return {"input_ids": ids, "labels": labels, "position_ids": pos.expand(batch, -1)}


def _label(args) -> str:
    return f"{args.worker}@{args.batch}" + (f"x{args.grad_accum}" if args.grad_accum > 1 else "")


def worker_manual(args):
    """plain / fast / fast-packed[-flex]: a hand loop, so the anchor has no framework overhead."""
    import torch

    from distill.train.fused import causal_lm_loss

    device = args.device
    base, *levers = args.worker.split("-")
    _eager_loss_if_asked(levers)
    fast = base == "fast"
    model = _qwen(args.seq_len, device, attn="flex_attention" if "flex" in levers else "sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    if fast and device == "cuda":
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    docs = 4 if "packed" in levers else 1

    def step():
        for _ in range(args.grad_accum):
            batch = _rows(args.batch, args.seq_len, model.config.vocab_size, docs, device, gen)
            if fast:
                loss = causal_lm_loss(model, batch)  # the chunk size `distill train` uses
            else:
                loss = model(**batch).loss
            (loss / args.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    with CompileWatch() as compiles:
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        marks = [mark(device)]
        for _ in range(args.steps):
            loss = step()
            marks.append(mark(device))
        sync(device)
        elapsed = time.perf_counter() - t0
    tokens_per_step = args.grad_accum * args.batch * args.seq_len
    _result(config=args.worker, n_params=n_params, loss=float(loss), peak_gib=peak(device), batch=args.batch,
            grad_accum=args.grad_accum,
            **timing(args.steps * tokens_per_step, elapsed, tokens_per_step, durations(marks, device), compiles))
    if args.profile:
        with profiled(device, Path(args.profile) / f"profile-{_label(args)}.txt"):
            for _ in range(2):
                step()


def worker_distill(args):
    """zero2 / zero3 on GPU: the real `distill.train.run.train` on a synthetic dataset."""
    import torch

    from distill.train.run import TrainConfig, train

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = _qwen(args.seq_len, args.device)  # saved, then loaded by train() like any target
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / "target")
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        _tokenizer(chatml=True).save_pretrained(tmp / "target")
        total_rows = (args.warmup + args.steps + 2) * args.grad_accum * args.batch * 4 + 8
        _write_rows(tmp / "data.jsonl", total_rows, words=args.seq_len // 4 - 24)

        def report(timer):
            # Printed as soon as the clock stops: the profiled steps and distill's final save (a 3 GB
            # model) still follow, and if they run into the driver's timeout, the driver keeps this line.
            _result(config=args.worker, n_params=n_params, peak_gib=timer.peak, batch=args.batch,
                    grad_accum=args.grad_accum, **timer.stats())

        timer = timer_callback(args.warmup, args.device, stop_at=args.warmup + args.steps, on_stop=report)
        extra = [profile_callback(args.warmup + args.steps, args.device,
                                   Path(args.profile) / f"profile-{_label(args)}.txt")] if args.profile else []
        base, *levers = args.worker.split("-")
        _eager_loss_if_asked(levers)
        deepspeed = "none" if base == "trainer" else base
        if ZERO2_LEVERS & set(levers):
            deepspeed = _zero2_variant(tmp, levers)
        cfg = TrainConfig(model=str(tmp / "target"), data=str(tmp / "data.jsonl"), out=str(tmp / "out"),
                          deepspeed=deepspeed, max_steps=args.warmup + args.steps + (2 if args.profile else 0), lr=1e-4,
                          batch_size=args.batch, grad_accum=args.grad_accum, max_length=args.seq_len,
                          packing=True, eval_fraction=0.0,
                          logging_steps=1000, save_steps=100000, warmup_ratio=0.0, lr_scheduler="constant",
                          precision="bf16" if args.device == "cuda" else "fp32",
                          fused_loss=base in ("zero2", "trainer"), compile_layers="compile" in levers,
                          attn_implementation="flex_attention" if "flex" in levers else "sdpa",
                          gradient_checkpointing=args.grad_ckpt)
        train(cfg, callbacks=[timer] + extra + [no_last_checkpoint_callback()])


def _eager_loss_if_asked(levers):
    """-eagerloss: the fused loss's chunks eagerly even on CUDA (the default there compiles them)."""
    if "eagerloss" in levers:
        import functools

        from distill.train import fused as train_fused
        # causal_lm_loss looks the function up at each call, so this reaches the Trainer's loss too
        train_fused.linear_cross_entropy = functools.partial(train_fused.linear_cross_entropy, compiled=False)


ZERO2_LEVERS = frozenset({"autobucket", "nooverlap", "nocheck"})  # suffixes that change zero2's DeepSpeed config


def _zero2_variant(tmp: Path, levers) -> str:
    """The shipped ZeRO-2 config with
    - autobucket: HF's "auto" reduce bucket (hidden_size²: 2.4M elements for the 1.5B target, so
      ~650 bucket reductions per step, each a collective call and a copy even on one GPU) instead
      of the shipped 5e8 elements: what distill shipped until the H100 showed the cost
      (BENCHMARKS.md);
    - nooverlap: overlap_comm off (the shipped config has it on, for several GPUs);
    - nocheck: bf16.check_grad_overflow off. With it on (DeepSpeed's default), every step reduces
      each gradient tensor twice (amax, amin: ~680 small kernels for 339 tensors) and reads the
      flag back to the host; bf16 has fp32's range, and the Trainer without DeepSpeed checks nothing."""
    from distill.train.run import load_deepspeed_config

    cfg = load_deepspeed_config("zero2")
    if "autobucket" in levers:
        cfg["zero_optimization"]["reduce_bucket_size"] = "auto"
    if "nooverlap" in levers:
        cfg["zero_optimization"]["overlap_comm"] = False
    if "nocheck" in levers:
        cfg["bf16"]["check_grad_overflow"] = False
    path = tmp / f"zero2-{'-'.join(sorted(ZERO2_LEVERS & set(levers)))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# ----------------------------------------------------------------------------- CPU comparison


def _tokenizer(chatml: bool):
    from distill.train import data as td
    from distill.world.stand_ins import make_tokenizer

    tok = make_tokenizer(chat_template=None, vocab_size=250)
    if chatml:
        td.ensure_chat_template(tok)
    return tok


def _write_rows(path: Path, n: int, words: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
            f.write(json.dumps({"id": str(i), "instruction": instruction, "response": response}) + "\n")


def prepare_cpu(workdir: Path):
    """Target with ChatML already in its tokenizer, so every trainer starts from the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = _tokenizer(chatml=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**dict(CPU_TARGET, vocab_size=len(tok))))
    model.save_pretrained(workdir / "target")
    tok.save_pretrained(workdir / "target")
    _write_rows(workdir / "data.jsonl", 400, words=40)
    return sum(p.numel() for p in model.parameters())


def worker_cpu_distill(args):
    from distill.train.run import TrainConfig, train

    work = Path(args.workdir)
    stage = args.worker.split(":")[1]
    timer = timer_callback(args.warmup, "cpu")
    cfg = TrainConfig(model=str(work / "target"), data=str(work / "data.jsonl"), out=str(work / f"out-{stage}"),
                      deepspeed=stage, max_steps=args.warmup + args.steps, lr=1e-3, batch_size=args.batch,
                      max_length=args.seq_len, eval_fraction=0.0, logging_steps=1, save_steps=100000,
                      warmup_ratio=0.0, lr_scheduler="constant", seed=0, overwrite=True)
    out = train(cfg, callbacks=[timer])
    losses = [float(line.split(",")[2]) for line in (out / "loss.csv").read_text().splitlines()[1:]
              if line.split(",")[2]]
    _result(config=f"distill train --deepspeed {stage}", losses=losses, **timer.stats())


def worker_cpu_trl(args):
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.io.files import read_jsonl

    work = Path(args.workdir)
    rows = read_jsonl(work / "data.jsonl", "training data")
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": r["instruction"]},
                                                   {"role": "assistant", "content": r["response"]}]}
                                     for r in rows])
    tok = AutoTokenizer.from_pretrained(work / "target")
    model = AutoModelForCausalLM.from_pretrained(work / "target", dtype="float32")
    timer = timer_callback(args.warmup, "cpu")
    cfg = trl.SFTConfig(output_dir=str(work / "out-trl"), max_steps=args.warmup + args.steps, learning_rate=1e-3,
                        per_device_train_batch_size=args.batch, max_length=args.seq_len,
                        assistant_only_loss=True, packing=False, logging_steps=1, save_strategy="no",
                        warmup_steps=0, lr_scheduler_type="constant", seed=0, report_to=[], use_cpu=True,
                        dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _result(config=f"TRL {trl.__version__} SFTTrainer", losses=losses, **timer.stats())
