"""T3, cross-architecture and text-level: does the tuned target learn the source's log-ratio?

On one fixed set of (instruction, response) pairs, compare per response the source's
sequence log-ratio  s_src(y) = log p_post(y|x) − log p_base(y|x)  (source tokenizer and
template) with the target's  s_tgt(y) = log p_tuned(y|x) − log p_target_base(y|x)  (target
tokenizer; each model with its own prompt format). Tokenizers differ, texts do not. The
claim predicts a higher correlation for CoDIT-tuned targets than for direct-tuned ones.
Each score is also divided by the response's word count (per-word log-ratio), so long
responses do not drive the correlation by length alone.

    python analysis/theory_t3.py --zoo ZOO --run-dir runs/tiny --out analysis/results/theory
(--run-dir supplies data/{codit,direct} and models/{codit,direct}-seedN.)
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

from theory_common import dataset_rows, mean, pearson, pyplot, save_figure, spearman, std, write_table

log = logging.getLogger("theory.t3")


def logprobs(model_dir, pairs: list[tuple[str, str]], batch_size: int, device: str) -> list[float]:
    """log p(y|x) per pair under one model, with its own tokenizer and prompt format."""
    from distill.evaluate_generate import response_logprobs
    from distill.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(model_dir, device=device)
    tok = load_tokenizer(model_dir)
    return [s for s, _ in response_logprobs(model, tok, [x for x, _ in pairs], [y for _, y in pairs], batch_size)]


def fixed_pairs(run_dir: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Half CoDIT responses, half direct ones (non-repetitive), shuffled with a fixed seed."""
    pairs = []
    for method in ("codit", "direct"):
        rows = [r for r in dataset_rows(run_dir / "data" / method) if not r.get("repetitive") and r["response"].strip()]
        pairs += [(r["instruction"], r["response"]) for r in rows[: n // 2]]
    random.Random(seed).shuffle(pairs)
    return pairs


def run(zoo: Path, run_dir: Path, out_dir: Path, n: int = 128, batch_size: int = 16, device: str = "cpu") -> dict:
    t0 = time.time()
    pairs = fixed_pairs(run_dir, n)
    words = [max(len(y.split()), 1) for _, y in pairs]
    lp = lambda d: logprobs(d, pairs, batch_size, device)  # noqa: E731
    s_src = [a - b for a, b in zip(lp(zoo / "source-post"), lp(zoo / "source-base"))]
    lp_tbase = lp(zoo / "target-base")
    per_word = lambda xs: [x / w for x, w in zip(xs, words)]  # noqa: E731
    # Control: the target base's own surprise at each text, no tuning involved. A tuned target
    # that beats it carries information about the source's log-ratio beyond "text is easy/hard".
    control = [-x for x in lp_tbase]
    rows = [{"tuned target": "control: −log p_target_base(y)", "method": "control", "pairs": len(pairs),
             "pearson": pearson(s_src, control), "spearman": spearman(s_src, control),
             "pearson per word": pearson(per_word(s_src), per_word(control))}]
    scatter = {}
    for method in ("codit", "direct"):
        for model_dir in sorted((run_dir / "models").glob(f"{method}-seed*")):
            if not (model_dir / "config.json").exists():
                continue
            s_tgt = [a - b for a, b in zip(lp(model_dir), lp_tbase)]
            rows.append({"tuned target": model_dir.name, "method": method, "pairs": len(pairs),
                         "pearson": pearson(s_src, s_tgt), "spearman": spearman(s_src, s_tgt),
                         "pearson per word": pearson(per_word(s_src), per_word(s_tgt))})
            scatter.setdefault(method, (s_src, s_tgt))
    summary = []
    for method in ("codit", "direct"):
        sel = [r for r in rows if r["method"] == method]
        if sel:
            summary.append({"tuned target": f"{method}: mean over {len(sel)} seeds", "method": method,
                            "pairs": len(pairs), "pearson": mean(r["pearson"] for r in sel),
                            "spearman": mean(r["spearman"] for r in sel),
                            "pearson per word": mean(r["pearson per word"] for r in sel),
                            "spearman std": std([r["spearman"] for r in sel])})
    cols = ["tuned target", "method", "pairs", "pearson", "spearman", "pearson per word", "spearman std"]
    notes = ["Note: the tuned targets use the ChatML template that SFT gave them; target-base has none and sees the "
             "bare instruction, so each s_tgt also contains a prompt-format term.",
             f"{len(pairs)} fixed responses (half CoDIT, half direct, from {run_dir}/data); {time.time() - t0:.0f} s.",
             "s_src = log p_post − log p_base (source); s_tgt = log p_tuned − log p_target_base (target)."]
    write_table(out_dir, "t3_text_correlation", "T3: source log-ratio vs tuned-target log-ratio on the same texts",
                cols, rows + summary, notes, extra={"s_src": s_src})
    plt = pyplot()
    fig, axes = plt.subplots(1, max(len(scatter), 1), figsize=(6 * max(len(scatter), 1), 4.5), squeeze=False)
    for ax, (method, (a, b)) in zip(axes[0], scatter.items()):
        ax.scatter(a, b, s=8, alpha=0.6)
        ax.set_xlabel("source: log p_post(y) − log p_base(y)")
        ax.set_ylabel("target: log p_tuned(y) − log p_base(y)")
        ax.set_title(f"{method}-tuned target (first seed), Spearman {spearman(a, b) or float('nan'):.2f}")
    save_figure(fig, out_dir / "t3_text_correlation.png")
    return {"rows": rows, "summary": summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True, type=Path, help="world directory (source-base/-post, target-base)")
    p.add_argument("--run-dir", required=True, type=Path, help="recipe run directory (data/*, models/*-seedN)")
    p.add_argument("--out", type=Path, default=Path("analysis/results/theory"), help="output directory")
    p.add_argument("--pairs", type=int, default=128, help="number of fixed responses (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run(a.zoo, a.run_dir, a.out, a.pairs, a.batch_size, a.device)
    print((a.out / "t3_text_correlation.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
