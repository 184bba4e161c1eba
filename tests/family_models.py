"""Tiny random stand-ins for the published model families, built in the test, never downloaded.

`make_family_model(family)` returns a random Hugging Face causal LM a few kilobytes in size
with the quirks of the family's published config (q/k norms, biases, padded vocabularies,
tied embeddings, llama3 RoPE, interleaved sliding-window layers with a small window), so
that a test runs the same code paths as the real checkpoint. Norm weights are randomised
(HF initialises them to 1, or 0 for Gemma's (1 + w)), so a norm applied wrongly shows up.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mistral", "llama3.1", "qwen2.5", "qwen3", "qwen3-moe", "gemma3", "olmo3")
FAST_FAMILIES = ("mistral", "llama3.1", "qwen2.5", "qwen3", "gemma3", "olmo3")  # qwen3-moe runs on the eager engine
EXTRA_FAMILIES = ("olmo2", "gemma3-mm")  # also run by the fast engine, not in FAMILIES; gemma3-mm: the
# multimodal Gemma3ForConditionalGeneration (model type "gemma3", a tiny SigLIP tower) used for text
WINDOW = 8  # sliding window of the windowed families: prompts + generations in tests pass it
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}

# head_dim 16 everywhere: FlexAttention's GPU kernels need >= 16
_SHAPE = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
              max_position_embeddings=512)
_WIDE_HEADS = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # q_proj rows != hidden_size


def family_config(family: str, vocab_size: int = 256, **overrides):
    """The tiny config of `family`; `overrides` replace any config field (and `padded_rows`
    sets qwen2.5's output rows beyond the tokenizer's vocab_size)."""
    import transformers as tf

    ids = {k: overrides.pop(k, v) for k, v in SPECIAL_IDS.items()}
    common = dict(_SHAPE, vocab_size=vocab_size, num_hidden_layers=2, **ids)
    if family == "mistral":  # Mistral-7B-v0.1: one window on every layer
        kw = dict(common, sliding_window=WINDOW, tie_word_embeddings=False)
        cls = tf.MistralConfig
    elif family == "llama3.1":
        kw = dict(common, tie_word_embeddings=False, max_position_embeddings=131072, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        eos = ids["eos_token_id"]  # a list, as Llama-3.1's configs have it (<|end_of_text|>, <|eot_id|>, ...)
        kw["eos_token_id"] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        cls = tf.LlamaConfig
    elif family == "qwen2.5":  # q/k/v biases, output rows padded past the tokenizer, untied
        kw = dict(common, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        kw["vocab_size"] = vocab_size + overrides.pop("padded_rows", 16)
        cls = tf.Qwen2Config
    elif family == "qwen3":  # head_dim != hidden / heads, per-head q/k norm, tied (the small ones)
        kw = dict(common, **_WIDE_HEADS, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = tf.Qwen3Config
    elif family == "qwen3-moe":
        kw = dict(common, **_WIDE_HEADS, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        cls = tf.Qwen3MoeConfig
    elif family == "gemma3":  # 5 local : 1 global in the published models; here 2 : 1, twice
        kw = dict(common, **_WIDE_HEADS, num_hidden_layers=6, query_pre_attn_scalar=24, sliding_window=WINDOW,
                  hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window_pattern=3,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                  final_logit_softcapping=None, attn_logit_softcapping=None)
        cls = tf.Gemma3TextConfig
    elif family == "olmo3":  # post-sublayer norms, q/k norm over all heads, 3 sliding : 1 full layers
        kw = dict(common, num_hidden_layers=4, sliding_window=WINDOW, tie_word_embeddings=False,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}})
        cls = tf.Olmo3Config
    elif family == "olmo2":
        kw = dict(common, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
        cls = tf.Olmo2Config
    elif family == "gemma3-mm":
        vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14)
        text = family_config("gemma3", vocab_size, **ids, **overrides)
        return tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                               image_token_index=vocab_size - 1, boi_token_index=vocab_size - 2,
                               eoi_token_index=vocab_size - 3)
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES + EXTRA_FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def make_family_model(family: str, path: Path | None = None, vocab_size: int = 256, seed: int = 0,
                      dtype=torch.float32, tokenizer=None, **overrides):
    """A random causal LM of `family` (see FAMILIES); saved as safetensors when `path` is given,
    with `tokenizer` beside it. vocab_size is the tokenizer's size (qwen2.5 pads past it)."""
    from transformers import AutoModelForCausalLM

    cfg = family_config(family, vocab_size, **overrides)
    torch.manual_seed(seed)
    # built in `dtype` (not cast after): HF keeps RoPE's inv_freq in float32 then, as from_pretrained does
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # away from the init value, so a misapplied norm changes the scores
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.2)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    if path is not None:
        model.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return model
