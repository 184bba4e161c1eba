"""The chunked linear + cross-entropy of `distill train --fused-loss` against the plain way.

    python bench/fused_ce_bench.py                      # CPU, 1 thread, a small shape
    python bench/fused_ce_bench.py --device cuda --tokens 8192 --hidden 1536 --vocab 151936 --dtype bfloat16

One forward + backward of the loss over `--tokens` rows of hidden states, with a share of rows
ignored (label -100, as prompt tokens are under assistant-only loss). Plain: `F.cross_entropy`
on the full [tokens x vocab] logits, in float32 as HF computes it. The chunked loss runs twice:
each chunk's softmax and gradient eagerly (in place, the CPU default) and torch.compile'd (the
CUDA default; its compile is a warm-up call, not timed). Reports the best of --repeat and, on
CUDA, the peak memory above the inputs; checks that loss and gradients agree.

The maintained peer beside it, in the same run: Liger-Kernel's fused linear + cross-entropy
(`LigerFusedLinearCrossEntropyLoss`, the loss `use_liger_kernel` puts into the Trainer), on CUDA only
(its kernels are Triton); `pip install -e .[bench]` brings it. Ours is kept only where it wins.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from distill.io.models import torch_dtype
from distill.train.fused import IGNORE_INDEX, linear_cross_entropy


def plain(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=IGNORE_INDEX)


def fused(h, w, y, chunk, compiled):
    return linear_cross_entropy(h, w, y, chunk_size=chunk, compiled=compiled)


def liger():
    """Liger-Kernel's fused linear + cross-entropy as fn(h, w, y), or None with the reason."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        return None, f"not installed ({exc}; pip install -e .[bench])"
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return (lambda h, w, y: loss(w, h, y)), None


def measure(fn, h, w, y, repeat, device):
    best, peak = float("inf"), float("nan")
    for _ in range(repeat):
        h.grad = w.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = fn(h, w, y)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        best = min(best, time.perf_counter() - start)
    return best, peak, loss.detach(), h.grad.clone(), w.grad.clone()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=2048, help="rows per chunk (distill train uses 2048)")
    ap.add_argument("--ignored", default="0,0.4", help="shares of rows with label -100")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype)
    print(f"# {args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, {args.device}\n")
    peer, why_not = liger() if args.device == "cuda" else (None, "CUDA only (Triton kernels)")
    if peer is None:
        print(f"Liger-Kernel line: not measured, {why_not}\n")
    print("| ignored rows | plain ms | fused ms | fused, compiled chunk ms | speed-up (compiled) "
          "| plain peak GiB | fused peak GiB | fused, compiled peak GiB | max rel. grad diff "
          "| Liger ms | Liger peak GiB | ours (compiled) / Liger time |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for share in (float(x) for x in args.ignored.split(",")):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(args.tokens, args.hidden, generator=g).to(args.device, dtype).requires_grad_()
        w = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).to(args.device, dtype).requires_grad_()
        y = torch.randint(0, args.vocab, (args.tokens,), generator=g)
        y[torch.rand(args.tokens, generator=g) < share] = IGNORE_INDEX
        y = y.to(args.device)
        tp, mp, lp, ghp, gwp = measure(plain, h, w, y, args.repeat, args.device)
        tf, mf, lf, ghf, gwf = measure(lambda *a: fused(*a, args.chunk, False), h, w, y, args.repeat, args.device)
        measure(lambda *a: fused(*a, args.chunk, True), h, w, y, 1, args.device)  # the compile
        tc, mc, lc, ghc, gwc = measure(lambda *a: fused(*a, args.chunk, True), h, w, y, args.repeat, args.device)
        runs = [(lf, ghf, gwf), (lc, ghc, gwc)]
        tl = ml = float("nan")
        if peer is not None:
            measure(peer, h, w, y, 1, args.device)  # Triton's autotune and compile
            tl, ml, ll, ghl, gwl = measure(peer, h, w, y, args.repeat, args.device)
            runs.append((ll, ghl, gwl))
        diff = 0.0
        for loss, gh, gw in runs:
            torch.testing.assert_close(loss.float(), lp.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
            diff = max(diff, *(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                               for a, b in ((gh, ghp), (gw, gwp))))
        print(f"| {share:.0%} | {tp * 1e3:.0f} | {tf * 1e3:.0f} | {tc * 1e3:.0f} | {tp / tc:.2f}x | {mp:.2f} | {mf:.2f} "
              f"| {mc:.2f} | {diff:.1e} | {tl * 1e3:.0f} | {ml:.2f} | {tc / tl:.2f} |", flush=True)


if __name__ == "__main__":
    main()
