"""Command-line and figure helpers of the theory experiments (analysis/theory/t*.py).

Inputs: every experiment takes explicit models (`--base`, `--post`, `--target`) and prompts
(`--prompts`, a JSONL with `instruction` or chat `messages`), or `--zoo ZOO`, a world directory
whose source-base, source-post, target-base and prompts/ fill in whatever is not given
(`add_model_args` / `resolve_models`). What the experiments compute with (models, prompts,
statistics, tables) is in the package: `distill.theory` (inputs, stats, tables; T1 and T3).
"""

from __future__ import annotations

from pathlib import Path

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
