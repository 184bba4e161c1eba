"""What the fast decoder needs to know about a Hugging Face model family, and its weights as plain tensors.

Every supported family is a Llama-shaped decoder (RMSNorm, RoPE, grouped-query attention, a
gated MLP) with a few quirks. `family_of(config)` reads them into a `Family`; `read_weights`
turns a HF model into the per-layer dicts `distill.decoding.fast.FastLM` runs, with per-layer
differences (sliding window, RoPE table) in each layer's dict. Nothing is copied except tiny
norm vectors: the big tensors are the HF model's own (q/k/v and gate/up fused in place).

The quirks, as the HF modeling files (transformers/models/<family>/modeling_*.py) have them:
- Qwen2: q/k/v bias. Qwen3: per-head q/k RMSNorm (over head_dim) before RoPE, head_dim set
  apart from hidden / heads. Both: optional sliding-window layers through `layer_types`.
- Gemma-3: RMSNorm in float32 times (1 + w); norms before AND after each sublayer; per-head
  q/k norm; embeddings times sqrt(hidden) in the embedding dtype; query_pre_attn_scalar ** -0.5
  attention scale; GELU-tanh MLP; interleaved sliding/global layers, each kind with its own
  RoPE base; optional final logit soft-capping.
- Olmo2/3: no pre-norms, an RMSNorm after attention and after the MLP (weight times the
  float32 normalised input); q/k norm over the whole projected q and k; RoPE in float32;
  Olmo3: sliding-window layers through `layer_types`, a RoPE table per layer type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.decoding.layers import fuse_linears

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "olmo2", "olmo3")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # types whose inv_freq does not change at run time
ATTENTION_TYPES = ("full_attention", "sliding_attention")
WHY_NOT = {  # families known to be out of reach, and why
    "qwen3_moe": "Qwen3-MoE's mixture-of-experts MLP (routed experts) is not implemented in the fast engine",
    "mixtral": "Mixtral's mixture-of-experts MLP is not implemented in the fast engine",
    "gemma2": "Gemma-2's attention logit soft-capping is not implemented in the fast engine",
}

LLAMA_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)
GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
OLMO_NORMS = (None, "post_attention_layernorm", None, "post_feedforward_layernorm")


@dataclass(frozen=True)
class Family:
    """How one family departs from Llama (the defaults are Llama's)."""

    # The decoder layer's norm modules: (before attention, after attention, before MLP, after MLP).
    norms: tuple = LLAMA_NORMS
    norm_f32: bool = False  # scale by the weight in float32, then cast (Olmo, Gemma); Llama casts first
    norm_offset: float = 0.0  # Gemma scales by (1 + w)
    qk_norm: str | None = None  # "head": over head_dim (Qwen3, Gemma3); "all": over all heads (Olmo2/3)
    gelu: bool = False  # a GELU-tanh MLP (Gemma's gelu_pytorch_tanh) instead of SiLU
    embed_scaled: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    rope_f32: bool = False  # Olmo: q/k rotated in float32 and cast back

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + self.norm_offset if self.norm_f32 else weight


def text_parts(hf_model):
    """(text config, decoder base model): a multimodal Gemma-3 decodes text with its language model."""
    if hf_model.config.model_type == "gemma3":
        return hf_model.config.get_text_config(), hf_model.model.language_model
    return hf_model.config, hf_model.model


def family_of(cfg) -> Family:
    kind, gelu = cfg.model_type, activation_of(cfg) == "gelu_pytorch_tanh"
    if kind in ("gemma3_text", "gemma3"):
        return Family(norms=GEMMA_NORMS, norm_f32=True, norm_offset=1.0, qk_norm="head", gelu=gelu,
                      embed_scaled=True, attn_scale=cfg.query_pre_attn_scalar ** -0.5)
    if kind in ("olmo2", "olmo3"):
        return Family(norms=OLMO_NORMS, norm_f32=True, qk_norm="all", rope_f32=True, gelu=gelu)
    return Family(qk_norm="head" if kind == "qwen3" else None, gelu=gelu)


def activation_of(cfg) -> str:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")


def layer_windows(cfg) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as HF's masks apply it."""
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types is None:  # Mistral: one window (or none) on every layer
        return [window] * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types[:cfg.num_hidden_layers]]


def rope_tables(rotary, cfg) -> tuple[list[tuple], list[int]]:
    """The distinct (rope type, inv_freq, attention scaling) tables and each layer's index into them.

    The HF module's own inv_freq, so llama3/yarn scaling come for free. Gemma-3 and Olmo-3 keep
    one table per layer type (`<type>_inv_freq`); the others one `inv_freq` for every layer.
    """
    if hasattr(rotary, "inv_freq"):
        table = (getattr(rotary, "rope_type", None), rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
        return [table], [0] * cfg.num_hidden_layers
    types = list(cfg.layer_types[:cfg.num_hidden_layers])
    kinds = sorted(set(types))
    tables = [(rotary.rope_type.get(t), getattr(rotary, f"{t}_inv_freq"),
               float(getattr(rotary, f"{t}_attention_scaling"))) for t in kinds]
    return tables, [kinds.index(t) for t in types]


def unsupported_reason(model) -> str | None:
    """None if `model` can run on the fast backend, else why not (the eager engine then runs it)."""
    kind = model.config.model_type
    if kind in WHY_NOT:
        return WHY_NOT[kind]
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not one of {SUPPORTED}"
    cfg, base = text_parts(model)
    if activation_of(cfg) not in ("silu", "gelu_pytorch_tanh"):
        return f"activation {activation_of(cfg)!r} is not silu or gelu_pytorch_tanh"
    types = getattr(cfg, "layer_types", None) or ()
    if any(t not in ATTENTION_TYPES for t in types):
        return f"layer types {sorted(set(types) - set(ATTENTION_TYPES))} are not implemented (only {ATTENTION_TYPES})"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping (attn_logit_softcapping) is not implemented"
    if getattr(cfg, "use_bidirectional_attention", False):
        return "bidirectional attention is not a causal decoder"
    tables, _ = rope_tables(base.rotary_emb, cfg)
    head_dim = base.layers[0].self_attn.q_proj.weight.shape[0] // cfg.num_attention_heads
    for rope_type, inv_freq, _ in tables:
        if rope_type not in STATIC_ROPE:
            return f"rope type {rope_type!r} is not one of {STATIC_ROPE}"
        if 2 * inv_freq.numel() != head_dim:
            return "partial rotary embeddings (RoPE on part of each head) are not implemented"
    return None


@dataclass
class Weights:
    """A model as the fast decoder runs it: plain tensors and per-layer dicts."""

    family: Family
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    embed: torch.Tensor
    embed_scale: torch.Tensor | None  # Gemma: sqrt(hidden_size), rounded to the embedding dtype as HF does
    ropes: list[tuple[torch.Tensor, float]]  # (float32 inv_freq, attention scaling) per distinct table
    layers: list[dict]
    norm: torch.Tensor
    lm_head: torch.Tensor
    logit_softcap: float | None


def read_weights(hf_model) -> Weights:
    cfg, base = text_parts(hf_model)
    fam = family_of(cfg)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = base.layers[0].self_attn.q_proj.weight.shape[0] // heads
    tables, rope_of_layer = rope_tables(base.rotary_emb, cfg)
    windows = layer_windows(cfg)

    def norm(module_or_none):
        return None if module_or_none is None else fam.norm_weight(module_or_none.weight)

    layers = []
    for i, layer in enumerate(base.layers):
        att, mlp = layer.self_attn, layer.mlp
        pre_attn, post_attn, pre_mlp, post_mlp = (norm(getattr(layer, n)) if n else None for n in fam.norms)
        attn_kw = {"f32": fam.norm_f32}
        if fam.qk_norm == "head":  # one [heads + kv, head_dim] weight: q and k heads normed in one call
            attn_kw["qk_norm"] = torch.cat([norm(att.q_norm).expand(heads, head_dim),
                                            norm(att.k_norm).expand(kv, head_dim)])
        elif fam.qk_norm == "all":
            attn_kw["q_norm"], attn_kw["k_norm"] = norm(att.q_norm), norm(att.k_norm)
        layers.append({
            "ln1": pre_attn, "ln2": pre_mlp,
            "qkv": fuse_linears(att, "_distill_qkv", [att.q_proj, att.k_proj, att.v_proj]),
            "o": (att.o_proj.weight, att.o_proj.bias),
            "gate_up": fuse_linears(mlp, "_distill_gate_up", [mlp.gate_proj, mlp.up_proj]),
            "down": (mlp.down_proj.weight, mlp.down_proj.bias),
            "attn_kw": attn_kw,
            "mlp_kw": {"f32": fam.norm_f32, "post_attn": post_attn, "post_mlp": post_mlp,
                       "gelu": fam.gelu},
            "window": windows[i],
            "rope": rope_of_layer[i],
        })
    embed = base.embed_tokens.weight
    scale = base.embed_tokens.embed_scale.to(embed.dtype) if fam.embed_scaled else None
    return Weights(family=fam, eps=cfg.rms_norm_eps, heads=heads, kv_heads=kv, head_dim=head_dim, embed=embed,
                   embed_scale=scale, ropes=[(inv.float(), scaling) for _, inv, scaling in tables], layers=layers,
                   norm=norm(base.norm), lm_head=hf_model.get_output_embeddings().weight,
                   logit_softcap=getattr(cfg, "final_logit_softcapping", None))
