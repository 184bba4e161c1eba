"""Small statistics over lists of floats (None and NaN skipped): mean, std, Pearson, Spearman."""

from __future__ import annotations

import math


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

