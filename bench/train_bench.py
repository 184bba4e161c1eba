"""Fine-tuning throughput: `distill train` (HF Trainer + DeepSpeed) side by side with its peers.

GPU (one H100; under 8 minutes):
    python bench/train_bench.py --device cuda --json bench/train_gpu.json
  a random-init Qwen2.5-1.5B-configuration target, 2048-token rows, bf16, each configuration in
  its own subprocess (clean peak memory, no compile cache shared):
    plain        the anchor: HF model, fused torch AdamW, bf16 weights, HF loss (full logits)
    fast         same, plus the levers: chunked linear+CE (distill.train.fused), regional
                 torch.compile of the decoder layers
    fast-packed  `fast` on packed rows (4 documents per row, position ids restart, so
                 transformers builds a block-diagonal mask for SDPA)
    fast-packed-flex  the same with attn_implementation="flex_attention": the packed documents'
                 block mask as a FlexAttention BlockMask, so blocks across documents are skipped
                 instead of masked (no backward on CPU: a GPU-only lever)
    zero2        `distill.train.run.train`: Trainer + DeepSpeed ZeRO-2, packing, --fused-loss
    zero2-compile  zero2 plus --compile-layers (any `distill train` configuration takes -compile)
    zero2-autobucket  zero2 with HF's "auto" reduce bucket (hidden² elements) instead of the shipped
                   5e8 (DeepSpeed's own default)
    zero2-nooverlap  zero2 with overlap_comm off: on one GPU there is no communication to overlap,
                 and with it on, ZeRO-2 reduces on a second stream and syncs the device after
                 every backward
    zero2-nocheck  zero2 without DeepSpeed's bf16 overflow check (two reductions per gradient
                 tensor and a read-back to the host, every step)
    zero2-flex   zero2 with `--attn-implementation flex_attention` (see fast-packed-flex); the
                 suffixes combine: zero2-compile-flex, zero2-compile-autobucket
    -eagerloss   (fast, zero2, trainer lines) the fused loss's chunks eagerly, as before the
                 torch.compile'd chunk became the CUDA default: that lever's A/B
    trainer      `distill.train.run.train` without DeepSpeed (`--deepspeed none`), packing, --fused-loss
    zero3        `distill.train.run.train`: Trainer + DeepSpeed ZeRO-3, packing (HF loss)
  NAME@B runs a configuration at batch B: `--configs plain,fast,fast@8` puts the chunked loss's
  memory saving to use beside the anchor, in the same run.
  MFU = tokens/s x (6 N + 12 L d T) / 989e12, N all parameters (tied embedding once), T = 2048:
  the formula that gives the issue's anchor (35,100 tok/s -> 36.6 %).

CPU (here):
    python bench/train_bench.py --device cpu --trl-python /tmp/benchvenv-trl/bin/python
  a small Qwen2 target with a ChatML tokenizer, the same rows, settings and seed through
  `distill train` (no DeepSpeed and ZeRO-2) and TRL's SFTTrainer (assistant-only loss);
  tokens/s and the loss curves.

Prints a Markdown table: tokens/s over the timed steps, tokens/s at the median step, and a note
when torch.compile compiled while the clock ran or one step took > 3x the median one. --json
writes every number (each timed step's seconds too) and, beside it, each worker's whole output as
worker-CONFIG.log (run with TORCH_LOGS=recompiles to see why a layer recompiled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_workers import (H100_BF16_FLOPS, ZERO2_LEVERS, _model_shape, flops_per_token, prepare_cpu,
                           worker_cpu_distill, worker_cpu_trl, worker_distill, worker_manual)


# ----------------------------------------------------------------------------- driver


def run_worker(python, name, args, extra_env=None, timeout=600, log=None):
    """One configuration in its own process; "NAME@B" runs NAME at batch B instead of --batch, and
    "NAME@BxA" accumulates gradients over A batches of B per optimizer step. `log`: a file for the
    worker's whole output (its stderr has the compile and recompile logs)."""
    worker, _, shape = name.partition("@")
    batch, _, accum = shape.partition("x")
    cmd = [python, str(Path(__file__).resolve()), "--worker", worker, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", batch or str(args.batch),
           "--grad-accum", accum or "1",
           "--seq-len", str(args.seq_len), "--workdir", str(args.workdir)] + (["--grad-ckpt"] if args.grad_ckpt else []) \
        + (["--profile", str(Path(args.profile).resolve())] if getattr(args, "profile", None) else [])
    env = dict(os.environ, **(extra_env or {}))  # the child imports the installed package, as this process does
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        out, err = proc.stdout, proc.stderr
        failed = f"worker exited with status {proc.returncode}" if proc.returncode else None
    except subprocess.TimeoutExpired as e:
        out, err = _text(e.stdout), _text(e.stderr)
        failed = f"stopped by timeout ({timeout:.0f} s)"
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(f"$ {' '.join(cmd)}\n== stdout\n{out}\n== stderr\n{err}")
    res = last_result(out)
    if res is None:
        tail = (out + err).strip().splitlines()[-6:]
        return {"config": name, "error": " | ".join(([failed] if failed else []) + tail)[-600:]}
    res["config"], res["wall_s"] = name, time.perf_counter() - t0
    if failed:  # the worker prints its numbers as soon as its clock stops, before the final save
        res["note"] = f"{failed} after the measurement"
    return res


def last_result(stdout: str):
    """The worker's last `RESULT {json}` line, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def _text(output) -> str:
    # TimeoutExpired holds the output read so far as bytes even under text=True (POSIX), or None
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _log_path(args, name, round_=None):
    """Next to --json, one file per worker run; None without --json."""
    if not args.json:
        return None
    suffix = f"-round{round_ + 1}" if round_ is not None and args.repeats > 1 else ""
    return Path(args.json).resolve().parent / f"worker-{name.replace(':', '-')}{suffix}.log"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--suite", choices=["mfu", "trl"], default=None,
                   help="mfu: the 1.5B throughput table (default on cuda; on cpu a small shape, to check the "
                        "script); trl: the CPU comparison with TRL's SFTTrainer (default on cpu)")
    p.add_argument("--configs", default=None,
                   help="comma list; mfu: plain,zero2,zero3,fast,zero2-compile,zero2-autobucket,fast-packed,trainer "
                        "(suffix -flex: FlexAttention for packed rows; -eagerloss: the fused loss uncompiled); trl: "
                        "none,zero2,trl. NAME@B runs NAME at batch B (e.g. fast@8 beside plain at --batch); "
                        "NAME@BxA also accumulates gradients over A batches per optimizer step")
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
    p.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)  # set through NAME@BxA
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.suite = args.suite or ("mfu" if args.device == "cuda" else "trl")
    gpu = args.suite == "mfu"
    args.steps = args.steps or (10 if gpu else 30)
    args.warmup = 3 if args.warmup is None else args.warmup
    args.batch = args.batch or (4 if gpu else 8)
    args.seq_len = args.seq_len or (2048 if args.device == "cuda" else 128)

    if args.worker:
        if args.worker.startswith("cpu:trl"):
            return worker_cpu_trl(args)
        if args.worker.startswith("cpu:"):
            return worker_cpu_distill(args)
        base, *levers = args.worker.split("-")
        if base in ("zero2", "zero3", "trainer"):
            if set(levers) - {"compile", "flex", "eagerloss"} - ZERO2_LEVERS or (ZERO2_LEVERS & set(levers) and base != "zero2"):
                raise SystemExit(f"unknown configuration {args.worker}: the suffixes are -compile, -flex, -eagerloss, "
                                 "and for zero2 -autobucket, -nooverlap and -nocheck")
            return worker_distill(args)
        if base not in ("plain", "fast") or set(levers) - {"packed", "flex", "eagerloss"} or (base == "plain" and levers):
            raise SystemExit(f"unknown configuration {args.worker}: plain, fast, fast-packed, fast-packed-flex "
                             "(fast lines also take -eagerloss)")
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
                results.append(run_worker(sys.executable, name, args, timeout=min(240, left),
                                          log=_log_path(args, name)))
                print(f"  {name}: {results[-1]}", file=sys.stderr, flush=True)
        else:
            n_params = prepare_cpu(Path(work))
            names = (args.configs or "none,zero2,trl").split(",")
            runs = {name: [] for name in names}
            for round_ in range(args.repeats):  # interleaved rounds: a shared machine's load hits all alike
                for name in names:
                    python = args.trl_python if name == "trl" else sys.executable
                    if name == "trl" and not Path(python).exists():
                        runs[name].append({"config": "trl", "error": f"{python} not found (make the TRL venv)"})
                        continue
                    runs[name].append(run_worker(python, f"cpu:{name}", args, {"OMP_NUM_THREADS": "2"},
                                                 log=_log_path(args, f"cpu:{name}", round_)))
                    print(f"  {name}: {runs[name][-1].get('tokens_per_s', runs[name][-1].get('error'))}",
                          file=sys.stderr)
            for name in names:
                ok = [r for r in runs[name] if "error" not in r]
                if not ok:
                    results.append(runs[name][0])
                    continue
                ok.sort(key=lambda r: r["tokens_per_s"])
                # the median run whole, so that its step times and compile counts go with its speed
                results.append(dict(ok[len(ok) // 2], all_tokens_per_s=[r["tokens_per_s"] for r in ok]))
    report(results, args, n_params=None if gpu else n_params)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


def report(results, args, n_params=None):
    if args.suite == "mfu":
        shape = _model_shape(args.device)
        print("\n| configuration | batch x seq (x accumulation) | tokens/s | tokens/s at the median step | MFU | "
              "peak GiB | notes |\n|---|---|---|---|---|---|---|")
        for r in results:
            if "error" in r:
                print(f"| {r['config']} | | error: {_cell(r['error'][-200:])} | | | | |")
                continue
            fpt = flops_per_token(r["n_params"], shape["num_hidden_layers"], shape["hidden_size"], args.seq_len)
            r["mfu"] = r["tokens_per_s"] * fpt / H100_BF16_FLOPS
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
            accum = f" x {r['grad_accum']}" if r.get("grad_accum", 1) > 1 else ""
            print(f"| {r['config']} | {r['batch']} x {args.seq_len}{accum} | {r['tokens_per_s']:,.0f} | "
                  f"{r['tokens_per_s_median']:,.0f} | {100 * r['mfu']:.1f}% | {peak} | {notes(r)} |")
        return
    print(f"\nCPU, {os.cpu_count()} cores, Qwen2 target of {n_params:,} parameters, batch {args.batch}, "
          f"max length {args.seq_len}, {args.steps} timed steps after {args.warmup}\n")
    print("| trainer | tokens/s, median (each run) | loss step 1 | loss at end | mean |diff| to first row's curve |\n|---|---|---|---|---|")
    ref = next((r["losses"] for r in results if "losses" in r), None)
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | error: {r['error'][-300:]} | | | |")
            continue
        ls = r["losses"]
        diff = sum(abs(a - b) for a, b in zip(ls, ref)) / max(1, min(len(ls), len(ref)))
        runs = ", ".join(f"{x:,.0f}" for x in r.get("all_tokens_per_s", []))
        print(f"| {r['config']} | {r['tokens_per_s']:,.0f} ({runs}) | {ls[0]:.3f} | {ls[-1]:.3f} | {diff:.4f} |")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a worker's output joined with " | " would split the Markdown row


def notes(r) -> str:
    """What makes a row's mean suspect: compilations inside the timed steps, one step far slower than
    the median one, a compiled lever that fell back to eager, or a worker stopped after its measurement."""
    out = []
    if r.get("compiles_in_timed_region"):
        n = r["compiles_in_timed_region"]
        out.append(f"{n} compile{'s' if n > 1 else ''} while timed, {r['compile_s_in_timed_region']:.1f} s")
    steps = r.get("step_s") or []
    if steps and max(steps) > 3 * statistics.median(steps):
        out.append(f"slowest step {max(steps):.2f} s (step {steps.index(max(steps)) + 1}) "
                   f"vs median {statistics.median(steps):.2f} s")
    if r.get("fell_back_to_eager"):
        out.append("compiled but fell back to eager: " + ", ".join(r["fell_back_to_eager"]))
    if r.get("note"):
        out.append(r["note"])
    return "; ".join(out)


if __name__ == "__main__":
    main()
