"""Tests of the claim "CoDIT distils the chat vector from parameter space into text space".

    distill.theory.linearise   T1: the post model linearised around the base along Δ (J·Δ by
                               `torch.func.jvp`, chunked over positions) against CoDIT's score
    distill.theory.text_ratio  T3: across architectures, the tuned target's log-ratio against the
                               source's on the same texts
    distill.theory.inputs      the source pair, models, prompts, datasets, response log-probs
    distill.theory.stats       mean, std, Pearson, Spearman
    distill.theory.tables      <name>.md / .csv / .json tables
    distill.theory.commandline the experiments' shared arguments (--zoo, models, --dtype) and figures

`run_t1` and `run_t3` write tables only; analysis/theory/t1_linearisation.py and
analysis/theory/t3_text_correlation.py are their command lines and draw the figures; `distill run`
runs them as the recipe stages theory-t1 and theory-t3 (recipe section `theory`). T2 and T4 (training sweeps) stay in analysis/.
"""

from __future__ import annotations

__all__ = ["run_t1", "run_t3", "fixed_pairs", "run_dir_inputs"]


def __getattr__(name: str):  # lazy: `import distill.theory` does not import torch
    if name == "run_t1":
        from distill.theory.linearise import run_t1

        return run_t1
    if name in ("run_t3", "fixed_pairs", "run_dir_inputs"):
        from distill.theory import text_ratio

        return getattr(text_ratio, name)
    raise AttributeError(f"module 'distill.theory' has no attribute {name!r}")
