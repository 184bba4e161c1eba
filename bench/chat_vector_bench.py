"""Chat-vector extract/apply: distill (streamed) vs a naive full-load version vs mergekit.

Builds random base / post / cp checkpoints with 7B-like layer shapes (Mistral-7B: hidden 4096,
intermediate 14336, 32 heads, 8 KV heads, vocab 32768) but only a few layers, sharded bf16,
then times, each in its own subprocess (wall time and peak RSS from os.wait4):

- extract  Δ = post − base          distill | naive (load both models whole)
- apply    cp + λ·Δ                 distill | naive (load cp and Δ whole)
- merge    cp + λ·(post − base)     distill extract+apply | naive | mergekit task_arithmetic
                                    (models cp weight 1, post weight λ, base_model base)

and checks that all outputs agree. Prints a Markdown table; --json writes the numbers.

    python bench/chat_vector_bench.py                       # 4 layers, ~2.3 GB per model
    python bench/chat_vector_bench.py --layers 2 --hidden 1024 --intermediate 3584   # quick
    python bench/chat_vector_bench.py --device cuda         # arithmetic on the GPU (all three tools)

mergekit runs from its own venv (`--mergekit /tmp/benchvenv/bin/mergekit-yaml`); it is
skipped with a note if that is missing. All inputs fit in the page cache on a machine with
enough RAM, so every tool reads warm files: the comparison is of compute and memory, not disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


# -- building the checkpoints ---------------------------------------------------------------

def build(args, work: Path) -> dict:
    """Write base, post = base + small update, cp = base + another update (sharded, streamed)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from distill.io.checkpoints import ShardedWriter
    from distill.io.models import torch_dtype

    cfg = MistralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                        tie_word_embeddings=False, dtype=args.dtype, architectures=["MistralForCausalLM"])
    with torch.device("meta"):  # the real tensor names and shapes, no memory
        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    dtype = torch_dtype(args.dtype)
    gen = torch.Generator().manual_seed(0)
    dirs = {k: work / k for k in ("base", "post", "cp")}
    if all((d / "config.json").exists() for d in dirs.values()):
        print(f"reusing checkpoints in {work}", file=sys.stderr)
    else:
        plan = [(n, s, dtype) for n, s in shapes.items()]
        writers = {}
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            cfg.save_pretrained(d)
            writers[d.name] = ShardedWriter(d, plan, args.shard_size)
        t0 = time.time()
        for name, shape, _ in plan:
            base = torch.randn(shape, generator=gen).mul_(0.02)
            writers["base"].write(name, base.to(dtype))
            for k in ("post", "cp"):
                writers[k].write(name, (base + torch.randn(shape, generator=gen).mul_(0.002)).to(dtype))
            del base
        for w in writers.values():
            w.close()
        print(f"built 3 checkpoints in {time.time() - t0:.0f} s", file=sys.stderr)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    return {"dirs": dirs, "params": n_params, "bytes": n_params * torch.empty((), dtype=dtype).element_size(),
            "largest_tensor_bytes": max(torch.Size(s).numel() for s in shapes.values()) * 2}


# -- the naive implementation (runs in a child process: `--naive extract|apply ...`) ----------

def _load_all(path: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def naive(op: str, paths: list[str], scale: float, device: str) -> None:
    """What one writes without thinking about memory: load whole state dicts, loop, save."""
    from safetensors.torch import save_file

    if op == "extract":
        base, post, out = map(Path, paths)
        a, b = _load_all(base), _load_all(post)
        result = {n: (b[n].to(device, torch.float32) - a[n].to(device, torch.float32)).to(b[n].dtype).cpu()
                  for n in b}
    else:
        target, vector, out = map(Path, paths)
        t, v = _load_all(target), _load_all(vector)
        result = {n: (t[n].to(device, torch.float32) + scale * v[n].to(device, torch.float32)).to(t[n].dtype).cpu()
                  for n in t}
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
    if op == "apply":
        shutil.copy(target / "config.json", out / "config.json")


# -- timing ---------------------------------------------------------------------------------

# A child's peak RSS from wait4 starts at its parent's RSS: fork/vfork + exec records the
# parent's high-water mark. So each command is started by this tiny launcher (plain python,
# nothing imported), which reports the rusage of its own child.
LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "rc": os.waitstatus_to_exitcode(status)}))
"""


def measure(cmd: list[str], label: str) -> dict:
    """Wall time and peak RSS (of this one command, from the kernel's rusage)."""
    print(f"running {label}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *map(str, cmd)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"rc": out.returncode}
    if result["rc"] != 0:
        raise SystemExit(f"{label} failed ({result['rc']}):\n{out.stderr[-3000:]}")
    del result["rc"]
    return result


def compare(a: Path, b: Path, sample: int) -> float:
    """Max |a − b| over `sample` tensors spread across the model (float32)."""
    from distill.io.checkpoints import Checkpoint

    ca, cb = Checkpoint.open(a, require_config=False), Checkpoint.open(b, require_config=False)
    names = sorted(ca.tensors)
    if set(names) != set(cb.tensors):
        raise SystemExit(f"{a} and {b} hold different tensor names")
    step = max(1, len(names) // sample)
    return max((ca.get(n).float() - cb.get(n).float()).abs().max().item() for n in names[::step])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-size", default="1GB", help="input and output shard size (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0, help="λ (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="device for the arithmetic (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/chat_vector_bench"),
                   help="where checkpoints and outputs go (needs ~6x the model size; default: %(default)s)")
    p.add_argument("--mergekit", default="/tmp/benchvenv/bin/mergekit-yaml", help="mergekit-yaml executable")
    p.add_argument("--skip", default="", help="comma list of tools to leave out: naive,mergekit")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every tool N times, round-robin; report the best wall time (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints for the next run")
    p.add_argument("--naive", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # child-process entry
    args = p.parse_args()
    from distill.io.checkpoints import parse_size
    from distill.io.models import torch_dtype

    if args.naive:
        return naive(args.naive[0], args.naive[1:], args.scale, args.device)

    load_before = f"{os.getloadavg()[0]:.1f}"
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    info = build(args, work)
    d = info["dirs"]
    skip = set(filter(None, args.skip.split(",")))
    outs = {k: work / "out" / k for k in ("d_vec", "d_merged", "n_vec", "n_merged", "mk_merged")}
    shutil.rmtree(work / "out", ignore_errors=True)
    (work / "out").mkdir()
    py, dev = sys.executable, ["--device", args.device]
    # Each tool's start-up RSS (imports only), so the tables can show what the work itself adds.
    # distill's own chat-vector CLI without the top-level dispatcher, which imports every stage
    # (the GPU image lacks some of their dependencies, e.g. deepspeed)
    cli = [py, "-c", "import argparse, sys; from distill.chat_vector import cli as cv; p = argparse.ArgumentParser(); "
                     "cv.add_cli(p.add_subparsers()); a = p.parse_args(); sys.exit(a.func(a))", "chat-vector"]
    floors = {"distill": measure([*cli, "extract", "--help"], "distill start-up"),
              "naive": measure([py, "-c", "import torch, safetensors.torch"], "python + torch start-up")}
    runs = {  # label -> (command, output it writes)
        "distill extract": ([*cli, "extract", "--base", d["base"], "--post",
                             d["post"], "--out", outs["d_vec"], "--no-progress", "--max-shard-size", args.shard_size,
                             *dev], outs["d_vec"]),
        "distill apply": ([*cli, "apply", "--target", d["cp"], "--vector",
                           outs["d_vec"], "--scale", args.scale, "--out", outs["d_merged"], "--no-progress",
                           "--max-shard-size", args.shard_size, *dev], outs["d_merged"]),
    }
    if "naive" not in skip:
        me = [py, __file__, "--scale", args.scale, "--device", args.device, "--naive"]
        runs["naive extract"] = (me + ["extract", d["base"], d["post"], outs["n_vec"]], outs["n_vec"])
        runs["naive apply"] = (me + ["apply", d["cp"], outs["n_vec"], outs["n_merged"]], outs["n_merged"])
    notes = []
    if "mergekit" not in skip:
        if shutil.which(args.mergekit) or Path(args.mergekit).exists():
            cfg = work / "mergekit.yml"
            cfg.write_text(
                f"merge_method: task_arithmetic\nbase_model: {d['base']}\ndtype: {args.dtype}\n"
                f"parameters:\n  normalize: false\nmodels:\n"
                f"  - model: {d['cp']}\n    parameters:\n      weight: 1.0\n"
                f"  - model: {d['post']}\n    parameters:\n      weight: {args.scale}\n")
            mk = [args.mergekit, cfg, outs["mk_merged"], "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                  "--lazy-unpickle", "--out-shard-size",
                  str(parse_size(args.shard_size) // torch.empty((), dtype=torch_dtype(args.dtype)).element_size())]
            mk += ["--cuda"] if args.device.startswith("cuda") else []
            floors["mergekit"] = measure([args.mergekit, "--help"], "mergekit start-up")
            runs["mergekit task_arithmetic"] = (mk, outs["mk_merged"])
        else:
            notes.append(f"mergekit not run: {args.mergekit} not found "
                         f"(python -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install mergekit)")

    # Round-robin repeats: on a shared machine, load comes and goes; every tool sees it alike,
    # and the best of N is the least disturbed run.
    trials: dict[str, list[dict]] = {label: [] for label in runs}
    for r in range(args.repeat):
        for label, (cmd, out) in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            trials[label].append(measure(cmd, f"{label} (run {r + 1}/{args.repeat})"))
    results = {label: {"wall_s": min(t["wall_s"] for t in ts), "peak_rss_mb": max(t["peak_rss_mb"] for t in ts),
                       "all_wall_s": [t["wall_s"] for t in ts]} for label, ts in trials.items()}

    # all three must compute the same model (up to bf16 rounding of Δ and of the order of sums)
    diffs = {}
    if "naive" not in skip:
        diffs["distill vs naive (merged)"] = compare(outs["d_merged"], outs["n_merged"], 12)
    if "mergekit task_arithmetic" in results:
        diffs["distill vs mergekit (merged)"] = compare(outs["d_merged"], outs["mk_merged"], 12)

    gb = info["bytes"] / 1e9
    merged = {"distill extract + apply": ("distill extract", "distill apply")}
    if "naive extract" in results:
        merged["naive extract + apply"] = ("naive extract", "naive apply")
    for label, parts in merged.items():
        results[label] = {"wall_s": sum(results[p]["wall_s"] for p in parts),
                          "peak_rss_mb": max(results[p]["peak_rss_mb"] for p in parts)}
    rows = []
    for label, r in results.items():
        floor = floors[label.split()[0]]["peak_rss_mb"]
        rows.append((label, r["wall_s"], r["peak_rss_mb"], r["peak_rss_mb"] - floor))

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
               f"torch {torch.__version__}, device {args.device}")
    print(f"\nModel: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, "
          f"{args.dtype}: {info['params'] / 1e9:.2f} B params, {gb:.2f} GB per checkpoint, largest tensor "
          f"{info['largest_tensor_bytes'] / 2**20:.0f} MiB; shards of {args.shard_size}; λ = {args.scale}.")
    print(f"Machine: {machine}. Start-up RSS: "
          + ", ".join(f"{k} {v['peak_rss_mb']:.0f} MB" for k, v in floors.items()) + ".\n")
    print(f"Load average before: {load_before}, after: {os.getloadavg()[0]:.1f} (1 min). "
          f"Wall time: best of {args.repeat}; peak RSS: the highest.\n")
    print("| run | wall (s) | peak RSS (MB) | peak RSS above start-up (MB) |")
    print("|---|---:|---:|---:|")
    for label, wall, rss, above in rows:
        print(f"| {label} | {wall:.1f} | {rss:.0f} | {above:.0f} |")
    for k, v in diffs.items():
        print(f"\nmax |Δ| {k}: {v:.3g}")
    for n in notes:
        print(f"\nnote: {n}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "model": {k: v for k, v in vars(args).items()
                                                                        if k not in ("naive", "json", "workdir")},
                                         "params": info["params"], "bytes_per_checkpoint": info["bytes"],
                                         "startup": floors, "results": results, "max_abs_diff": diffs,
                                         "notes": notes}, indent=2, default=str))
    shutil.rmtree(work / "out", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
