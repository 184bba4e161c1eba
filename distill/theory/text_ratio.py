"""T3, cross-architecture and text-level: does the tuned target learn the source's log-ratio?

On one fixed set of (prompt, response) pairs, compare per response the source's sequence
log-ratio  s_src(y) = log p_post(y|x) − log p_base(y|x)  (source tokenizer; both source models
see the post's rendered prompt, as CoDIT's score does) with the target's
s_tgt(y) = log p_tuned(y|x) − log p_target_base(y|x)  (target tokenizer; each model with its own
prompt format). Tokenizers differ, texts do not. The claim predicts a higher correlation for
CoDIT-tuned targets than for direct-tuned ones. Each score is also divided by the response's
word count (per-word log-ratio), so long responses do not drive the correlation by length alone.
A control row, the target base's own surprise −log p_target_base(y), says how much of the
correlation no tuning is needed for. CLI and figure: analysis/theory/t3_text_correlation.py; as a recipe stage:
`theory.t3` (stage theory-t3).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from distill.theory.inputs import dataset_rows, device_dtype, load_model, response_logprobs, source_pair
from distill.theory.stats import mean, pearson, spearman, std
from distill.theory.tables import write_table

METHODS = ("codit", "direct")


def _messages(row: dict) -> list[dict]:
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs:
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
    return [{"role": "user", "content": row["instruction"]}]


def _response(row: dict) -> str:
    if isinstance(row.get("response"), str):
        return row["response"]
    msgs = row.get("messages") or []
    return msgs[-1]["content"] if msgs and msgs[-1].get("role") == "assistant" else ""


def fixed_pairs(texts, n: int, seed: int = 0) -> list[tuple[list[dict], str]]:
    """(messages, response) pairs. `texts` is a JSONL of pairs (the first n), or {name: dataset}
    (a synthesized dataset directory or .jsonl each): n // len(texts) non-repetitive responses
    of each, shuffled with a fixed seed."""
    if isinstance(texts, dict):
        pairs = []
        for source in texts.values():
            rows = [r for r in dataset_rows(source) if not r.get("repetitive") and _response(r).strip()]
            pairs += [(_messages(r), _response(r)) for r in rows[: n // len(texts)]]
        random.Random(seed).shuffle(pairs)
        return pairs
    from distill.io.files import read_jsonl
    from distill.synthesize.records import load_prompts

    raw = read_jsonl(texts, "texts")
    prompts = load_prompts(texts)  # validates instruction / messages, drops a final assistant turn
    pairs = [(p["messages"], _response(r)) for p, r in zip(prompts, raw) if _response(r).strip()]
    return pairs[:n]


def run_dir_inputs(run_dir: Path) -> tuple[dict, dict]:
    """(texts, tuned) of a recipe run directory: data/{codit,direct}, models/{codit,direct}-seedN."""
    texts = {m: run_dir / "data" / m for m in METHODS}
    tuned = {m: [str(d) for d in sorted((run_dir / "models").glob(f"{m}-seed*")) if (d / "config.json").exists()]
             for m in METHODS}
    return texts, {m: v for m, v in tuned.items() if v}


def run_t3(base, post, target, texts, tuned: dict[str, list], out, *, n: int = 128, batch_size: int = 16,
           device: str | None = None, dtype: str | None = "auto", seed: int = 0, chat_template: str | None = None,
           chat_template_kwargs=None) -> dict:
    """T3 on explicit models: source base/post, target base (paths or HF-cache ids); `texts` as in
    `fixed_pairs`; `tuned` {method: [tuned target models]}; the source prompts rendered as the pair
    renders them (`chat_template`, `chat_template_kwargs`: as synthesis was given them). Writes
    t3_text_correlation.{md,csv,json} into `out`; returns {"rows", "summary", "md", "scatter"}
    (scatter: {method: (s_src, s_tgt of its first tuned model)}, the figure's input)."""
    t0, out = time.time(), Path(out)
    device, torch_dtype = device_dtype(device, dtype)
    pairs = fixed_pairs(texts, n, seed)
    msgs, ys = [m for m, _ in pairs], [y for _, y in pairs]
    words = [max(len(y.split()), 1) for y in ys]
    src_tok, kwargs = source_pair(base, post, chat_template, chat_template_kwargs)

    def lp(ref, what, source=False):
        from distill.io.models import load_tokenizer

        model = load_model(ref, device, torch_dtype, what)
        tok = src_tok if source else load_tokenizer(ref, what=what)
        scores = response_logprobs(model, tok, msgs, ys, batch_size, kwargs if source else None, own=not source)
        del model
        return scores

    s_src = [a - b for a, b in zip(lp(post, "source post", True), lp(base, "source base", True))]
    lp_tbase = lp(target, "target base")
    per_word = lambda xs: [x / w for x, w in zip(xs, words)]  # noqa: E731
    # Control: the target base's own surprise at each text, no tuning involved. A tuned target
    # that beats it carries information about the source's log-ratio beyond "text is easy/hard".
    control = [-x for x in lp_tbase]
    rows = [{"tuned target": "control: −log p_target_base(y)", "method": "control", "pairs": len(pairs),
             "pearson": pearson(s_src, control), "spearman": spearman(s_src, control),
             "pearson per word": pearson(per_word(s_src), per_word(control))}]
    scatter = {}
    for method, models in tuned.items():
        for model_ref in models:
            s_tgt = [a - b for a, b in zip(lp(model_ref, f"tuned target ({method})"), lp_tbase)]
            rows.append({"tuned target": Path(str(model_ref)).name, "method": method, "pairs": len(pairs),
                         "pearson": pearson(s_src, s_tgt), "spearman": spearman(s_src, s_tgt),
                         "pearson per word": pearson(per_word(s_src), per_word(s_tgt))})
            scatter.setdefault(method, (s_src, s_tgt))
    summary = []
    for method in tuned:
        sel = [r for r in rows if r["method"] == method]
        if sel:
            summary.append({"tuned target": f"{method}: mean over {len(sel)} seeds", "method": method,
                            "pairs": len(pairs), "pearson": mean(r["pearson"] for r in sel),
                            "spearman": mean(r["spearman"] for r in sel),
                            "pearson per word": mean(r["pearson per word"] for r in sel),
                            "spearman std": std([r["spearman"] for r in sel])})
    cols = ["tuned target", "method", "pairs", "pearson", "spearman", "pearson per word", "spearman std"]
    where = (", ".join(f"{k} `{v}`" for k, v in texts.items()) + f", {n // len(texts)} each"
             if isinstance(texts, dict) else f"`{texts}`")
    notes = ["Note: each target model sees its own prompt format (a tuned target the chat template SFT gave it; a "
             "target base without one the bare instruction), so each s_tgt may also contain a prompt-format term.",
             f"{len(pairs)} fixed responses ({where}); source base `{base}`, post `{post}`, target base `{target}`; "
             f"{time.time() - t0:.0f} s on {device}.",
             "s_src = log p_post − log p_base (source); s_tgt = log p_tuned − log p_target_base (target)."]
    md, _ = write_table(out, "t3_text_correlation", "T3: source log-ratio vs tuned-target log-ratio on the same texts",
                        cols, rows + summary, notes, extra={"s_src": s_src})
    return {"rows": rows, "summary": summary, "md": str(md), "scatter": scatter}

