"""From verdicts to the benchmark's numbers: mean absolute scores, and win rates, raw and
length-controlled, each with a bootstrap interval over prompts.

Length control follows AlpacaEval 2.0: the probability that the model beats the reference is fitted
as a logistic model `logit p = θ + φ·tanh(Δlen / std(Δlen))` (Δlen: the model's response length
minus the reference's, in characters), and the length-controlled win rate is the model's win rate
with the length term at zero, 100·σ(θ). AlpacaEval's third term (an instruction-difficulty
coefficient fitted across many models of a leaderboard) is left out: one run has one model.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from distill.evaluate.judge.base import Verdict

BOOTSTRAP = 1000


def _interval(values: np.ndarray, stat, seed: int = 0) -> list[float]:
    if len(values) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    draws = [stat(values[rng.integers(0, len(values), len(values))]) for _ in range(BOOTSTRAP)]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def _unjudged(verdicts: Sequence[Verdict]) -> dict:
    missing = [v for v in verdicts if v.value is None]
    return {"judged": len(verdicts) - len(missing), "unjudged": len(missing),
            "unjudged_reasons": dict(Counter(v.error or "no value" for v in missing))}


def absolute_summary(verdicts: Sequence[Verdict]) -> dict:
    """Mean 1..10 score of the judged items, its 95 % bootstrap interval, the histogram of scores
    (rounded), and how many items have no verdict and why."""
    values = np.array([v.value for v in verdicts if v.value is not None], dtype=float)
    out = {"n": len(verdicts), **_unjudged(verdicts)}
    if len(values):
        out.update(mean=float(values.mean()), std=float(values.std()), ci95=_interval(values, np.mean),
                   histogram={str(k): int(c) for k, c in sorted(Counter(np.rint(values).astype(int)).items())},
                   attempts_mean=float(np.mean([v.attempts for v in verdicts])))
    else:
        out.update(mean=None, std=None, ci95=None, histogram={})
    return out


def preferences(model_first: Sequence[Verdict], model_second: Sequence[Verdict]) -> list[float | None]:
    """The model's preference per prompt from both orders: (A = model, B = ref) gives v, (A = ref,
    B = model) gives 1 − v; the mean of the orders that have a verdict (None if neither has)."""
    out = []
    for v1, v2 in zip(model_first, model_second):
        got = [x for x in (v1.value, None if v2.value is None else 1.0 - v2.value) if x is not None]
        out.append(sum(got) / len(got) if got else None)
    return out


def position_bookkeeping(model_first: Sequence[Verdict], model_second: Sequence[Verdict]) -> dict:
    """How the order of the two responses moved the judge: the share of prompts whose two orders
    agree (the same winner, or both ties), and the mean preference for whatever was shown first
    (0.5: no position bias)."""
    both = [(a.value, b.value) for a, b in zip(model_first, model_second) if a.value is not None and b.value is not None]
    shown = [v.value for v in (*model_first, *model_second) if v.value is not None]
    return {"pairs_with_both_orders": len(both),
            "order_consistency": float(np.mean([abs(a - (1.0 - b)) < 1e-9 for a, b in both])) if both else None,
            "first_position_preference": float(np.mean(shown)) if shown else None}


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 100) -> np.ndarray:
    """[θ, φ] of logit p = θ + φ·x for targets y in [0, 1] (ties are 0.5), by Newton's method;
    a small ridge on φ keeps a perfectly separable case finite (θ is not penalised)."""
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    ridge = np.diag([0.0, l2 * len(x)])
    for _ in range(iters):
        p = _sigmoid(X @ w)
        grad = X.T @ (p - y) + ridge @ w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + ridge + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def length_controlled(prefs: np.ndarray, dlen: np.ndarray) -> float:
    std = dlen.std()
    x = np.tanh(dlen / std) if std > 0 else np.zeros_like(dlen)
    theta, _ = _fit(x, prefs)
    return float(100 * _sigmoid(theta))


def win_rates(prefs: Sequence[float | None], model_lengths: Sequence[int], reference_lengths: Sequence[int]) -> dict:
    """Raw and length-controlled win rate (percent) of the model against the reference, each with
    a 95 % bootstrap interval over prompts; prompts without a verdict are counted, not used."""
    keep = [i for i, p in enumerate(prefs) if p is not None]
    p = np.array([prefs[i] for i in keep], dtype=float)
    d = np.array([model_lengths[i] - reference_lengths[i] for i in keep], dtype=float)
    out = {"n": len(prefs), "judged": len(keep), "unjudged": len(prefs) - len(keep)}
    if not len(p):
        return out | {"win_rate": None, "lc_win_rate": None}
    idx = np.arange(len(p))
    out.update(
        win_rate=float(100 * p.mean()), win_rate_ci95=_interval(p, lambda s: 100 * s.mean()),
        lc_win_rate=length_controlled(p, d),
        lc_win_rate_ci95=_interval(idx, lambda s: length_controlled(p[s], d[s]), seed=1),
        mean_length_model=float(np.mean([model_lengths[i] for i in keep])),
        mean_length_reference=float(np.mean([reference_lengths[i] for i in keep])))
    for k in ("win_rate", "lc_win_rate"):
        if out[k] is not None and math.isnan(out[k]):
            out[k] = None
    return out
