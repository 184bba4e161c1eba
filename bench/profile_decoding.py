"""Where a contrastive decode step spends its time on the GPU (torch.profiler, top kernels).

    python bench/profile_decoding.py --batch 128        # Mistral-7B config x2, bf16

Times, per step: the two-model graph replay with the token choice captured inside it (as the
engine runs it), the same graph without the token choice (their difference is the token
choice's real cost), the step without graphs, and `next_token` alone run eagerly (mostly kernel
launches: not what the engine pays); then prints the profiler's top CUDA kernels.
"""

from __future__ import annotations

import argparse
import time

import torch

from decoding_models import build_model  # bench/, beside this script
from distill.decoding.engine import DecodingConfig
from distill.decoding.step import next_token
from distill.decoding.fast import FastPair


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, steps):
    fn()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=384)
    ap.add_argument("--config", default="mistral-7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs (--config tiny)")
    ap.add_argument("--flex", action="store_true",
                    help="also time the graph step with FlexAttention decode (DecodingConfig.decode_attention='flex')")
    ap.add_argument("--compile-layers", action="store_true",
                    help="also time the graph step with the per-layer work torch.compile'd (DecodingConfig.compile_layers)")
    args = ap.parse_args()
    dev = args.device
    models = [build_model(args.config, dev, torch.bfloat16 if dev == "cuda" else torch.float32, s) for s in (0, 1)]
    vocab = models[0].config.vocab_size
    prompts = torch.randint(3, vocab, (args.batch, 128)).tolist()
    cfg = DecodingConfig()
    seeds = torch.arange(args.batch, device=dev)
    steps = torch.zeros(args.batch, dtype=torch.long, device=dev)
    chosen = torch.zeros(args.batch, dtype=torch.long, device=dev)

    def choose(logits):  # the token choice, as the engine captures it after the step
        chosen.copy_(next_token(logits[0], logits[1], cfg, seeds, steps, vocab)[0])

    variants = [(True, choose, False, "sdpa"), (True, None, False, "sdpa")]
    variants += [(True, choose, True, "sdpa")] if args.compile_layers else []
    variants += [(True, choose, False, "flex")] if args.flex else []
    for graphs, post, compiled, attention in variants + [(False, None, False, "sdpa")]:
        pair = FastPair(models, args.batch, args.capacity, cuda_graphs=graphs, compile_layers=compiled,
                        decode_attention=attention)
        tok = torch.randint(3, vocab, (args.batch,), device=dev)
        active = torch.zeros(args.batch, dtype=torch.bool, device=dev)  # inactive: lengths stay put
        pair.prepare(tok, active, post) if post else pair.prepare()
        pair.prefill(list(range(args.batch)), prompts)
        ms = timed(lambda: pair.decode(tok, active), args.steps)
        what = ("with the token choice inside the graph" if post else "step only") + (", compiled layers" if compiled else "") \
            + (", flex attention" if attention == "flex" else "")
        print(f"two-model decode step, graphs={graphs}, {what}: {ms:.2f} ms", flush=True)
        pair.lengths.fill_(128)
        if post:
            del pair
            if dev == "cuda":
                torch.cuda.empty_cache()
    logits = [torch.randn(args.batch, vocab, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    ms = timed(lambda: next_token(logits[0], logits[1], cfg, seeds, steps, vocab), args.steps)
    print(f"next_token alone, eager (launch-bound; not what the engine pays): {ms:.2f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile

    pair.lengths.fill_(128)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            pair.decode(tok, active)
            next_token(logits[0], logits[1], cfg, seeds, steps, vocab)
        sync()
    sort = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    events = prof.key_averages()
    if dev == "cuda":
        from torch.autograd import DeviceType

        kernels = sum(e.count for e in events if e.device_type == DeviceType.CUDA) / 5
        print(f"kernels per step (eager step + token choice): {kernels:.0f}", flush=True)
    print(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
