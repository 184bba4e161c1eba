"""Tiny random stand-ins for models and tokenizers, built on the spot, never downloaded: for the
tests (tests/tiny.py re-exports this module) and the benchmarks (bench/).

`make_tokenizer` trains a small BPE with the special tokens and the chat template a real
instruct family has; `make_model` writes a random Mistral / Qwen2 / Llama checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "answer in json with a list of three bullet points",
    "write the response in lowercase letters and end with the word done",
    "the capital of the made up country is a city on the river",
    "please repeat the request word for word then give your answer",
] * 20


def make_tokenizer(path: Path | None = None, vocab_size: int = 200, chat_template: str | None = CHAT_TEMPLATE,
                   model: str = "bpe"):
    """A fast tokenizer with <s>, </s>, <unk>, <pad> and (optionally) a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = chat_template
    if path is not None:
        fast.save_pretrained(path)
    return fast


def make_model(path: Path | None = None, arch: str = "mistral", vocab_size: int = 200, hidden: int = 32,
               layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 64, seed: int = 0,
               dtype=torch.float32, tie: bool = False, max_shard_size: str | None = None, tokenizer=None):
    """A random causal LM of the named architecture; saved as safetensors when `path` is given."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, AutoModelForCausalLM

    cls = {"mistral": MistralConfig, "qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    cfg = cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=512,
              tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.eval()
    if path is not None:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return model
