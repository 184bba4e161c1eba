"""The fast decoder's layers as pure functions of tensors (weights are arguments), and the
q/k/v and gate/up weight fusion they run on.

Pure so that one `torch.compile` serves every layer of every model of the same shapes, and so
that the eager functions stay the reference the compiled ones are tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As Hugging Face does it: normalise in float32, scale in the model's dtype.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


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


def attention_in(x, ln1, w_qkv, b_qkv, cos, sin_signed, heads: int, kv: int, d: int, eps: float):
    """Normed input -> rotated q [.., heads, d] and k [.., kv, d], and v [.., kv, d] (heads on dim -2)."""
    qkv = F.linear(rms_norm(x, ln1, eps), w_qkv, b_qkv)
    qk = qkv[..., :(heads + kv) * d].unflatten(-1, (heads + kv, d))
    # rotate_half(x) == roll(x, d/2) * [-1]*d/2 + [+1]*d/2 (the sign is folded into sin_signed)
    qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin_signed)
    return qk[..., :heads, :], qk[..., heads:, :], qkv[..., (heads + kv) * d:].unflatten(-1, (kv, d))


def decode_attention_in(x, ln1, w_qkv, b_qkv, cos, sin_signed, heads: int, kv: int, d: int, eps: float,
                         k_cache, v_cache, rows, lengths):
    """attention_in for one token per row, writing k and v into the cache at column lengths[b];
    returns q. Compiled, the cache write is part of the RoPE kernel (Inductor scatters in place)
    instead of two index_put kernels per layer."""
    q, k, v = attention_in(x, ln1, w_qkv, b_qkv, cos, sin_signed, heads, kv, d, eps)
    k_cache[rows, :, lengths] = k
    v_cache[rows, :, lengths] = v
    return q


def attention_out_and_mlp(x, o, w_o, b_o, ln2, w_gate_up, b_gate_up, w_down, b_down, eps: float):
    """Residual + o_proj(attention output), then residual + SwiGLU MLP."""
    x = linear_add(x, o, w_o, b_o)
    gate, up = F.linear(rms_norm(x, ln2, eps), w_gate_up, b_gate_up).chunk(2, dim=-1)
    return linear_add(x, F.silu(gate) * up, w_down, b_down)


def layer_functions(compile_layers: bool):
    """The two per-layer pieces around attention, eager or torch.compile'd.

    Compiled, Inductor fuses the small kernels between the GEMMs (RMSNorm, RoPE, the K/V cache
    write, SiLU * up, the residual adds) that a decode step otherwise launches one by one: ~20 per layer, which
    CUDA graphs make cheap to launch but not free. One compiled graph serves every layer of
    every model of the same shapes (weights are inputs, not constants).
    """
    return compiled_layer_functions() if compile_layers else (decode_attention_in, attention_out_and_mlp)


@functools.cache
def compiled_layer_functions():
    from distill.compiled import CompiledOrEager

    return (CompiledOrEager(decode_attention_in, "the decode layers' attention input"),
            CompiledOrEager(attention_out_and_mlp, "the decode layers' output and MLP"))
