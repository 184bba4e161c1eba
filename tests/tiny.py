"""Tiny models and tokenizers built in the test, never downloaded: `distill.world.stand_ins`
(where the benchmarks import them from too), re-exported under the name the tests use."""

from distill.world.stand_ins import CHAT_TEMPLATE, CORPUS, make_model, make_tokenizer

__all__ = ["CHAT_TEMPLATE", "CORPUS", "make_model", "make_tokenizer"]
