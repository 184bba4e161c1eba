"""Helpers shared by the theory experiments (analysis/theory_t*.py): inputs, models, tables, figures.

Inputs: every experiment takes explicit models (`--base`, `--post`, `--target`) and prompts
(`--prompts`, a JSONL with `instruction` or chat `messages`), or `--zoo ZOO`, a world directory
whose source-base, source-post, target-base and prompts/ fill in whatever is not given
(`add_model_args` / `resolve_models`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from distill import DistillError
from distill.fsutil import atomic_write_json, atomic_write_text

# What `--zoo ZOO` stands for: argument -> path inside the world directory.
ZOO_LAYOUT = {
    "base": "source-base",
    "post": "source-post",
    "target": "target-base",
    "eval_prompts": "prompts/eval.jsonl",
    "synthesis_prompts": "prompts/synthesis.jsonl",
    "questions": "knowledge/questions.jsonl",
    "heldout": "text/heldout.jsonl",
}
MODEL_HELP = {
    "base": "source base model: a directory or a Hugging Face cache id (default <zoo>/source-base)",
    "post": "source post (chat) model, same architecture and tokenizer as --base (default <zoo>/source-post)",
    "target": "target base model, any architecture (default <zoo>/target-base)",
}


def add_model_args(p, models: tuple[str, ...], prompts: str | None = None, prompts_help: str = "") -> None:
    """--zoo, the named model arguments, --prompts (when `prompts` names the zoo file) and --dtype."""
    p.add_argument("--zoo", type=Path, help="world directory; a shorthand that fills in every model and prompt "
                                            "file not given explicitly (" + ", ".join(
                                                f"--{m} <zoo>/{ZOO_LAYOUT[m]}" for m in models)
                   + (f", --prompts <zoo>/{ZOO_LAYOUT[prompts]}" if prompts else "") + ")")
    for m in models:
        p.add_argument(f"--{m}", help=MODEL_HELP[m])
    if prompts:
        p.add_argument("--prompts", help=prompts_help or f"prompts JSONL (default <zoo>/{ZOO_LAYOUT[prompts]})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on a GPU, float32 on CPU)")


def resolve_models(p, a, models: tuple[str, ...], prompts: str | None = None) -> None:
    """Fill a.<model> (and a.prompts) from --zoo where not given; p.error names what is missing."""
    names = list(models) + (["prompts"] if prompts else [])
    if a.zoo is not None and not a.zoo.is_dir():
        p.error(f"--zoo {a.zoo}: not a directory")
    missing = []
    for name in names:
        if getattr(a, name) is None and a.zoo is not None:
            setattr(a, name, str(a.zoo / ZOO_LAYOUT[prompts if name == "prompts" else name]))
        if getattr(a, name) is None:
            missing.append(f"--{name}")
    if missing:
        p.error(f"give --zoo ZOO (a world directory) or the explicit inputs; missing: {' '.join(missing)}")


def source_pair(base, post, chat_template: str | None = None, chat_template_kwargs=None):
    """(tokenizer, template kwargs) of the source pair, by `distill.pair.check_pair(post, base)`:
    one token -> id map, a chat template (the post's, or `chat_template`), its kwargs. Raises
    DistillError on a pair that cannot share prompts and scores."""
    from distill.pair import check_pair

    tok, pair = check_pair(str(post), str(base), chat_template=chat_template,
                           chat_template_kwargs=chat_template_kwargs)
    return tok, pair.chat_template_kwargs


def device_dtype(device: str | None, dtype: str | None):
    """(device, torch dtype): CUDA when present, bfloat16 on it, float32 on CPU, unless told."""
    from distill.evaluate_generate import resolve_device_dtype

    return resolve_device_dtype(device, dtype)


def load_model(ref, device: str, dtype, what: str):
    from distill.models import load_causal_lm

    return load_causal_lm(ref, dtype=dtype, device=device, what=what)


def prompt_messages(path, limit: int | None = None) -> list[dict]:
    """Rows {id, instruction, messages} of a prompts JSONL (`distill.synth_records.load_prompts`)."""
    from distill.synth_records import load_prompts

    return load_prompts(path, limit)


def encode_prompt(tokenizer, messages: list[dict], kwargs: dict | None = None, own: bool = False,
                  response: str | None = None) -> tuple[list[int], int]:
    """(ids, start): a rendered prompt, with `response` tokenized after it as one string (the
    tokens SFT on it would see), and the index where the response starts.

    own=False, the source pair's rule (`distill.pair`): the chat template with a generation
    prompt and `kwargs`, tokenized without added specials, bos never twice. own=True, a model's
    own format: its chat template, or without one the last user turn + newline, specials added.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    if templated or not own:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(kwargs or {}))
    else:
        text = [m["content"] for m in messages if m["role"] == "user"][-1] + "\n"
    add = own and not templated
    p_ids = tokenizer(text, add_special_tokens=add)["input_ids"]
    ids = p_ids if response is None else tokenizer(text + response, add_special_tokens=add)["input_ids"]
    bos, drop = tokenizer.bos_token_id, 0
    while bos is not None and len(p_ids) > drop + 1 and p_ids[drop] == p_ids[drop + 1] == bos:
        drop += 1
    return ids[drop:], len(p_ids) - drop


def response_logprobs(model, tokenizer, messages: list[list[dict]], responses: list[str], batch_size: int = 16,
                      kwargs: dict | None = None, own: bool = True) -> list[float]:
    """log p(response | prompt) per pair under `model` (prompt rendered by `encode_prompt`)."""
    from distill.evaluate_generate import sum_logprobs

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    enc = [encode_prompt(tokenizer, m, kwargs, own, r) for m, r in zip(messages, responses)]
    return [s for s, _ in sum_logprobs(model, [i for i, _ in enc], [s for _, s in enc], batch_size, pad)]


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path} not found; build the world with `distill zoo build --preset tiny` or pass the path")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def dataset_rows(data: str | Path) -> list[dict]:
    """Rows of a synthesized dataset directory (data/train.jsonl) or a .jsonl file."""
    p = Path(data)
    if p.is_dir():
        p = p / "data" / "train.jsonl"
    return read_jsonl(p)


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def std(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def pearson(a: list[float], b: list[float]) -> float | None:
    import torch

    if len(a) < 3:
        return None
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = x.norm() * y.norm()
    return float((x * y).sum() / den) if den > 0 else None


def ranks(x):
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    import torch

    x = torch.as_tensor(x, dtype=torch.float64)
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    # average ranks over ties
    uniq, inv = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        r = (sums / counts)[inv]
    return r


def spearman(a, b) -> float | None:
    if len(a) < 3:
        return None
    return pearson(ranks(a).tolist(), ranks(b).tolist())


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2e}"  # small KLs stay readable
    return str(x)


def write_table(out_dir: Path, name: str, title: str, columns: list[str], rows: list[dict], notes: list[str] = (),
                extra: dict | None = None) -> tuple[Path, Path]:
    """<name>.md and <name>.csv (and <name>.json with the raw numbers) in out_dir, atomically."""
    md = [f"# {title}", "", "| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    if notes:
        md += [""] + list(notes)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in columns})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.md", "\n".join(md) + "\n")
    atomic_write_text(out_dir / f"{name}.csv", buf.getvalue())
    atomic_write_json(out_dir / f"{name}.json", {"title": title, "rows": rows, **(extra or {})})
    return out_dir / f"{name}.md", out_dir / f"{name}.csv"


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
