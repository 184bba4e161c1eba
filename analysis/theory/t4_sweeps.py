"""T4, sweeps: how do alpha and beta of the CoDIT data shape the tuned target?

For each (alpha, beta) point: synthesize responses to --prompts from the source post (expert)
and base (amateur), fine-tune the target base on them, evaluate instruction following (and
knowledge). beta = 0 is plain sampling from the expert inside the plausible set (alpha still
applies); beta = 1 is CoDIT.

    python analysis/theory/t4_sweeps.py --base B --post P --target T --prompts SYNTH.jsonl \
        --eval-prompts EVAL.jsonl [--questions Q.jsonl] --out DIR
    python analysis/theory/t4_sweeps.py --zoo ZOO --out analysis/results/theory \
        --betas 0,0.5,1,1.5 --alphas 0.001,0.1 --limit 256 --epochs 3
(--alphas are swept at beta = 1, --betas at alpha = 0.01. --zoo fills --base, --post, --target,
--prompts (prompts/synthesis.jsonl), --eval-prompts (prompts/eval.jsonl: IF prompts with verifiable
`constraints`) and --questions (knowledge/questions.jsonl: the world's cloze facts).)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from distill.io.files import read_jsonl
from distill.theory.tables import write_table

from distill.theory.commandline import ZOO_LAYOUT, add_model_args, pyplot, resolve_models, save_figure

log = logging.getLogger("theory.t4")


def grid(betas: list[float], alphas: list[float], alpha0: float = 0.01, beta0: float = 1.0) -> list[tuple[float, float]]:
    points = [(alpha0, b) for b in betas] + [(a, beta0) for a in alphas]
    return list(dict.fromkeys(points))  # keep order, drop duplicates


def run_t4(base, post, target, prompts, out, work, points: list[tuple[float, float]], *, eval_prompts=None,
           questions=None, limit: int | None = 256, max_new_tokens: int = 96, epochs: float = 3.0, lr: float = 1e-3,
           batch_size: int = 16, max_length: int = 256, eval_limit: int | None = None, seed: int = 0,
           device: str | None = None, dtype: str | None = None) -> dict:
    """T4 on explicit models; IF on `eval_prompts`, knowledge on `questions` (each when given)."""
    from distill.evaluate.run import evaluate
    from distill.synthesize.run import SynthesizeConfig, synthesize
    from distill.train.run import TrainConfig, train

    t0, out_dir, work = time.time(), Path(out), Path(work)
    suites = tuple(s for s, f in (("if", eval_prompts), ("knowledge", questions)) if f)
    rows = []
    for alpha, beta in points:
        tag = f"a{alpha:g}-b{beta:g}"
        data = work / "data" / tag
        synthesize(SynthesizeConfig(expert=str(post), amateur=str(base), prompts=str(prompts), out=str(data),
                                    method="codit",
                                    alpha=alpha, beta=beta, max_new_tokens=max_new_tokens, limit=limit, seed=seed,
                                    batch_size=64, progress=False))
        synth_rows = read_jsonl(data / "data" / "train.jsonl", "synthesized data")
        model = work / "models" / tag
        if not (model / "config.json").exists():
            train(TrainConfig(model=str(target), data=str(data), out=str(model), deepspeed=None,
                              epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                              eval_fraction=0.0, overwrite=True))
        s = evaluate(model, None, suites=suites, out=work / "scores" / f"{tag}.json", limit=eval_limit,
                     max_new_tokens=max_new_tokens, device=device, dtype=dtype, family="target",
                     prompts=str(eval_prompts) if eval_prompts else None,
                     questions=str(questions) if questions else None) if suites else {}
        ifs, kn = s.get("if", {}), s.get("knowledge", {})
        rows.append({"alpha": alpha, "beta": beta,
                     "repetitive rows": sum(bool(r.get("repetitive")) for r in synth_rows) / max(len(synth_rows), 1),
                     "data words/response": sum(len(r["response"].split()) for r in synth_rows) / max(len(synth_rows), 1),
                     "IF prompt strict": ifs.get("prompt_level_strict"),
                     "IF prompt loose": ifs.get("prompt_level_loose"),
                     "IF instr. strict": ifs.get("inst_level_strict"),
                     "knowledge own": kn.get("own", {}).get("accuracy"),
                     "conflicts source way": kn.get("conflict", {}).get("source_way"),
                     "response words": ifs.get("length", {}).get("mean_words")})
        log.info("t4: %s done (%d/%d)", tag, len(rows), len(points))
    cols = ["alpha", "beta", "repetitive rows", "data words/response", "IF prompt strict", "IF prompt loose",
            "IF instr. strict", "knowledge own", "conflicts source way", "response words"]
    notes = [f"Synthesis on the first {limit} prompts of `{prompts}` (expert `{post}`, amateur `{base}`; target "
             f"`{target}`), ≤ {max_new_tokens} new tokens, "
             f"temperature 1, seed {seed}; target-base fine-tuned {epochs} epochs at lr {lr}; one seed per point, so "
             f"differences below the seed spread of compare_transfer's table are not differences; "
             f"{time.time() - t0:.0f} s."]
    write_table(out_dir, "t4_sweeps", "T4: alpha / beta sweeps of the CoDIT data, target after SFT", cols, rows, notes)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, fixed, label in ((axes[0], "beta", ("alpha", 0.01), "beta (alpha = 0.01)"),
                                  (axes[1], "alpha", ("beta", 1.0), "alpha (beta = 1)")):
        sel = sorted((r for r in rows if r[fixed[0]] == fixed[1]), key=lambda r: r[key])
        for metric in ("IF prompt strict", "IF prompt loose", "knowledge own", "conflicts source way"):
            ax.plot([r[key] for r in sel], [r[metric] if r[metric] is not None else float("nan") for r in sel],
                    marker="o", label=metric)
        ax.set_xlabel(label)
        if key == "alpha":
            ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    save_figure(fig, out_dir / "t4_sweeps.png")
    return {"rows": rows, "md": str(out_dir / "t4_sweeps.md")}


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="t4_sweeps.py", description=__doc__, usage=(
        "%(prog)s (--zoo ZOO | --base BASE --post POST --target TARGET --prompts SYNTH.jsonl)\n"
        "       [--eval-prompts EVAL.jsonl] [--questions Q.jsonl] [--out DIR] [options]"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, ("base", "post", "target"), prompts="synthesis_prompts",
                   prompts_help="synthesis prompts JSONL, `instruction` or `messages` "
                                "(default <zoo>/prompts/synthesis.jsonl)")
    p.add_argument("--eval-prompts", help="IF evaluation prompts with `constraints` (default <zoo>/prompts/eval.jsonl)")
    p.add_argument("--questions", help="knowledge cloze questions (default <zoo>/knowledge/questions.jsonl)")
    p.add_argument("--out", type=Path, default=Path("analysis/results/theory"), help="output directory")
    p.add_argument("--work", type=Path, help="where data and models go (default <out>/work/t4)")
    p.add_argument("--betas", default="0,0.5,1,1.5", help="betas swept at alpha = 0.01")
    p.add_argument("--alphas", default="0.001,0.1", help="alphas swept at beta = 1")
    p.add_argument("--limit", type=int, default=256, help="synthesis prompts per point")
    p.add_argument("--max-new-tokens", type=int, default=96, help="response length (synthesis and evaluation)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N rows of each file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="evaluation device (default: cuda if available)")
    a = p.parse_args(argv)
    resolve_models(p, a, ("base", "post", "target"), prompts="synthesis_prompts")
    for name, key in (("eval_prompts", "eval_prompts"), ("questions", "questions")):
        if getattr(a, name) is None and a.zoo is not None:
            setattr(a, name, str(a.zoo / ZOO_LAYOUT[key]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = run_t4(a.base, a.post, a.target, a.prompts, a.out, a.work or a.out / "work" / "t4",
                 grid(_floats(a.betas), _floats(a.alphas)), eval_prompts=a.eval_prompts, questions=a.questions,
                 limit=a.limit, max_new_tokens=a.max_new_tokens, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                 max_length=a.max_length, eval_limit=a.eval_limit, seed=a.seed, device=a.device,
                 dtype=None if a.dtype == "auto" else a.dtype)
    print(Path(res["md"]).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
