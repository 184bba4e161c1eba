"""The CoDIT step (shared/DESIGN.md, "The method"): pure functions on logits, for each row and step:

    lp_e  = log_softmax(logits_expert)          # post-trained model
    lp_a  = log_softmax(logits_amateur)         # its pre-trained base
    keep  = p_e >= alpha * max(p_e)             # plausibility constraint (the argmax always survives)
    score = where(keep, lp_e - beta * lp_a, -inf)
    next  = sample(score / temperature, top_p)  # or argmax when temperature == 0

beta = 0 is plain generation from the expert (the amateur is then never run). Like Hugging Face
generation, each transformation is one pure function and `next_token` composes them; the engines
(`distill.decoding.engine`) call nothing else to choose a token.

Sampling uses counter-based randomness: the uniform a row draws depends only on (row seed, step),
so a row's output does not depend on which other rows share its batch; continuous batching,
sharding over ranks and resume-after-crash reproduce an uninterrupted batch-1 run.
"""

from __future__ import annotations

import math

import torch

from distill import DistillError



_MASK32 = 0xFFFFFFFF


def plausibility_mask(logprobs_expert: torch.Tensor, alpha: float) -> torch.Tensor:
    """True where p_e >= alpha * max(p_e), computed in log space; alpha=0 keeps all, 1 keeps the argmax."""
    if not 0.0 <= alpha <= 1.0:
        raise DistillError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return torch.ones_like(logprobs_expert, dtype=torch.bool)
    top = logprobs_expert.max(dim=-1, keepdim=True).values
    return logprobs_expert >= top + math.log(alpha)


def contrastive_scores(logits_expert: torch.Tensor, logits_amateur: torch.Tensor | None,
                       alpha: float, beta: float) -> torch.Tensor:
    """score = where(keep, lp_e - beta * lp_a, -inf), in float32; `logits_amateur` may be None if beta == 0."""
    lp_e = torch.log_softmax(logits_expert.float(), dim=-1)
    keep = plausibility_mask(lp_e, alpha)
    if beta != 0.0:
        if logits_amateur is None:
            raise ValueError("beta != 0 needs the amateur's logits")
        # Clamp so a token the amateur rules out (-inf) gets a large finite bonus, not +inf / NaN.
        lp_e = lp_e - beta * torch.log_softmax(logits_amateur.float(), dim=-1).clamp(min=-1e4)
    return lp_e.masked_fill(~keep, float("-inf"))


def top_p_filter(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one); others -inf."""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    probs = sorted_lp.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p  # the first token has mass_before 0, so it always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs.masked_fill(drop, float("-inf"))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (values kept below 2**32, so no overflow)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def row_uniform(row_seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in (0, 1) per row, a pure function of (row seed, step)."""
    bits = _hash32(_hash32((row_seeds.long() * 0x9E3779B1 + steps.long()) & _MASK32) ^ 0x5BD1E995)
    return (bits.double() + 0.5) * (1.0 / 2**32)


def select_next(scores: torch.Tensor, temperature: float, top_p: float,
                row_seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Greedy (temperature 0) or temperature + top-p sampling by inverting the CDF.

    One counter-based uniform per row (not one per token, as Gumbel-max would need) keeps the
    step cheap on a large vocabulary; the CDF is summed in float64, so u * total < total and
    a token of probability 0 (masked, filtered) can never be returned.
    """
    if temperature == 0.0:
        return scores.argmax(dim=-1)
    logprobs = torch.log_softmax(scores / temperature, dim=-1)
    logprobs = top_p_filter(logprobs, top_p)
    cdf = logprobs.exp().double().cumsum(dim=-1)
    u = row_uniform(row_seeds, steps) * cdf[:, -1]
    return torch.searchsorted(cdf, u[:, None], right=True).squeeze(-1)


def next_token(logits_expert: torch.Tensor, logits_amateur: torch.Tensor | None, config,
               row_seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose the step: contrast the real vocabulary only (padded rows are dropped), then pick."""
    logits_a = logits_amateur[..., :vocab_size] if logits_amateur is not None else None
    scores = contrastive_scores(logits_expert[..., :vocab_size], logits_a, config.alpha, config.beta)
    return select_next(scores, config.temperature, config.top_p, row_seeds, steps), scores
