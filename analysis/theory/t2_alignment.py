"""T2, parameter-space alignment: does fine-tuning on CoDIT text move the weights along Δ?

`source-base` itself is fine-tuned on CoDIT responses and, separately, on direct responses, and
on direct responses with CoDIT's mask when the run has them (the same prompts, the same steps
and settings). Per layer, the cosine between each
fine-tuning delta δ = θ_tuned − θ_base and the chat vector Δ = θ_post − θ_base, the norm
ratio ‖δ‖/‖Δ‖, and the share of the post model's instruction following each recovers:
(IF_tuned − IF_base) / (IF_post − IF_base), IF = prompt-level strict.

    python analysis/theory/t2_alignment.py --base B --post P --codit D1 --direct D2 [--prompts EVAL.jsonl] --out DIR
    python analysis/theory/t2_alignment.py --zoo ZOO --run-dir runs/tiny --out analysis/results/theory
(--zoo fills --base, --post and --prompts; --run-dir supplies data/codit, data/direct and
data/direct-masked if present. --prompts are IF evaluation prompts with verifiable
`constraints` (the world's prompts/eval.jsonl layout); without them T2 reports the alignment only.)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

from distill.theory.inputs import dataset_rows
from distill.theory.tables import write_table

from distill.theory.commandline import add_model_args, pyplot, resolve_models, save_figure

log = logging.getLogger("theory.t2")


def group_of(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name)
    if m:
        return f"layer {int(m.group(1)):02d}"
    if "embed" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    return "other (final norm)"


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                where[k] = f
    if not where:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
    return where


def delta_alignment(base_dir: Path, post_dir: Path, tuned_dir: Path) -> dict[str, dict]:
    """Per group of tensors: dot(δ, Δ), ‖δ‖², ‖Δ‖² (float64), read one tensor at a time."""
    from safetensors import safe_open

    files = {n: _tensor_files(d) for n, d in (("base", base_dir), ("post", post_dir), ("tuned", tuned_dir))}
    acc: dict[str, list[float]] = {}
    for name in files["base"]:
        if name not in files["post"] or name not in files["tuned"]:
            continue
        t = {}
        for n in ("base", "post", "tuned"):
            with safe_open(str(files[n][name]), framework="pt") as h:
                t[n] = h.get_tensor(name).double()
        rows = min(t["base"].shape[0], t["post"].shape[0], t["tuned"].shape[0]) if t["base"].dim() else None
        if rows is not None:  # an SFT that added tokens grows the embedding; compare the shared rows
            t = {n: v[:rows] for n, v in t.items()}
        if not (t["base"].shape == t["post"].shape == t["tuned"].shape):
            continue
        big, small = t["post"] - t["base"], t["tuned"] - t["base"]
        a = acc.setdefault(group_of(name), [0.0, 0.0, 0.0])
        a[0] += float((big * small).sum())
        a[1] += float((small * small).sum())
        a[2] += float((big * big).sum())
    total = [sum(v[i] for v in acc.values()) for i in range(3)]
    acc["all"] = total
    # A group the chat vector does not move (Δ = 0) has no direction to align with: None.
    return {g: {"cos": v[0] / (v[1] * v[2]) ** 0.5 if v[1] > 0 and v[2] > 1e-24 else None,
                "norm_ratio": (v[1] / v[2]) ** 0.5 if v[2] > 1e-24 else None}
            for g, v in sorted(acc.items())}


LABELS = {"codit": "CoDIT", "direct": "direct", "direct-masked": "direct with CoDIT's mask"}


def same_prompts(datasets: dict[str, Path], out_dir: Path, limit: int | None) -> tuple[dict[str, Path], dict]:
    """Rows of every dataset restricted to the prompts all of them kept (non-repetitive), one JSONL each."""
    rows = {name: {r["id"]: r for r in dataset_rows(path) if not r.get("repetitive")} for name, path in datasets.items()}
    first = next(iter(rows.values()))
    ids = [i for i in first if all(i in r for r in rows.values())][:limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, stats = {}, {"prompts": len(ids)}
    for name, by_id in rows.items():
        p = out_dir / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"id": i, "instruction": by_id[i]["instruction"],
                                         "response": by_id[i]["response"]}) + "\n" for i in ids))
        stats[f"{name}_words"] = sum(len(by_id[i]["response"].split()) for i in ids)
        paths[name] = p
    return paths, stats


def run_t2(base, post, datasets: dict[str, Path], out, work, *, eval_prompts=None, epochs: float = 3.0,
           lr: float = 1e-3, batch_size: int = 16, max_length: int = 256, limit: int | None = None,
           eval_limit: int | None = None, max_new_tokens: int = 96, seed: int = 0, device: str | None = None,
           dtype: str | None = None) -> dict:
    """T2 on explicit models: fine-tune `base` on each dataset {name: dir or .jsonl} (same prompts),
    compare each delta with Δ = post − base; IF on `eval_prompts` when given. Writes t2_alignment.*"""
    from distill.evaluate.run import evaluate
    from distill.io.models import resolve_model
    from distill.train.run import TrainConfig, train

    t0, out_dir, work = time.time(), Path(out), Path(work)
    base_dir, post_dir = resolve_model(base, "source base"), resolve_model(post, "source post")
    jsonl, data_stats = same_prompts(datasets, work / "data", limit)
    models = {}
    for name, data in jsonl.items():
        out = work / f"source-base+sft-{name}"
        train(TrainConfig(model=str(base_dir), data=str(data), out=str(out), deepspeed=None, epochs=epochs, lr=lr,
                          batch_size=batch_size, max_length=max_length, seed=seed, eval_fraction=0.0,
                          overwrite=True))  # always retrained: the common prompt set depends on the datasets given
        models[name] = out
    ifs = {}
    for name, m in (("base", base_dir), ("post", post_dir), *models.items()) if eval_prompts else ():
        s = evaluate(m, None, suites=("if",), out=work / "scores" / f"{name}.json", limit=eval_limit,
                     max_new_tokens=max_new_tokens, device=device, dtype=dtype, family="source",
                     prompts=str(eval_prompts))
        ifs[name] = s["if"]["prompt_level_strict"]
    gap = ifs["post"] - ifs["base"] if ifs else 0.0
    align = {name: delta_alignment(base_dir, post_dir, m) for name, m in models.items()}
    cos_cols = {n: f"cos(δ_{n}, Δ)" for n in models}
    norm_cols = {n: f"‖δ_{n}‖/‖Δ‖" for n in models}
    rows = []
    for g in align["codit"]:
        row = {"group": g}
        row.update({cos_cols[n]: align[n][g]["cos"] for n in models})
        row.update({norm_cols[n]: align[n][g]["norm_ratio"] for n in models})
        rows.append(row)
    recovered = {n: (ifs[n] - ifs["base"]) / gap if abs(gap) > 1e-9 else None for n in models if ifs}
    notes = [f"IF (prompt-level strict): base {ifs['base']:.3f}, post {ifs['post']:.3f}, "
             + ", ".join(f"SFT on {LABELS.get(n, n)} {ifs[n]:.3f}" for n in models) + ".",
             "Share of the post model's IF gain recovered: "
             + ", ".join(f"{n} {v:.3f}" if v is not None else f"{n} –" for n, v in recovered.items()) + "."
             ] if ifs else ["IF not evaluated (no --prompts / --zoo with verifiable constraints)."]
    notes += [f"Source base `{base}`, post `{post}`. Same {data_stats['prompts']} prompts; response words: "
             + ", ".join(f"{LABELS.get(n, n)} {data_stats[n + '_words']}" for n in models)
             + f"; epochs {epochs}, lr {lr}, batch {batch_size}, seed {seed}; {time.time() - t0:.0f} s.",
             "Two random directions of this size have cosine ≈ 0; the sign and size against that is what counts."]
    cols = ["group", *cos_cols.values(), *norm_cols.values()]
    write_table(out_dir, "t2_alignment", "T2: fine-tuning deltas of source-base vs the chat vector Δ", cols, rows,
                notes, extra={"if": ifs, "recovered": recovered, "data": data_stats})
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1]}, squeeze=False)
    axes = axes[0]
    groups = [r["group"] for r in rows]
    width = 0.8 / len(models)
    for k, n in enumerate(models):
        offset = (k - (len(models) - 1) / 2) * width
        axes[0].bar([i + offset for i in range(len(groups))], [r[cos_cols[n]] or 0.0 for r in rows], width,
                    label=f"SFT on {LABELS.get(n, n)}")
    axes[0].set_xticks(list(range(len(groups))), groups, rotation=45, ha="right", fontsize=8)
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_ylabel("cosine with Δ")
    axes[0].legend()
    names = ["base", *models, "post"] if ifs else []
    axes[1].bar([LABELS.get(n, n) for n in names], [ifs[n] for n in names], color=[f"C{i}" for i in range(len(names))])
    axes[1].tick_params(axis="x", rotation=45, labelsize=8)
    axes[1].set_title("IF prompt strict")
    save_figure(fig, out_dir / "t2_alignment.png")
    return {"rows": rows, "if": ifs, "recovered": recovered, "md": str(out_dir / "t2_alignment.md")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="t2_alignment.py", description=__doc__, usage=(
        "%(prog)s (--zoo ZOO | --base BASE --post POST) (--run-dir RUN | --codit DATA --direct DATA)\n"
        "       [--prompts EVAL.jsonl] [--out DIR] [options]"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, ("base", "post"), prompts="eval_prompts", prompts_help=(
        "IF evaluation prompts JSONL with `instruction` and `constraints` (default <zoo>/prompts/eval.jsonl; "
        "none: alignment only)"))
    p.add_argument("--run-dir", type=Path,
                   help="recipe run directory holding data/codit, data/direct (and data/direct-masked, if made)")
    p.add_argument("--codit", type=Path, help="CoDIT dataset directory (default <run-dir>/data/codit)")
    p.add_argument("--direct", type=Path, help="direct dataset directory (default <run-dir>/data/direct)")
    p.add_argument("--direct-masked", type=Path,
                   help="direct-with-CoDIT's-mask dataset directory (default <run-dir>/data/direct-masked if it exists)")
    p.add_argument("--out", type=Path, default=Path("analysis/results/theory"), help="output directory")
    p.add_argument("--work", type=Path, help="where tuned models go (default <out>/work/t2)")
    p.add_argument("--epochs", type=float, default=3.0, help="SFT epochs (default 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="SFT learning rate (default 1e-3, tiny models)")
    p.add_argument("--batch-size", type=int, default=16, help="SFT batch size")
    p.add_argument("--max-length", type=int, default=256, help="SFT max tokens per row")
    p.add_argument("--limit", type=int, help="use only the first N common prompts")
    p.add_argument("--eval-limit", type=int, help="evaluate IF on the first N eval prompts")
    p.add_argument("--max-new-tokens", type=int, default=96, help="response length in evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="evaluation device (default: cuda if available)")
    a = p.parse_args(argv)
    resolve_models(p, a, ("base", "post"))
    if a.prompts is None and a.zoo is not None:
        a.prompts = str(a.zoo / "prompts" / "eval.jsonl")
    datasets = {}
    for name, given in (("codit", a.codit), ("direct", a.direct), ("direct-masked", a.direct_masked)):
        path = given or (a.run_dir / "data" / name if a.run_dir else None)
        if path is not None and (given or path.is_dir() or name != "direct-masked"):
            datasets[name] = path
    if "codit" not in datasets or "direct" not in datasets:
        p.error("give --run-dir, or both --codit and --direct")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = run_t2(a.base, a.post, datasets, a.out, a.work or a.out / "work" / "t2", eval_prompts=a.prompts,
                 epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, max_length=a.max_length, limit=a.limit,
                 eval_limit=a.eval_limit, max_new_tokens=a.max_new_tokens, seed=a.seed, device=a.device,
                 dtype=None if a.dtype == "auto" else a.dtype)
    print(Path(res["md"]).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
