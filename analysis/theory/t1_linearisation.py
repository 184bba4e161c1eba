"""T1, linearisation: is the CoDIT score the output-space image of the chat vector? (command line
and figure over `distill.theory.linearise`, which measures; what it measures and its memory below)

    python analysis/theory/t1_linearisation.py --base BASE --post POST --prompts PROMPTS.jsonl --out DIR
    python analysis/theory/t1_linearisation.py --zoo ZOO --out analysis/results/theory [--limit N]

Writes t1_linearisation.{md,csv,json} (distill.theory.linearise.run_t1) and t1_linearisation.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from distill.theory import linearise
from distill.theory.linearise import quantile

from distill.theory.commandline import add_model_args, pyplot, resolve_models, save_figure


def run_t1(base, post, prompts, out, *, figure: bool = True, **kwargs) -> dict:
    """`distill.theory.linearise.run_t1(base, post, prompts, out, **kwargs)` (limit, max_new_tokens,
    alpha, batch_size, chunk_tokens, lambdas, device, dtype, chat_template, chat_template_kwargs),
    plus t1_linearisation.png in `out` when `figure`. Returns {"table", "sequences", "md", "metrics"}."""
    res = linearise.run_t1(base, post, prompts, out, **kwargs)
    if figure and res["sequences"]:
        _figure(res["metrics"], Path(out) / "t1_linearisation.png")
    return res


def _figure(acc: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].hist(acc["cos"], bins=40, range=(-1, 1), alpha=0.7, label="cosine")
    axes[0].hist(acc["spearman"], bins=40, range=(-1, 1), alpha=0.7, label="Spearman")
    axes[0].set_title("d vs J·Δ per position")
    axes[0].legend()
    hi = max(quantile(acc["kl_codit_direct"], 0.95) or 1.0, quantile(acc["kl_codit_lin"], 0.95) or 1.0)
    for k in ("kl_codit_lin", "kl_codit_direct", "kl_codit_uniform"):
        axes[1].hist(acc[k], bins=40, range=(0, hi), alpha=0.5, label=k.replace("kl_codit_", "KL(CoDIT‖") + ")")
    axes[1].set_title("KL on the plausible set")
    axes[1].legend(fontsize=8)
    axes[2].hist(acc["rel_err"], bins=40, alpha=0.7)
    axes[2].set_title("first-order relative error ‖d − PJΔ‖/‖d‖")
    save_figure(fig, path)


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="t1_linearisation.py", description=__doc__ + "\n" + linearise.__doc__, usage=(
        "%(prog)s (--zoo ZOO | --base BASE --post POST --prompts PROMPTS.jsonl) [--out DIR] [options]"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, ("base", "post"), prompts="eval_prompts",
                   prompts_help="prompts JSONL with `instruction` or chat `messages` "
                                "(default <zoo>/prompts/eval.jsonl)")
    p.add_argument("--out", type=Path, default=Path("analysis/results/theory"), help="output directory")
    p.add_argument("--limit", type=int, default=32, help="use the first N prompts (default 32; 0: all)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the post model's responses")
    p.add_argument("--alpha", type=float, default=0.01, help="plausibility threshold (default 0.01)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences (rows) per forward-mode pass")
    p.add_argument("--chunk-tokens", type=int, default=256,
                   help="response positions per head/metric chunk: bounds the V-sized memory (0: unchunked)")
    p.add_argument("--lambdas", default="0.1,0.25,0.5",
                   help="points λ of θ_base + λΔ to test the linear picture at ('' to skip; each adds one pass)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--chat-template", help="a Jinja file (or text) to render prompts with instead of the post's own")
    p.add_argument("--chat-template-kwargs", help="JSON object of template kwargs, e.g. '{\"enable_thinking\": false}'")
    a = p.parse_args(argv)
    if a.prompts is not None and a.prompts.isdigit() and not Path(a.prompts).exists():
        a.limit, a.prompts = int(a.prompts), None  # the old spelling: --prompts N was the number of prompts
    resolve_models(p, a, ("base", "post"), prompts="eval_prompts")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = run_t1(a.base, a.post, a.prompts, a.out, limit=a.limit or None, max_new_tokens=a.max_new_tokens,
                 alpha=a.alpha, batch_size=a.batch_size, chunk_tokens=a.chunk_tokens, lambdas=_floats(a.lambdas),
                 device=a.device, dtype=a.dtype, chat_template=a.chat_template,
                 chat_template_kwargs=a.chat_template_kwargs)
    print(Path(res["md"]).read_text())
    return 0 if res["sequences"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
