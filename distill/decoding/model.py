"""One model of the fast decoding backend as plain tensors plus its KV cache: Llama, Mistral,
Qwen2/3, Gemma-3 and Olmo2/3, readable top to bottom (the pair that steps two of them, CUDA graphs
and all, is `distill.decoding.fast`).

A compact decoder in the spirit of nanoGPT/litgpt that reuses the Hugging Face model's weight
tensors (nothing is copied): RMSNorm, RoPE (the HF module's own inv_freq, so llama3/yarn
scaling come for free), grouped-query attention, a gated MLP. Each family's quirks (q/k norms,
post-sublayer norms, Gemma's (1 + w) norm and scaled embeddings, per-layer sliding windows and
RoPE tables) are read from its config by `distill.decoding.families`; per-layer differences live
in each layer's dict. The cache is static [batch, kv_heads, capacity, head_dim] per layer, or a
paged pool [columns, kv_heads, head_dim] (`distill.decoding.paged`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.decoding.families import read_weights
from distill.decoding.layers import attention_in, attention_out_and_mlp, layer_functions, rms_norm


class FastLM:
    """One model as plain tensors plus a static KV cache."""

    def __init__(self, hf_model, compile_layers: bool = False):
        self.decode_attention_in, self.paged_attention_in, self.attention_out_and_mlp = layer_functions(compile_layers)
        w = read_weights(hf_model)
        self.family, self.eps, self.layers = w.family, w.eps, w.layers
        self.heads, self.kv_heads, self.head_dim = w.heads, w.kv_heads, w.head_dim
        self.embed, self.embed_scale, self.norm, self.lm_head = w.embed, w.embed_scale, w.norm, w.lm_head
        self.logit_softcap, self.attn_scale = w.logit_softcap, w.family.attn_scale
        self.ropes = w.ropes
        self.windows = {p["window"] for p in self.layers}  # None: full attention
        half = self.head_dim // 2
        # rotate_half(x) == roll(x, half) * [-1]*half + [+1]*half: one copy instead of neg + cat
        self.rot_sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(self.embed.device)
        # Olmo applies RoPE in float32 (its cos/sin are not cast to the model dtype)
        self.rope_dtype = torch.float32 if self.family.rope_f32 else self.embed.dtype
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    def allocate(self, batch: int, capacity: int) -> None:
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        self.k_cache = [self.embed.new_zeros(shape) for _ in self.layers]
        self.v_cache = [self.embed.new_zeros(shape) for _ in self.layers]

    def allocate_paged(self, columns: int) -> None:
        """A paged pool [columns, kv_heads, head_dim] per layer (distill.decoding.paged)."""
        shape = (columns, self.kv_heads, self.head_dim)
        self.k_cache = [self.embed.new_zeros(shape) for _ in self.layers]
        self.v_cache = [self.embed.new_zeros(shape) for _ in self.layers]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        return x if self.embed_scale is None else x * self.embed_scale

    def _cos_sin(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, signed sin) [.., 1, d] per RoPE table, broadcast over heads."""
        out = []
        for inv_freq, scale in self.ropes:
            freqs = positions.float()[..., None] * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * scale).to(self.rope_dtype)
            sin = (emb.sin() * scale).to(self.rope_dtype) * self.rot_sign.to(self.rope_dtype)
            out.append((cos[..., None, :], sin[..., None, :]))
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(rms_norm(x, self.norm, self.eps, self.family.norm_f32), self.lm_head)
        if self.logit_softcap is not None:  # Gemma's final soft-capping, in the logits' dtype as HF does it
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _out_mlp(self, x: torch.Tensor, o: torch.Tensor, p: dict, fn=attention_out_and_mlp) -> torch.Tensor:
        return fn(x, o, *p["o"], p["ln2"], *p["gate_up"], *p["down"], self.eps, **p["mlp_kw"])

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor,
               columns: torch.Tensor, flex: dict | None = None, paged: tuple | None = None) -> torch.Tensor:
        """One token per row: write K/V at column lengths[b], attend to columns <= lengths[b].

        `columns` is arange(width): attention reads only the first width columns of the cache,
        so every row must have lengths[b] < width. With `flex` ({window: FlexDecodeAttention}
        over this model's cache length) each row reads only its own live blocks instead, and
        `columns` is unused. `paged` = (addresses [B], gather [B, width] or None): the cache is a
        paged pool; row b writes at physical column addresses[b] and, without flex, its logical
        columns 0..width-1 are gathered from physical columns gather[b].
        """
        batch, heads, kv, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        width = columns.shape[0]
        x = self._embed(tokens)  # [B, hidden]
        ropes = self._cos_sin(lengths)
        # an additive mask per window, made once per step (a bool one would be converted in every layer)
        if flex is None:
            biases = {w: self._decode_bias(columns, lengths, w, x.dtype) for w in self.windows}
        for p, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            cos, sin = ropes[p["rope"]]
            if paged is None:
                q = self.decode_attention_in(x, p["ln1"], *p["qkv"], cos, sin, heads, kv, d, self.eps, kc, vc, rows,
                                             lengths, **p["attn_kw"])
                keys, values = (None, None) if flex is not None else (kc[:, :, :width], vc[:, :, :width])
            else:
                q = self.paged_attention_in(x, p["ln1"], *p["qkv"], cos, sin, heads, kv, d, self.eps, kc, vc,
                                            paged[0], **p["attn_kw"])
                # each row's logical columns, gathered: [B * width, kv, d] -> [B, kv, width, d]
                if flex is None:
                    keys, values = (c.index_select(0, paged[1].view(-1)).view(batch, -1, kv, d).transpose(1, 2)
                                    for c in (kc, vc))
            if flex is not None:
                o = flex[p["window"]].attend(q, kc, vc, scale=self.attn_scale)
            else:  # query heads h*G..h*G+G-1 share kv head h: fold them into the query axis
                o = F.scaled_dot_product_attention(q.reshape(batch, kv, heads // kv, d), keys, values,
                                                   attn_mask=biases[p["window"]], scale=self.attn_scale)
            x = self._out_mlp(x, o.reshape(batch, heads * d), p, self.attention_out_and_mlp)
        return self._logits(x)

    @staticmethod
    def _decode_bias(columns, lengths, window: int | None, dtype) -> torch.Tensor:
        """[B, 1, 1, width], broadcast over kv heads and query groups. Column 0 is always visible."""
        visible = columns[None, :] <= lengths[:, None]
        if window is not None:
            visible &= columns[None, :] > lengths[:, None] - window
        bias = torch.zeros(visible.shape, dtype=dtype, device=lengths.device).masked_fill_(~visible, float("-inf"))
        return bias[:, None, None, :]

    def prefill(self, slots: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
                paged: tuple | None = None) -> torch.Tensor:
        """Right-padded prompts [k, T] into cache rows `slots`; returns the last real token's logits.

        Padding columns get junk K/V, but decode masks columns > lengths and overwrites them.
        `paged` = (real [k, T] bool, addresses [real.sum()]): a paged pool takes the real columns only.
        """
        k_rows, width = ids.shape
        heads, kv, d = self.heads, self.kv_heads, self.head_dim
        x = self._embed(ids)
        pos = torch.arange(width, device=ids.device)
        ropes = self._cos_sin(pos)  # [T, 1, d] against [k, T, heads, d]
        # a window mask only where the prompt is longer than the window; else plain causal
        masks = {w: (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - w)
                 for w in self.windows if w is not None and width > w}
        for p, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            cos, sin = ropes[p["rope"]]
            q, k, v = (t.transpose(1, 2) for t in attention_in(x, p["ln1"], *p["qkv"], cos, sin, heads, kv, d,
                                                                self.eps, **p["attn_kw"]))  # [k, heads, T, d]
            if paged is None:
                kc[slots, :, :width] = k
                vc[slots, :, :width] = v
            else:  # [k, T, kv, d] at the real columns -> the pool's physical columns
                kc.index_copy_(0, paged[1], k.transpose(1, 2)[paged[0]])
                vc.index_copy_(0, paged[1], v.transpose(1, 2)[paged[0]])
            mask = masks.get(p["window"])
            if mask is None:  # plain causal: no mask tensor and no K/V copies, so the flash kernel can run
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=self.attn_scale)
            else:
                rep = heads // kv
                o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                   attn_mask=mask, scale=self.attn_scale)
            x = self._out_mlp(x, o.transpose(1, 2).reshape(k_rows, width, heads * d), p)
        last = x[torch.arange(k_rows, device=ids.device), lengths - 1]
        return self._logits(last)
