"""The fast decoder's layers as pure functions of tensors (weights are arguments), and the
q/k/v and gate/up weight fusion they run on.

Pure so that one `torch.compile` serves every layer of every model of the same shapes, and so
that the eager functions stay the reference the compiled ones are tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, f32: bool = False) -> torch.Tensor:
    """RMSNorm as Hugging Face does it: normalise in float32, then scale in the model's dtype
    (Llama, Qwen) or, with `f32`, scale in float32 and cast (Olmo; Gemma, whose weight is
    passed as 1 + w). A None weight is a norm the family does not have: x unchanged."""
    if weight is None:
        return x
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * weight).to(x.dtype) if f32 else weight * normed.to(x.dtype)


def fuse_linears(owner, name: str, linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum(out), in] weight for several nn.Linear that read the same input (q/k/v, gate/up).

    One GEMM instead of three or two. The Linear modules are re-pointed at views of the fused
    tensor, so no weight is held twice and the Hugging Face model keeps working unchanged.
    """
    cached = getattr(owner, name, None)
    if cached is not None and cached[0].data_ptr() == linears[0].weight.data_ptr():
        return cached
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        has_bias = all(lin.bias is not None for lin in linears)
        bias = torch.cat([lin.bias for lin in linears]) if has_bias else None
        offset = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = weight[offset:offset + rows]
            if has_bias:
                lin.bias.data = bias[offset:offset + rows]
            offset += rows
    object.__setattr__(owner, name, (weight, bias))  # a plain attribute, not a registered parameter
    return weight, bias


def linear_add(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x + h @ weight.T as one GEMM with the residual in its epilogue."""
    if bias is not None:
        return x + F.linear(h, weight, bias)
    return torch.addmm(x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), weight.t()).view(x.shape)


def attention_in(x, ln1, w_qkv, b_qkv, cos, sin_signed, heads: int, kv: int, d: int, eps: float,
                 f32: bool = False, qk_norm=None, q_norm=None, k_norm=None):
    """Normed input -> rotated q [.., heads, d] and k [.., kv, d], and v [.., kv, d] (heads on dim -2).

    qk_norm: a [heads + kv, d] weight normalising each q and k head before RoPE (Qwen3, Gemma-3);
    q_norm, k_norm: weights normalising the whole projected q and k (Olmo2/3). Where cos is float32
    and the model is not (Olmo), q and k are rotated in float32 and cast back, as HF does.
    """
    qkv = F.linear(rms_norm(x, ln1, eps, f32), w_qkv, b_qkv)
    split = (heads + kv) * d
    qk = qkv[..., :split]
    if q_norm is not None:
        q, k = qk[..., :heads * d], qk[..., heads * d:]
        qk = torch.cat([rms_norm(q, q_norm, eps, f32), rms_norm(k, k_norm, eps, f32)], -1)
    qk = qk.unflatten(-1, (heads + kv, d))
    if qk_norm is not None:
        qk = rms_norm(qk, qk_norm, eps, f32)
    # rotate_half(x) == roll(x, d/2) * [-1]*d/2 + [+1]*d/2 (the sign is folded into sin_signed)
    rot = qk.to(cos.dtype)
    qk = torch.addcmul(rot * cos, rot.roll(d // 2, dims=-1), sin_signed).to(qkv.dtype)
    return qk[..., :heads, :], qk[..., heads:, :], qkv[..., split:].unflatten(-1, (kv, d))


def decode_attention_in(x, ln1, w_qkv, b_qkv, cos, sin_signed, heads: int, kv: int, d: int, eps: float,
                        k_cache, v_cache, rows, lengths, **family):
    """attention_in for one token per row, writing k and v into the cache at column lengths[b];
    returns q. Compiled, the cache write is part of the RoPE kernel (Inductor scatters in place)
    instead of two index_put kernels per layer."""
    q, k, v = attention_in(x, ln1, w_qkv, b_qkv, cos, sin_signed, heads, kv, d, eps, **family)
    k_cache[rows, :, lengths] = k
    v_cache[rows, :, lengths] = v
    return q


def paged_decode_attention_in(x, ln1, w_qkv, b_qkv, cos, sin_signed, heads: int, kv: int, d: int, eps: float,
                              k_pool, v_pool, addr, **family):
    """decode_attention_in for a paged cache: k and v go to physical columns `addr` of the pools
    [columns, kv, d] (distill.decoding.paged); returns q."""
    q, k, v = attention_in(x, ln1, w_qkv, b_qkv, cos, sin_signed, heads, kv, d, eps, **family)
    k_pool.index_copy_(0, addr, k)
    v_pool.index_copy_(0, addr, v)
    return q


def attention_out_and_mlp(x, o, w_o, b_o, ln2, w_gate_up, b_gate_up, w_down, b_down, eps: float,
                          f32: bool = False, post_attn=None, post_mlp=None, gelu: bool = False):
    """Residual + o_proj(attention output), then residual + gated MLP (SiLU, or GELU-tanh).

    post_attn / post_mlp: norms of each sublayer's output before its residual add (Gemma-3, Olmo2/3);
    without them the residual add is the GEMM's epilogue.
    """
    if post_attn is None:
        x = linear_add(x, o, w_o, b_o)
    else:
        x = x + rms_norm(F.linear(o, w_o, b_o), post_attn, eps, f32)
    gate, up = F.linear(rms_norm(x, ln2, eps, f32), w_gate_up, b_gate_up).chunk(2, dim=-1)
    h = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    if post_mlp is None:
        return linear_add(x, h, w_down, b_down)
    return x + rms_norm(F.linear(h, w_down, b_down), post_mlp, eps, f32)


def layer_functions(compile_layers: bool):
    """The per-layer pieces around attention (static- and paged-cache input, output + MLP), eager or
    torch.compile'd.

    Compiled, Inductor fuses the small kernels between the GEMMs (RMSNorm, RoPE, the K/V cache
    write, SiLU * up, the residual adds) that a decode step otherwise launches one by one: ~20 per layer, which
    CUDA graphs make cheap to launch but not free. One compiled graph serves every layer of
    every model of the same shapes and family quirks (weights are inputs, not constants).
    """
    return compiled_layer_functions() if compile_layers else (decode_attention_in, paged_decode_attention_in,
                                                              attention_out_and_mlp)


@functools.cache
def compiled_layer_functions():
    from distill.decoding.compiled import CompiledOrEager

    return (CompiledOrEager(decode_attention_in, "the decode layers' attention input"),
            CompiledOrEager(paged_decode_attention_in, "the decode layers' attention input (paged cache)"),
            CompiledOrEager(attention_out_and_mlp, "the decode layers' output and MLP"))
