"""T1, linearisation: is the CoDIT score the output-space image of the chat vector?

With θ_post = θ_base + Δ, to first order lp_post − lp_base ≈ P·J(θ_base)·Δ (J the Jacobian
of the logits, P the centring of log-softmax). So, inside the plausible set, CoDIT with beta=1
samples from softmax(lp_post − lp_base) ≈ softmax(J·Δ). J·Δ is computed exactly, in one
forward pass, as a Jacobian-vector product at θ_base (`torch.func.jvp`).

Per response position (teacher-forced on the post model's greedy responses to held-out
prompts) it reports: cosine and Spearman correlation over the vocabulary between
d = lp_post − lp_base and J·Δ (both centred); the relative error of the first-order
prediction ‖d − P·J·Δ‖/‖d‖; KL(CoDIT ‖ softmax(J·Δ)) on the plausible set, next to
KL(CoDIT ‖ direct) and KL(CoDIT ‖ uniform) for scale; and how often the greedy CoDIT token
equals the argmax of J·Δ.

    python analysis/theory_t1.py --zoo ZOO --out analysis/results/theory [--prompts N]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from theory_common import mean, pyplot, read_jsonl, save_figure, write_table

log = logging.getLogger("theory.t1")


def chat_vector(base, post) -> dict[str, torch.Tensor]:
    """Δ = θ_post − θ_base per parameter of `base` (names as in base.named_parameters())."""
    post_params = dict(post.named_parameters())
    delta = {}
    for name, p in base.named_parameters():
        if name not in post_params or post_params[name].shape != p.shape:
            raise ValueError(f"parameter {name} differs between base and post; a chat vector needs one architecture")
        delta[name] = (post_params[name].detach() - p.detach()).to(p.dtype)
    return delta


def logits_and_jvp(model, tangent: dict[str, torch.Tensor], input_ids, attention_mask=None):
    """(logits at θ, J(θ)·tangent) for the logits of `model` on input_ids, by forward-mode AD."""
    from torch.func import functional_call, jvp

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}
    tangents = {k: tangent[k].to(params[k].dtype) for k in params}

    def f(p):
        out = functional_call(model, (p, buffers), args=(),
                              kwargs={"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False})
        return out.logits

    # SDPA's fused CPU/GPU kernels have no forward-mode derivative; eager attention does.
    previous = model.config._attn_implementation
    _set_attn(model, "eager")
    try:
        return jvp(f, (params,), (tangents,))
    finally:
        _set_attn(model, previous)


def _set_attn(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = a.argsort(-1).argsort(-1).double()
    rb = b.argsort(-1).argsort(-1).double()
    return _cos_rows(ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True))


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def _kl_masked(p_logits: torch.Tensor, q_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    neg = torch.tensor(float("-inf"), dtype=p_logits.dtype)
    lp = torch.log_softmax(torch.where(keep, p_logits, neg), -1)
    lq = torch.log_softmax(torch.where(keep, q_logits, neg), -1)
    return torch.where(keep, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)


def position_metrics(logits_base: torch.Tensor, logits_post: torch.Tensor, jd: torch.Tensor, alpha: float) -> dict:
    """Per-position comparison of d = lp_post − lp_base with J·Δ; inputs [positions, vocab]."""
    lb = torch.log_softmax(logits_base.double(), -1)
    lpo = torch.log_softmax(logits_post.double(), -1)
    j = jd.double()
    d = lpo - lb
    pj = j - (lb.exp() * j).sum(-1, keepdim=True)  # exact Jacobian of log-softmax applied to J·Δ
    keep = lpo >= lpo.max(-1, keepdim=True).values + math.log(alpha)
    neg = torch.tensor(float("-inf"), dtype=d.dtype)
    uniform = torch.zeros_like(d)
    return {
        "cos": _cos_rows(d - d.mean(-1, keepdim=True), j - j.mean(-1, keepdim=True)),
        "spearman": _spearman_rows(d, j),
        "rel_err": (d - pj).norm(dim=-1) / d.norm(dim=-1).clamp_min(1e-30),
        "kl_codit_lin": _kl_masked(d, j, keep),
        "kl_codit_direct": _kl_masked(d, lpo, keep),
        "kl_codit_uniform": _kl_masked(d, uniform, keep),
        "argmax_agree": (torch.where(keep, d, neg).argmax(-1) == torch.where(keep, j, neg).argmax(-1)).double(),
        "plausible": keep.sum(-1).double(),
    }


def build_sequences(post, tokenizer, instructions: list[str], max_new_tokens: int, batch_size: int):
    """Chat-templated prompt + the post model's greedy response; returns [(ids, first response index)]."""
    from distill.evaluate_generate import encode_prompts, generate_greedy, render_prompt

    rendered = [render_prompt(tokenizer, t) for t in instructions]
    templated = rendered[0][1]
    prompt_ids = encode_prompts(tokenizer, [r for r, _ in rendered], templated)
    gens = generate_greedy(post, tokenizer, prompt_ids, max_new_tokens, batch_size, desc="t1 responses")
    seqs = []
    for (text, _), p_ids, g in zip(rendered, prompt_ids, gens):
        full = tokenizer(text + g["text"], add_special_tokens=not templated)["input_ids"]
        if len(full) > len(p_ids):
            seqs.append((full, len(p_ids)))
    return seqs


def _logits_at(model, delta, lam: float, ids, mask):
    from torch.func import functional_call

    params = {k: v.detach() + lam * delta[k] for k, v in model.named_parameters()}
    return functional_call(model, (params, dict(model.named_buffers())), args=(),
                           kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False}).logits


def measure(base, post, seqs, alpha: float = 0.01, batch_size: int = 4,
            lambdas: tuple[float, ...] = (0.1, 0.25, 0.5)) -> dict[str, list[float]]:
    """All per-position metrics over the response positions of `seqs`."""
    delta = chat_vector(base, post)
    device = next(base.parameters()).device
    acc: dict[str, list[float]] = {}
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        width = max(len(s) for s, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (s, _) in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            lb, jd = logits_and_jvp(base, delta, ids, mask)
            lpo = post(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # Along the segment θ_base + λΔ: where does the first-order picture stop holding?
            partial = {lam: _logits_at(base, delta, lam, ids, mask) for lam in lambdas}
        for r, (s, start) in enumerate(chunk):
            pos = slice(start - 1, len(s) - 1)  # positions that predict response tokens
            for k, v in position_metrics(lb[r, pos], lpo[r, pos], jd[r, pos], alpha).items():
                acc.setdefault(k, []).extend(v.tolist())
            for lam, lg in partial.items():
                m = position_metrics(lb[r, pos], lg[r, pos], lam * jd[r, pos], alpha)
                acc.setdefault(f"cos@{lam:g}", []).extend(m["cos"].tolist())
                acc.setdefault(f"rel_err@{lam:g}", []).extend(m["rel_err"].tolist())
        log.info("t1: %d/%d sequences", min(b + batch_size, len(seqs)), len(seqs))
    return acc


LABELS = {
    "cos": "cosine(d, J·Δ), centred, full vocab",
    "spearman": "Spearman(d, J·Δ), full vocab",
    "rel_err": "‖d − P·J·Δ‖ / ‖d‖ (first-order error)",
    "kl_codit_lin": "KL(CoDIT ‖ softmax(J·Δ)) on plausible set",
    "kl_codit_direct": "KL(CoDIT ‖ direct) on plausible set (reference)",
    "kl_codit_uniform": "KL(CoDIT ‖ uniform) on plausible set (reference)",
    "argmax_agree": "greedy CoDIT token = argmax J·Δ (fraction)",
    "plausible": "plausible-set size (tokens)",
}


def _label(key: str) -> str:
    if key.endswith("_multi"):
        return LABELS[key[:-6]] + ", positions with ≥ 2 plausible tokens"
    if "@" in key:
        name, lam = key.split("@")
        what = "cosine(d_λ, J·Δ), centred" if name == "cos" else "‖d_λ − λ·P·J·Δ‖ / ‖d_λ‖"
        return f"{what}; d_λ = lp(θ_base + λΔ) − lp_base, λ = {lam}"
    return LABELS[key]


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q))


def run(zoo: Path, out_dir: Path, n_prompts: int = 32, max_new_tokens: int = 48, alpha: float = 0.01,
        batch_size: int = 4, device: str = "cpu", base_dir=None, post_dir=None, prompts=None) -> dict:
    from distill.models import load_causal_lm, load_tokenizer

    t0 = time.time()
    base_dir = Path(base_dir or zoo / "source-base")
    post_dir = Path(post_dir or zoo / "source-post")
    rows = read_jsonl(prompts or zoo / "prompts" / "eval.jsonl", n_prompts)
    tok = load_tokenizer(post_dir)
    base = load_causal_lm(base_dir, device=device, what="source base")
    post = load_causal_lm(post_dir, device=device, what="source post")
    seqs = build_sequences(post, tok, [r["instruction"] for r in rows], max_new_tokens, batch_size)
    acc = measure(base, post, seqs, alpha, batch_size)
    multi = [i for i, n in enumerate(acc["plausible"]) if n >= 2]
    for k in ("kl_codit_lin", "kl_codit_direct", "kl_codit_uniform", "argmax_agree"):
        acc[k + "_multi"] = [acc[k][i] for i in multi]
    table = [{"metric": _label(k), "key": k, "mean": mean(v), "median": _quantile(v, 0.5), "p10": _quantile(v, 0.1),
              "p90": _quantile(v, 0.9), "positions": len(v)} for k, v in acc.items()]
    notes = [f"Source base `{base_dir}`, post `{post_dir}`; {len(seqs)} held-out prompts, post's greedy responses "
             f"(≤ {max_new_tokens} tokens), alpha = {alpha}; {time.time() - t0:.0f} s on {device}.",
             "d = lp_post − lp_base is CoDIT's beta=1 score; J·Δ is the exact Jacobian-vector product at θ_base."]
    write_table(out_dir, "t1_linearisation", "T1: CoDIT score vs the linearised chat vector J·Δ",
                ["metric", "mean", "median", "p10", "p90", "positions"], table, notes)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].hist(acc["cos"], bins=40, range=(-1, 1), alpha=0.7, label="cosine")
    axes[0].hist(acc["spearman"], bins=40, range=(-1, 1), alpha=0.7, label="Spearman")
    axes[0].set_title("d vs J·Δ per position")
    axes[0].legend()
    hi = max(_quantile(acc["kl_codit_direct"], 0.95) or 1.0, _quantile(acc["kl_codit_lin"], 0.95) or 1.0)
    for k in ("kl_codit_lin", "kl_codit_direct", "kl_codit_uniform"):
        axes[1].hist(acc[k], bins=40, range=(0, hi), alpha=0.5, label=k.replace("kl_codit_", "KL(CoDIT‖") + ")")
    axes[1].set_title("KL on the plausible set")
    axes[1].legend(fontsize=8)
    axes[2].hist(acc["rel_err"], bins=40, alpha=0.7)
    axes[2].set_title("first-order relative error ‖d − PJΔ‖/‖d‖")
    save_figure(fig, out_dir / "t1_linearisation.png")
    return {"table": table, "sequences": len(seqs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True, type=Path, help="world directory (source-base, source-post, prompts/)")
    p.add_argument("--out", type=Path, default=Path("analysis/results/theory"), help="output directory")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts to use (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the post model's responses")
    p.add_argument("--alpha", type=float, default=0.01, help="plausibility threshold (default 0.01)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per JVP pass")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res = run(a.zoo, a.out, a.prompts, a.max_new_tokens, a.alpha, a.batch_size, a.device)
    print((a.out / "t1_linearisation.md").read_text())
    return 0 if res["sequences"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
