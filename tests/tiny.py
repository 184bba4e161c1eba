"""Tiny models and tokenizers built in the test, never downloaded: `distill.world.stand_ins`
(where the benchmarks import them from too), re-exported under the name the tests use."""

from distill.world.stand_ins import CHAT_TEMPLATE, CORPUS, make_model, make_tokenizer

__all__ = ["CHAT_TEMPLATE", "CORPUS", "make_model", "make_tokenizer"]


def score_recorder():
    """(seen, hook): a ContrastiveDecoder score_hook that keeps every live row's score vector in
    `seen`, keyed by (request key, step)."""
    seen = {}

    def hook(keys, steps, active, scores):
        for k, s, a, row in zip(keys, steps, active, scores):
            if a:
                seen[k, s] = row.clone()

    return seen, hook
