"""T1, linearisation: is the CoDIT score the output-space image of the chat vector?

With θ_post = θ_base + Δ, to first order lp_post − lp_base ≈ P·J(θ_base)·Δ (J the Jacobian
of the logits, P the centring of log-softmax). So, inside the plausible set, CoDIT with beta=1
samples from softmax(lp_post − lp_base) ≈ softmax(J·Δ). J·Δ is computed exactly, in one
forward pass, as a Jacobian-vector product at θ_base (`torch.func.jvp`).

Per response position (teacher-forced on the post model's greedy responses to the prompts,
rendered with the post model's chat template, stopped at its stop tokens) `run_t1` reports:
cosine and Spearman correlation over the vocabulary between d = lp_post − lp_base and J·Δ (both
centred); the relative error of the first-order prediction ‖d − P·J·Δ‖/‖d‖; KL(CoDIT ‖
softmax(J·Δ)) on the plausible set, next to KL(CoDIT ‖ direct) and KL(CoDIT ‖ uniform) for
scale; how often the greedy CoDIT token equals the argmax of J·Δ; and, along θ_base + λΔ,
where the first-order picture stops holding. CLI and figure: analysis/theory/t1_linearisation.py; as a
recipe stage: `theory.t1` (stage theory-t1).

Memory (chunked, the default). The transformer body runs once per batch of rows, in forward
mode (primal + tangent); the output head, the J·Δ logits and every metric are computed for at
most chunk_tokens response positions at a time, so vocabulary-sized tensors never exceed
C × V. The λ points reuse the post model's weights (overwritten with θ_base + λΔ), so three
copies of the weights are the most ever held. Estimate (computed, not measured), with b bytes
per weight (2 for bfloat16), P parameters, V vocabulary, H hidden, I MLP width, n_h heads,
B rows (batch_size) of S tokens, C = chunk_tokens:

    M ≈ 3 · P · b                                     base, post, Δ
      + C · V · (3·b + 104)                           head logits (base, J·Δ, post) + float64 metrics
      + B · S · (12·I + 9·H) · b + 16 · B · n_h · S²  one forward-mode layer, eager attention

For Llama-3.1-8B in bfloat16 (P = 8.03e9, V = 128256, H = 4096, I = 14336, n_h = 32) with
C = 256, B = 4, S = 1024: weights 48.2 GB, chunk 3.6 GB, activations 3.9 GB: about 56 GB
(estimate), so one 80 GB GPU holds it; halving C or B saves the chunk or activation share.
Time: 1 + len(lambdas) forward-mode passes over the prompts.
chunk_tokens=0 is the unchunked path (the whole model's logits and J·Δ at once: B·S·V-sized).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path

import torch

from distill.theory.inputs import device_dtype, encode_prompt, load_model, prompt_messages, source_pair
from distill.theory.stats import mean
from distill.theory.tables import write_table

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
    """(logits at θ, J(θ)·tangent) for the logits of `model` on input_ids, by forward-mode AD (unchunked)."""
    from torch.func import functional_call, jvp

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}
    tangents = {k: tangent[k].to(params[k].dtype) for k in params}

    def f(p):
        out = functional_call(model, (p, buffers), args=(),
                              kwargs={"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False})
        return out.logits

    with _eager(model), _plain_linear():
        return jvp(f, (params,), (tangents,))


class _eager:
    """SDPA's fused CPU/GPU kernels have no forward-mode derivative; eager attention does."""

    def __init__(self, model):
        self.model, self.previous = model, model.config._attn_implementation

    def __enter__(self):
        _set_attn(self.model, "eager")

    def __exit__(self, *exc):
        _set_attn(self.model, self.previous)


def _set_attn(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


@contextlib.contextmanager
def _plain_linear():
    """torch.nn.functional.linear as torch defines it. DeepSpeed ZeRO-3, once initialised in this
    process (a training stage of `distill run` before), leaves it replaced by a custom
    autograd.Function without a forward-mode derivative ("This will persist unless manually
    reset"); forward-mode AD needs the original back for as long as it runs."""
    ds = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(ds, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    current = torch.nn.functional.linear
    if original is None or current is original:
        yield
        return
    torch.nn.functional.linear = original
    try:
        yield
    finally:
        torch.nn.functional.linear = current


class Split:
    """A causal LM as body (decoder → last hidden state) + head (lm_head, softcapping), with the
    parameter names of each part mapped to the model's own (tied weights included)."""

    def __init__(self, model):
        self.model, self.body, self.head = model, model.get_decoder(), model.get_output_embeddings()
        canon = {id(p): n for n, p in model.named_parameters()}
        self.body_names = {k: canon[id(p)] for k, p in self.body.named_parameters(remove_duplicate=False)}
        self.head_names = {k: canon[id(p)] for k, p in self.head.named_parameters(remove_duplicate=False)}
        missing = set(canon.values()) - set(self.body_names.values()) - set(self.head_names.values())
        if missing:
            raise ValueError(f"parameters outside the decoder and lm_head ({sorted(missing)[:3]}); "
                             f"use chunk_tokens=0, the unchunked path (--chunk-tokens 0)")
        self.buffers = dict(self.body.named_buffers())
        self.cap = getattr(model.config, "final_logit_softcapping", None)

    def hidden(self, params: dict, ids, mask):
        from torch.func import functional_call

        p = {k: params[n] for k, n in self.body_names.items()}
        return functional_call(self.body, (p, self.buffers), args=(), kwargs={
            "input_ids": ids, "attention_mask": mask, "use_cache": False}).last_hidden_state

    def logits(self, params: dict, h):
        from torch.func import functional_call

        out = functional_call(self.head, {k: params[n] for k, n in self.head_names.items()}, (h,))
        return torch.tanh(out / self.cap) * self.cap if self.cap else out

    def check(self, params: dict, ids, mask) -> None:
        """The split must reproduce the model's own logits (a head this class does not know fails here)."""
        with torch.no_grad():
            try:
                own = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1]
            except TypeError:  # a model without logits_to_keep: nothing cheap to check against
                log.warning("t1: %s has no logits_to_keep; the body/head split is unchecked", type(self.model).__name__)
                return
            mine = self.logits(params, self.hidden(params, ids, mask)[:, -1])
        tol = (1e-4 if own.dtype == torch.float64 or own.dtype == torch.float32 else 3e-2) * own.abs().max() + 1e-5
        if (own - mine).abs().max() > tol:
            raise ValueError("this architecture's output head is not lm_head(+softcapping); "
                             "use chunk_tokens=0, the unchunked path (--chunk-tokens 0)")


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = a.argsort(-1).argsort(-1).double()
    rb = b.argsort(-1).argsort(-1).double()
    return _cos_rows(ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True))


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def _kl_masked(p_logits: torch.Tensor, q_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    neg = torch.tensor(float("-inf"), dtype=p_logits.dtype, device=p_logits.device)
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
    neg = torch.tensor(float("-inf"), dtype=d.dtype, device=d.device)
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


def build_sequences(post, tokenizer, prompts: list[dict], max_new_tokens: int, batch_size: int,
                    kwargs: dict | None = None):
    """Prompt (the pair's rendering: the post model's chat template) + the post model's greedy
    response, stopped at its stop set (`distill.io.models.stop_token_ids`); [(ids, response start)]."""
    from distill.evaluate.generate import generate_greedy

    prompt_ids = [encode_prompt(tokenizer, p["messages"], kwargs)[0] for p in prompts]
    gens = generate_greedy(post, tokenizer, prompt_ids, max_new_tokens, batch_size, desc="t1 responses")
    seqs = [encode_prompt(tokenizer, p["messages"], kwargs, response=g["text"]) for p, g in zip(prompts, gens)]
    return [(ids, start) for ids, start in seqs if len(ids) > start]


def _accumulate(acc: dict, lam, lb, other, jd, alpha: float) -> None:
    if lam is None:  # other = post logits: the main comparison
        for k, v in position_metrics(lb, other, jd, alpha).items():
            acc.setdefault(k, []).extend(v.tolist())
    else:  # other = logits at θ_base + λΔ
        m = position_metrics(lb, other, lam * jd, alpha)
        acc.setdefault(f"cos@{lam:g}", []).extend(m["cos"].tolist())
        acc.setdefault(f"rel_err@{lam:g}", []).extend(m["rel_err"].tolist())


def _batches(seqs, batch_size: int, device):
    """(ids, mask, row index, position index) per batch; the positions are those that predict
    response tokens, row by row."""
    for b in range(0, len(seqs), batch_size):
        rows = seqs[b:b + batch_size]
        width = max(len(s) for s, _ in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (s, _) in enumerate(rows):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        where = [(r, t) for r, (s, start) in enumerate(rows) for t in range(start - 1, len(s) - 1)]
        yield (ids.to(device), mask.to(device), torch.tensor([r for r, _ in where], device=device),
               torch.tensor([t for _, t in where], device=device))


def measure(base, post, seqs, alpha: float = 0.01, batch_size: int = 4,
            lambdas: tuple[float, ...] = (0.1, 0.25, 0.5), chunk_tokens: int = 256) -> dict[str, list[float]]:
    """All per-position metrics over the response positions of `seqs`, rows `batch_size` at a
    time and (chunk_tokens > 0) vocabulary-sized work `chunk_tokens` positions at a time.

    One pass compares post with J·Δ; then, for each λ, `post`'s own weights are overwritten with
    θ_base + λΔ (so no fourth copy of the model is needed) and the pass repeats against them.
    `post` therefore ends as θ_base + λΔ for the last λ: reload it to use it again."""
    from torch.func import jvp

    delta = chat_vector(base, post)
    params = {k: v.detach() for k, v in base.named_parameters()}
    post_params = {k: v.detach() for k, v in post.named_parameters()}
    split, post_split = (Split(base), Split(post)) if chunk_tokens > 0 else (None, None)
    checked = split is None
    acc: dict[str, list[float]] = {}
    for lam in (None, *lambdas):
        if lam is not None:
            with torch.no_grad():
                for k, v in params.items():
                    torch.add(v, delta[k], alpha=lam, out=post_params[k])
        for n, (ids, mask, r_idx, t_idx) in enumerate(_batches(seqs, batch_size, next(base.parameters()).device)):
            step = chunk_tokens if chunk_tokens > 0 else len(r_idx)
            with torch.no_grad(), _plain_linear():
                if split is None:  # unchunked: the whole model, every position of the batch at once
                    lb_all, jd_all = logits_and_jvp(base, delta, ids, mask)
                    other_all = post(input_ids=ids, attention_mask=mask, use_cache=False).logits
                else:
                    with _eager(base):
                        if not checked:
                            split.check(params, ids, mask)
                            checked = True
                        h, hd = jvp(lambda p: split.hidden(p, ids, mask), (params,), (delta,))
                    h_other = post_split.hidden(post_params, ids, mask)
                head_p = {n_: params[n_] for n_ in split.head_names.values()} if split else {}
                head_t = {n_: delta[n_] for n_ in split.head_names.values()} if split else {}
                for c in range(0, len(r_idx), step):
                    ri, ti = r_idx[c:c + step], t_idx[c:c + step]
                    if split is None:
                        lb, jd, other = lb_all[ri, ti], jd_all[ri, ti], other_all[ri, ti]
                    else:
                        lb, jd = jvp(lambda hh, p_: split.logits(p_, hh), (h[ri, ti], head_p), (hd[ri, ti], head_t))
                        other = post_split.logits(post_params, h_other[ri, ti])
                    _accumulate(acc, lam, lb, other, jd, alpha)
            log.info("t1 (%s): batch %d done", "post" if lam is None else f"λ = {lam:g}", n + 1)
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


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q))


def run_t1(base, post, prompts, out, *, limit: int | None = 32, max_new_tokens: int = 48, alpha: float = 0.01,
           batch_size: int = 4, chunk_tokens: int = 256, lambdas: tuple[float, ...] = (0.1, 0.25, 0.5),
           device: str | None = None, dtype: str | None = "auto", chat_template: str | None = None,
           chat_template_kwargs=None, prompts_name: str | None = None) -> dict:
    """T1 on explicit models: base, post (paths or HF-cache ids; checked as a pair by
    `distill.decoding.pair.check_pair`), prompts (a JSONL with `instruction` or `messages`, or prompt rows
    already read: {id, instruction, messages}, as `distill.synthesize.prompt_sets.load_prompt_set` gives them;
    the first `limit` are used; `prompts_name` names them in the notes). Writes
    t1_linearisation.{md,csv,json} into `out`. Returns {"table": [rows], "sequences": n,
    "md": path, "metrics": {key: per-position values}} (the figure's input)."""
    t0, out = time.time(), Path(out)
    device, torch_dtype = device_dtype(device, dtype)
    tok, kwargs = source_pair(base, post, chat_template, chat_template_kwargs)
    if isinstance(prompts, (list, tuple)):
        rows, prompts_name = list(prompts)[:limit] if limit else list(prompts), prompts_name or "the given rows"
    else:
        rows, prompts_name = prompt_messages(prompts, limit), prompts_name or str(prompts)
    base_m = load_model(base, device, torch_dtype, "source base")
    post_m = load_model(post, device, torch_dtype, "source post")
    seqs = build_sequences(post_m, tok, rows, max_new_tokens, batch_size, kwargs)
    acc = measure(base_m, post_m, seqs, alpha, batch_size, tuple(lambdas), chunk_tokens) if seqs else {}
    del base_m, post_m
    multi = [i for i, n in enumerate(acc.get("plausible", [])) if n >= 2]
    for k in ("kl_codit_lin", "kl_codit_direct", "kl_codit_uniform", "argmax_agree"):
        if k in acc:
            acc[k + "_multi"] = [acc[k][i] for i in multi]
    table = [{"metric": _label(k), "key": k, "mean": mean(v), "median": quantile(v, 0.5), "p10": quantile(v, 0.1),
              "p90": quantile(v, 0.9), "positions": len(v)} for k, v in acc.items()]
    notes = [f"Source base `{base}`, post `{post}`; {len(seqs)} of {len(rows)} prompts (`{prompts_name}`) with a "
             f"response, post's greedy responses (≤ {max_new_tokens} tokens), alpha = {alpha}; "
             f"{time.time() - t0:.0f} s on {device} ({str(torch_dtype).replace('torch.', '')}).",
             "d = lp_post − lp_base is CoDIT's beta=1 score; J·Δ is the exact Jacobian-vector product at θ_base."]
    if not seqs:
        notes.insert(0, "No prompt got a non-empty response from the post model: nothing to measure.")
    md, _ = write_table(out, "t1_linearisation", "T1: CoDIT score vs the linearised chat vector J·Δ",
                        ["metric", "mean", "median", "p10", "p90", "positions"], table, notes)
    return {"table": table, "sequences": len(seqs), "md": str(md), "metrics": acc}
