"""Where a contrastive decode step spends its time on the GPU (torch.profiler, top kernels).

    python bench/profile_decoding.py --batch 128        # Mistral-7B config x2, bf16

Times, per step: the two-model graph replay, the same step without graphs, and the sampling
(`next_token`) that runs outside the graph; then prints the profiler's top CUDA kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decoding_bench import build_model  # noqa: E402
from distill.decoding import DecodingConfig, next_token  # noqa: E402
from distill.fast_decoder import FastPair  # noqa: E402


def timed(fn, steps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=384)
    ap.add_argument("--config", default="mistral-7b")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    models = [build_model(args.config, "cuda", torch.bfloat16, s) for s in (0, 1)]
    vocab = models[0].config.vocab_size
    prompts = torch.randint(3, vocab, (args.batch, 128)).tolist()
    for graphs in (True, False):
        pair = FastPair(models, args.batch, args.capacity, cuda_graphs=graphs)
        pair.prepare()
        pair.prefill(list(range(args.batch)), prompts)
        tok = torch.randint(3, vocab, (args.batch,), device="cuda")
        active = torch.ones(args.batch, dtype=torch.bool, device="cuda")
        ms = timed(lambda: pair.decode(tok, active), args.steps)
        print(f"two-model decode step, graphs={graphs}: {ms:.2f} ms", flush=True)
        pair.lengths.fill_(128)
    logits = [torch.randn(args.batch, vocab, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    cfg = DecodingConfig()
    seeds = torch.arange(args.batch, device="cuda")
    steps = torch.zeros(args.batch, dtype=torch.long, device="cuda")
    ms = timed(lambda: next_token(logits[0], logits[1], cfg, seeds, steps, vocab), args.steps)
    print(f"next_token (contrast + sample, outside the graph): {ms:.2f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile

    pair.lengths.fill_(128)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            pair.decode(tok, active)
            next_token(logits[0], logits[1], cfg, seeds, steps, vocab)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
