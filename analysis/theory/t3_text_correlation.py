"""T3, cross-architecture and text-level: does the tuned target learn the source's log-ratio?
(command line and figure over `distill.theory.text_ratio`, which measures; what it measures below)

    python analysis/theory/t3_text_correlation.py --base B --post P --target T \
        --texts codit=DATA1 --texts direct=DATA2 --tuned codit=M1,M2 --tuned direct=M3,M4 --out DIR
    python analysis/theory/t3_text_correlation.py --zoo ZOO --run-dir runs/tiny --out analysis/results/theory
(--zoo fills --base/--post/--target; --run-dir fills --texts from data/{codit,direct} and
--tuned from models/{codit,direct}-seedN. --prompts FILE instead of --texts: a JSONL whose rows
have `instruction` or `messages` and a `response`.)
Writes t3_text_correlation.{md,csv,json} (distill.theory.text_ratio.run_t3) and t3_text_correlation.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from distill.theory import text_ratio
from distill.theory.stats import spearman
from distill.theory.text_ratio import fixed_pairs, run_dir_inputs  # noqa: F401  (fixed_pairs: for importers)

from distill.theory.commandline import add_model_args, pyplot, resolve_models, save_figure


def run_t3(base, post, target, texts, tuned: dict[str, list], out, *, figure: bool = True, **kwargs) -> dict:
    """`distill.theory.text_ratio.run_t3(base, post, target, texts, tuned, out, **kwargs)` (n,
    batch_size, device, dtype, seed, chat_template, chat_template_kwargs), plus
    t3_text_correlation.png in `out` when `figure`. Returns {"rows", "summary", "md", "scatter"}."""
    res = text_ratio.run_t3(base, post, target, texts, tuned, out, **kwargs)
    if figure:
        _figure(res["scatter"], Path(out) / "t3_text_correlation.png")
    return res


def _figure(scatter: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, max(len(scatter), 1), figsize=(6 * max(len(scatter), 1), 4.5), squeeze=False)
    for ax, (method, (a, b)) in zip(axes[0], scatter.items()):
        ax.scatter(a, b, s=8, alpha=0.6)
        ax.set_xlabel("source: log p_post(y) − log p_base(y)")
        ax.set_ylabel("target: log p_tuned(y) − log p_base(y)")
        ax.set_title(f"{method}-tuned target (first seed), Spearman {spearman(a, b) or float('nan'):.2f}")
    save_figure(fig, path)


def _named_lists(specs: list[str], flag: str, p) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not name or not paths:
            p.error(f"{flag} {spec!r}: expected NAME=PATH[,PATH...]")
        out.setdefault(name, []).extend(x for x in paths.split(",") if x)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="t3_text_correlation.py", description=__doc__ + "\n" + text_ratio.__doc__, usage=(
        "%(prog)s (--zoo ZOO | --base BASE --post POST --target TARGET)\n"
        "       (--run-dir RUN | --texts NAME=DATA ... | --prompts PAIRS.jsonl) [--tuned METHOD=MODEL,...]\n"
        "       [--out DIR] [options]"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, ("base", "post", "target"))
    p.add_argument("--run-dir", type=Path, help="recipe run directory: fills --texts (data/{codit,direct}) and "
                                                "--tuned (models/{codit,direct}-seedN)")
    p.add_argument("--texts", action="append", default=[], metavar="NAME=DATA",
                   help="a synthesized dataset (directory or .jsonl) to draw fixed responses from (repeatable)")
    p.add_argument("--prompts", help="instead of --texts: a JSONL of pairs (`instruction` or `messages`, "
                                     "and `response`)")
    p.add_argument("--tuned", action="append", default=[], metavar="METHOD=MODEL[,MODEL...]",
                   help="tuned target models of one method, one per seed (repeatable)")
    p.add_argument("--out", type=Path, default=Path("analysis/results/theory"), help="output directory")
    p.add_argument("--pairs", type=int, default=128, help="number of fixed responses (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    a = p.parse_args(argv)
    resolve_models(p, a, ("base", "post", "target"))
    texts, tuned = run_dir_inputs(a.run_dir) if a.run_dir else ({}, {})
    texts = {**texts, **{k: v[0] for k, v in _named_lists(a.texts, "--texts", p).items()}}
    tuned = {**tuned, **_named_lists(a.tuned, "--tuned", p)}
    if a.prompts:
        texts = a.prompts
    if not texts:
        p.error("give the texts: --run-dir RUN, --texts NAME=DATA (repeatable) or --prompts PAIRS.jsonl")
    if not tuned:
        p.error("give the tuned targets: --run-dir RUN or --tuned METHOD=MODEL[,MODEL...]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = run_t3(a.base, a.post, a.target, texts, tuned, a.out, n=a.pairs, batch_size=a.batch_size,
                 device=a.device, dtype=a.dtype)
    print(Path(res["md"]).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
