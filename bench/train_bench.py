"""Fine-tuning throughput: `distill train` (HF Trainer + DeepSpeed) side by side with its peers.

GPU (one H100; under 8 minutes):
    python bench/train_bench.py --device cuda --json bench/train_gpu.json
  a random-init Qwen2.5-1.5B-configuration target, 2048-token rows, bf16, each configuration in
  its own subprocess (clean peak memory, no compile cache shared):
    plain        the anchor: HF model, fused torch AdamW, bf16 weights, HF loss (full logits)
    fast         same, plus the levers: chunked linear+CE (distill.train_fused), regional
                 torch.compile of the decoder layers
    fast-packed  `fast` on packed rows (4 documents per row, position ids restart, so
                 transformers builds a block-diagonal mask for SDPA)
    fast-packed-flex  the same with attn_implementation="flex_attention": the packed documents'
                 block mask as a FlexAttention BlockMask, so blocks across documents are skipped
                 instead of masked (no backward on CPU: a GPU-only lever)
    zero2        `distill.train.train`: Trainer + DeepSpeed ZeRO-2, packing, --fused-loss
    zero2-compile  zero2 plus --compile-layers (any `distill train` configuration takes -compile)
    zero2-autobucket  zero2 with HF's "auto" reduce bucket (hidden² elements) instead of the shipped
                   5e8 (DeepSpeed's own default)
    zero2-nooverlap  zero2 with overlap_comm off: on one GPU there is no communication to overlap,
                 and with it on, ZeRO-2 synchronises the device around every bucket reduction
    zero2-flex   zero2 with `--attn-implementation flex_attention` (see fast-packed-flex); the
                 suffixes combine: zero2-compile-flex, zero2-compile-autobucket
    trainer      `distill.train.train` without DeepSpeed (`--deepspeed none`), packing, --fused-loss
    zero3        `distill.train.train`: Trainer + DeepSpeed ZeRO-3, packing (HF loss)
  NAME@B runs a configuration at batch B: `--configs plain,fast,fast@8` puts the chunked loss's
  memory saving to use beside the anchor, in the same run.
  MFU = tokens/s x (6 N + 12 L d T) / 989e12, N all parameters (tied embedding once), T = 2048:
  the formula that gives the issue's anchor (35,100 tok/s -> 36.6 %).

CPU (here):
    python bench/train_bench.py --device cpu --trl-python /tmp/benchvenv-trl/bin/python
  a small Qwen2 target with a ChatML tokenizer, the same rows, settings and seed through
  `distill train` (no DeepSpeed and ZeRO-2) and TRL's SFTTrainer (assistant-only loss);
  tokens/s and the loss curves.

Prints a Markdown table; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
    print("RESULT " + json.dumps(kw), flush=True)


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


def _profiled(device, out_file):
    """A torch.profiler context for the extra steps after the timed ones; on exit, writes the top
    kernels and whether the step is bound by the GPU or by the host (Python, launches, syncs)."""
    import contextlib

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    @contextlib.contextmanager
    def ctx():
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        _sync(device)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            yield
            _sync(device)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        # kernel rows only (CPU ops carry their kernels' time too: summing both counts it twice)
        gpu_busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
        busy = (f"GPU kernels busy {gpu_busy:.3f} s ({100 * gpu_busy / wall:.0f} % of wall: well under 100 % "
                f"means the host, launches or syncs hold the GPU back; kernels on overlapping streams, "
                f"as ZeRO's communication, are summed, so it can pass 100 %)") if device == "cuda" else "no GPU"
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(f"wall {wall:.3f} s for the profiled steps; {busy}\n\n"
                                  + events.table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n")

    return ctx()


def worker_manual(args):
    """plain / fast / fast-packed[-flex]: a hand loop, so the anchor has no framework overhead."""
    import torch

    from distill.train_fused import causal_lm_loss

    device = args.device
    base, *levers = args.worker.split("-")
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
        batch = _rows(args.batch, args.seq_len, model.config.vocab_size, docs, device, gen)
        if fast:
            loss = causal_lm_loss(model, batch)  # the chunk size `distill train` uses
        else:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    tokens = args.steps * args.batch * args.seq_len
    if args.profile:
        with _profiled(device, Path(args.profile) / f"profile-{args.worker}@{args.batch}.txt"):
            for _ in range(2):
                step()
    _result(config=args.worker, tokens_per_s=tokens / elapsed, n_params=n_params, loss=float(loss),
            peak_gib=_peak(device), batch=args.batch)


def worker_distill(args):
    """zero2 / zero3 on GPU: the real `distill.train.train` on a synthetic dataset."""
    import torch

    from distill.train import TrainConfig, train

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = _qwen(args.seq_len, args.device)  # saved, then loaded by train() like any target
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / "target")
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        _tokenizer(chatml=True).save_pretrained(tmp / "target")
        total_rows = (args.warmup + args.steps) * args.batch * 4 + 8
        _write_rows(tmp / "data.jsonl", total_rows, words=args.seq_len // 4 - 24)
        timer = _timer_callback(args.warmup, args.device, stop_at=args.warmup + args.steps)
        extra = [_profile_callback(args.warmup + args.steps, args.device,
                                   Path(args.profile) / f"profile-{args.worker}@{args.batch}.txt")] if args.profile else []
        base, *levers = args.worker.split("-")
        deepspeed = "none" if base == "trainer" else base
        if {"autobucket", "nooverlap"} & set(levers):
            deepspeed = _zero2_variant(tmp, levers)
        cfg = TrainConfig(model=str(tmp / "target"), data=str(tmp / "data.jsonl"), out=str(tmp / "out"),
                          deepspeed=deepspeed, max_steps=args.warmup + args.steps + (2 if args.profile else 0), lr=1e-4,
                          batch_size=args.batch, max_length=args.seq_len, packing=True, eval_fraction=0.0,
                          logging_steps=1000, save_steps=100000, warmup_ratio=0.0, lr_scheduler="constant",
                          precision="bf16" if args.device == "cuda" else "fp32",
                          fused_loss=base in ("zero2", "trainer"), compile_layers="compile" in levers,
                          attn_implementation="flex_attention" if "flex" in levers else "sdpa",
                          gradient_checkpointing=args.grad_ckpt)
        train(cfg, callbacks=[timer] + extra)
    elapsed, tokens = timer.elapsed(), timer.tokens
    _result(config=args.worker, tokens_per_s=tokens / elapsed, n_params=n_params, peak_gib=timer.peak,
            batch=args.batch)


def _zero2_variant(tmp: Path, levers) -> str:
    """The shipped ZeRO-2 config with
    - autobucket: HF's "auto" reduce bucket (hidden_size²: 2.4M elements for the 1.5B target, so
      ~650 bucket reductions per step, each a collective call and a copy even on one GPU) instead
      of the shipped 5e8 elements: what distill shipped until the H100 showed the cost
      (BENCHMARKS.md);
    - nooverlap: overlap_comm off (the shipped config has it on, for several GPUs)."""
    from distill.train import load_deepspeed_config

    cfg = load_deepspeed_config("zero2")
    if "autobucket" in levers:
        cfg["zero_optimization"]["reduce_bucket_size"] = "auto"
    if "nooverlap" in levers:
        cfg["zero_optimization"]["overlap_comm"] = False
    path = tmp / "zero2_variant.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _profile_callback(start, device, out_file):
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        ctx = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start and self.ctx is None:
                self.ctx = _profiled(device, out_file)
                self.ctx.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.ctx is not None and state.global_step >= start + 2:
                self.ctx.__exit__(None, None, None)
                self.ctx = None

    return Profile()


def _timer_callback(warmup, device, stop_at=None):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.tokens = 0
            self.peak = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                _sync(device)
                _reset_peak(device)
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.t0 is not None and self.t1 is None:
                # packed rows: count the real tokens of this step's rows
                self.tokens += self.tokens_per_step
                if state.global_step >= (stop_at or state.max_steps) and self.t1 is None:
                    # Stop the clock at the last optimizer step: the Trainer then saves a full
                    # checkpoint (weights + optimizer state), which is I/O, not training speed.
                    _sync(device)
                    self.t1 = time.perf_counter()
                    self.peak = _peak(device)

        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            ds = train_dataloader.dataset if train_dataloader is not None else None
            rows = [len(x) for x in ds["input_ids"]] if ds is not None else [0]
            self.tokens_per_step = sum(rows) / len(rows) * args.per_device_train_batch_size * \
                args.gradient_accumulation_steps * args.world_size

        def on_train_end(self, args, state, control, **kw):
            if self.t1 is None:
                _sync(device)
                self.t1 = time.perf_counter()
                self.peak = _peak(device)

        def elapsed(self):
            return self.t1 - self.t0

    return Timer()


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# ----------------------------------------------------------------------------- CPU comparison


def _tokenizer(chatml: bool):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tokenizer

    from distill import train_data as td

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
    from distill.train import TrainConfig, train

    work = Path(args.workdir)
    stage = args.worker.split(":")[1]
    timer = _timer_callback(args.warmup, "cpu")
    cfg = TrainConfig(model=str(work / "target"), data=str(work / "data.jsonl"), out=str(work / f"out-{stage}"),
                      deepspeed=stage, max_steps=args.warmup + args.steps, lr=1e-3, batch_size=args.batch,
                      max_length=args.seq_len, eval_fraction=0.0, logging_steps=1, save_steps=100000,
                      warmup_ratio=0.0, lr_scheduler="constant", seed=0, overwrite=True)
    out = train(cfg, callbacks=[timer])
    losses = [float(line.split(",")[2]) for line in (out / "loss.csv").read_text().splitlines()[1:]
              if line.split(",")[2]]
    _result(config=f"distill train --deepspeed {stage}", tokens_per_s=timer.tokens / timer.elapsed(), losses=losses)


def worker_cpu_trl(args):
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.workdir)
    rows = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": r["instruction"]},
                                                   {"role": "assistant", "content": r["response"]}]}
                                     for r in rows])
    tok = AutoTokenizer.from_pretrained(work / "target")
    model = AutoModelForCausalLM.from_pretrained(work / "target", dtype="float32")
    timer = _timer_callback(args.warmup, "cpu")
    cfg = trl.SFTConfig(output_dir=str(work / "out-trl"), max_steps=args.warmup + args.steps, learning_rate=1e-3,
                        per_device_train_batch_size=args.batch, max_length=args.seq_len,
                        assistant_only_loss=True, packing=False, logging_steps=1, save_strategy="no",
                        warmup_steps=0, lr_scheduler_type="constant", seed=0, report_to=[], use_cpu=True,
                        dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _result(config=f"TRL {trl.__version__} SFTTrainer", tokens_per_s=timer.tokens / timer.elapsed(), losses=losses)


# ----------------------------------------------------------------------------- driver


def run_worker(python, name, args, extra_env=None, timeout=600):
    """One configuration in its own process; "NAME@B" runs NAME at batch B instead of --batch."""
    worker, _, batch = name.partition("@")
    cmd = [python, str(Path(__file__).resolve()), "--worker", worker, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", batch or str(args.batch),
           "--seq-len", str(args.seq_len), "--workdir", str(args.workdir)] + (["--grad-ckpt"] if args.grad_ckpt else []) \
        + (["--profile", str(Path(args.profile).resolve())] if getattr(args, "profile", None) else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **(extra_env or {}))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["config"], res["wall_s"] = name, time.perf_counter() - t0
            return res
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    return {"config": name, "error": " | ".join(tail)[-600:]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--suite", choices=["mfu", "trl"], default=None,
                   help="mfu: the 1.5B throughput table (default on cuda; on cpu a small shape, to check the "
                        "script); trl: the CPU comparison with TRL's SFTTrainer (default on cpu)")
    p.add_argument("--configs", default=None,
                   help="comma list; mfu: plain,zero2,zero3,fast,zero2-compile,zero2-autobucket,fast-packed,trainer "
                        "(suffix -flex: FlexAttention for packed rows); trl: "
                        "none,zero2,trl. NAME@B runs NAME at batch B (e.g. fast@8 beside plain at --batch)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compile, allocator)")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 4 on cuda, 8 on cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048 cuda, 128 cpu)")
    p.add_argument("--budget-s", type=float, default=460, help="mfu suite: total wall-clock budget (default "
                   "%(default)s s, so the whole run stays under 8 minutes); each configuration gets <= 240 s")
    p.add_argument("--repeats", type=int, default=1, help="cpu suite: interleaved rounds, the median is reported")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the zero2/zero3 runs")
    p.add_argument("--trl-python", default="/tmp/benchvenv-trl/bin/python", help="python with trl (cpu part)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="mfu suite: after the timed steps, profile 2 more and write DIR/profile-CONFIG@BATCH.txt "
                        "(top kernels, and GPU busy time against wall time)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.suite = args.suite or ("mfu" if args.device == "cuda" else "trl")
    gpu = args.suite == "mfu"
    args.steps = args.steps or (10 if gpu else 30)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 3)
    args.batch = args.batch or (4 if gpu else 8)
    args.seq_len = args.seq_len or (2048 if args.device == "cuda" else 128)

    if args.worker:
        if args.worker.startswith("cpu:trl"):
            return worker_cpu_trl(args)
        if args.worker.startswith("cpu:"):
            return worker_cpu_distill(args)
        base, *levers = args.worker.split("-")
        if base in ("zero2", "zero3", "trainer"):
            zero2_only = {"autobucket", "nooverlap"}
            if set(levers) - {"compile", "flex"} - zero2_only or (zero2_only & set(levers) and base != "zero2"):
                raise SystemExit(f"unknown configuration {args.worker}: the suffixes are -compile, -flex, and "
                                 "for zero2 -autobucket and -nooverlap")
            return worker_distill(args)
        if base not in ("plain", "fast") or set(levers) - {"packed", "flex"} or (base == "plain" and levers):
            raise SystemExit(f"unknown configuration {args.worker}: plain, fast, fast-packed, fast-packed-flex")
        return worker_manual(args)

    with tempfile.TemporaryDirectory(prefix="train_bench-") as work:
        args.workdir = work
        results = []
        if gpu:
            # most wanted first: if the time budget runs out, the last ones are skipped
            names = (args.configs or "plain,zero2,zero3,fast,zero2-compile,fast-packed").split(",")
            deadline = time.monotonic() + args.budget_s
            for name in names:
                left = deadline - time.monotonic()
                if left < 30:
                    results.append({"config": name, "error": f"skipped: --budget-s {args.budget_s} used up"})
                    continue
                results.append(run_worker(sys.executable, name, args, timeout=min(240, left)))
                print(f"  {name}: {results[-1]}", file=sys.stderr, flush=True)
        else:
            n_params = prepare_cpu(Path(work))
            names = (args.configs or "none,zero2,trl").split(",")
            runs = {name: [] for name in names}
            for _ in range(args.repeats):  # interleaved rounds: a shared machine's load hits all alike
                for name in names:
                    python = args.trl_python if name == "trl" else sys.executable
                    if name == "trl" and not Path(python).exists():
                        runs[name].append({"config": "trl", "error": f"{python} not found (make the TRL venv)"})
                        continue
                    runs[name].append(run_worker(python, f"cpu:{name}", args, {"OMP_NUM_THREADS": "2"}))
                    print(f"  {name}: {runs[name][-1].get('tokens_per_s', runs[name][-1].get('error'))}",
                          file=sys.stderr)
            for name in names:
                ok = [r for r in runs[name] if "error" not in r]
                if not ok:
                    results.append(runs[name][0])
                    continue
                speeds = sorted(r["tokens_per_s"] for r in ok)
                results.append(dict(ok[0], tokens_per_s=speeds[len(speeds) // 2], all_tokens_per_s=speeds))
    report(results, args, n_params=None if gpu else n_params)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


def report(results, args, n_params=None):
    if args.suite == "mfu":
        shape = _model_shape(args.device)
        print("\n| configuration | batch x seq | tokens/s | MFU | peak GiB |\n|---|---|---|---|---|")
        for r in results:
            if "error" in r:
                print(f"| {r['config']} | | error: {r['error'][:200]} | | |")
                continue
            fpt = flops_per_token(r["n_params"], shape["num_hidden_layers"], shape["hidden_size"], args.seq_len)
            r["mfu"] = r["tokens_per_s"] * fpt / H100_BF16_FLOPS
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
            print(f"| {r['config']} | {r['batch']} x {args.seq_len} | {r['tokens_per_s']:,.0f} | "
                  f"{100 * r['mfu']:.1f}% | {peak} |")
        return
    print(f"\nCPU, {os.cpu_count()} cores, Qwen2 target of {n_params:,} parameters, batch {args.batch}, "
          f"max length {args.seq_len}, {args.steps} timed steps after {args.warmup}\n")
    print("| trainer | tokens/s, median (each run) | loss step 1 | loss at end | mean |diff| to first row's curve |\n|---|---|---|---|---|")
    ref = next((r["losses"] for r in results if "losses" in r), None)
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | error: {r['error'][:300]} | | | |")
            continue
        ls = r["losses"]
        diff = sum(abs(a - b) for a, b in zip(ls, ref)) / max(1, min(len(ls), len(ref)))
        runs = ", ".join(f"{x:,.0f}" for x in r.get("all_tokens_per_s", []))
        print(f"| {r['config']} | {r['tokens_per_s']:,.0f} ({runs}) | {ls[0]:.3f} | {ls[-1]:.3f} | {diff:.4f} |")


if __name__ == "__main__":
    main()
