"""Host-side cost per optimizer step of the Trainer and of DeepSpeed, on a model too small to compute.

    python bench/trainer_overhead.py --layers 8          # none, zero2, zero2 with HF's "auto" bucket
    python bench/trainer_overhead.py --configs none,zero2 --layers 2
    python bench/trainer_overhead.py --configs zero2,zero2-nocheck --precision bf16

A Qwen2 target with hidden size 32 does almost no arithmetic, so what a step costs is Python,
dispatch and framework bookkeeping: the bare loop (forward, backward, AdamW), `distill train`
without DeepSpeed (the Trainer), and with ZeRO-2 (DeepSpeed's gradient hooks and bucket
reductions, once per parameter or bucket). On a GPU that host work overlaps the kernels unless
something syncs; `bench/train_bench.py --profile` shows whether it does there. One thread, one
process, fp32 unless --precision bf16 (DeepSpeed's bf16 path: its overflow check, which the
`-nocheck` variant turns off, runs only there); steps 20-60 of 60 are timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="none,zero2,zero2-autobucket",
                   help="comma list of none, zero2 (shipped: a 5e8-element reduce bucket), zero2 with suffixes "
                        "as in train_bench.py (-autobucket: HF's \"auto\" bucket, hidden_size² elements; "
                        "-nooverlap; -nocheck), zero3, or a DeepSpeed JSON path (default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (12 parameter tensors each)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from distill.io.models import torch_dtype
    from distill.train.run import TrainConfig, train
    from distill.world.stand_ins import make_model, make_tokenizer
    from train_workers import ZERO2_LEVERS, _zero2_variant  # bench/, beside this script

    torch.set_num_threads(1)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.at = {}

        def on_step_end(self, args, state, control, **kw):
            self.at[state.global_step] = time.perf_counter()

    work = Path(tempfile.mkdtemp(prefix="trainer_overhead-"))
    tok = make_tokenizer(chat_template=None)
    make_model(work / "target", arch="qwen2", vocab_size=len(tok), tokenizer=tok, hidden=32, layers=args.layers)
    rows = [{"instruction": f"say {i}", "response": "ok " * 8} for i in range(2000)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_params = len(list(AutoModelForCausalLM.from_pretrained(work / "target").parameters()))
    print(f"Qwen2, hidden 32, {args.layers} layers, {n_params} parameter tensors; ms per step (steps 20-60)\n")
    print("| setup | ms per step |\n|---|---:|")
    for name in args.configs.split(","):
        ds = name
        if name.startswith("zero2-"):
            levers = name.split("-")[1:]
            if set(levers) - ZERO2_LEVERS:
                raise SystemExit(f"unknown configuration {name}: zero2 takes -{', -'.join(sorted(ZERO2_LEVERS))}")
            ds = _zero2_variant(work, levers)
        times = StepTimes()
        out = work / f"out-{name.replace('/', '_')}"
        train(TrainConfig(model=str(work / "target"), data=str(work / "data.jsonl"), out=str(out), deepspeed=ds,
                          max_steps=60, batch_size=2, max_length=64, eval_fraction=0.0, save_steps=10_000,
                          logging_steps=1_000, precision=args.precision), callbacks=[times])
        print(f"| distill train, deepspeed {name} | {(times.at[60] - times.at[20]) / 40 * 1e3:.1f} |", flush=True)
    model = AutoModelForCausalLM.from_pretrained(work / "target", dtype=torch_dtype(args.precision))
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 100, (2, 40))
    for i in range(60):
        if i == 20:
            t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"| bare loop (forward, backward, AdamW) | {(time.perf_counter() - t0) / 40 * 1e3:.1f} |")


if __name__ == "__main__":
    main()
