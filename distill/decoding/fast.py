"""The fast decoding backend: Llama, Mistral, Qwen2/3, Gemma-3 and Olmo2/3.

A compact decoder in the spirit of nanoGPT/litgpt that reuses the Hugging Face model's weight
tensors (nothing is copied): RMSNorm, RoPE (the HF module's own inv_freq, so llama3/yarn
scaling come for free), grouped-query attention, a gated MLP. Each family's quirks (q/k norms,
post-sublayer norms, Gemma's (1 + w) norm and scaled embeddings, per-layer sliding windows and
RoPE tables) are read from its config by `distill.decoding.families`; per-layer differences live
in each layer's dict.

What makes it fast on a GPU:
- a fixed-shape KV cache: row b writes its next key/value at (logical) column lengths[b] and
  attends to columns <= lengths[b], so rows at different positions share one fixed-shape step
  and a refilled row simply starts again at column 0 (a sliding-window layer keeps a full-length
  cache too and masks what its window no longer sees). Paged (the engine's default,
  `distill.decoding.paged`): one pool of blocks per layer, a block table shared by the models,
  blocks handed out between steps as rows grow; static: [batch, kv_heads, capacity, head_dim]
  per layer, prompt + max_new_tokens columns per row whatever the row uses;
- that fixed-shape step, for both models at once, is captured once as a CUDA graph and
  replayed every token (one launch instead of ~1,000 kernel launches);
- decode-time GQA folds the query heads of a KV group into the query-length axis, so the
  cache is read once per group without repeat_kv copies;
- few kernels per layer: q/k/v and gate/up as one GEMM each (the HF Linear modules are
  re-pointed at views of the fused weight, so nothing is stored twice; note that such a model
  then has shared-storage parameters), residual adds in the GEMM epilogue (addmm), RoPE on q
  and k together with a roll instead of neg + cat;
- the amateur on a second CUDA stream (`concurrent`), so that inside the graph one model's
  latency-bound kernels overlap the other's weight reads.
On CPU (tests, float32) the same code runs without graph capture and gives the eager
reference's greedy tokens. `cuda_graphs=False` is the fallback if capture misbehaves.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from distill.decoding.layers import attention_in, attention_out_and_mlp, layer_functions, rms_norm
from distill.decoding.families import SUPPORTED, read_weights, text_parts, unsupported_reason  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

ATTENTION_BUCKET = 256  # attention width grows in steps of this many cache columns (one CUDA graph each)
PAGE_SIZE = 128  # tokens per paged-cache block: FlexAttention's block size, so one mask block is one cache block


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


class FastPair:
    """The backend ContrastiveDecoder drives: all models step together, as one CUDA graph on GPU.

    Attention reads only the first `width` cache columns, where width is the smallest multiple
    of `bucket` above an upper bound of every row's length that the host keeps without asking
    the device (prompt length + steps since admission). One graph is captured per width, on
    first use, all sharing one memory pool; so short responses never pay for a long
    max_new_tokens.
    """

    def __init__(self, models, batch: int, capacity: int, cuda_graphs: bool = True, bucket: int | None = None,
                 compile_layers: bool = False, decode_attention: str = "sdpa", flex_fallback: bool = False,
                 concurrent: bool = False, kv_cache: str = "static", kv_blocks: int | None = None,
                 block_size: int | None = None):
        if decode_attention not in ("sdpa", "flex"):
            raise ValueError(f"decode_attention must be sdpa or flex, got {decode_attention!r}")
        if kv_cache not in ("static", "paged"):
            raise ValueError(f"kv_cache must be static or paged, got {kv_cache!r}")
        self.lms = [FastLM(m, compile_layers) for m in models]
        self.device = self.lms[0].embed.device
        self.block_size = block_size or PAGE_SIZE
        self.capacity = self.aligned_capacity(capacity, decode_attention)
        self.bucket = bucket or ATTENTION_BUCKET
        self.blocks = None  # the paged cache's block table (distill.decoding.paged), shared by the models
        if kv_cache == "paged":
            from distill.decoding.paged import BlockTable

            self.capacity, num_blocks = self.paged_geometry(capacity, decode_attention, self.block_size, batch,
                                                            kv_blocks)
            self.blocks = BlockTable(batch, num_blocks, self.block_size, self.capacity, self.device)
        # A pool with room for every row at full length ("fixed") is laid out as the static cache: the
        # same memory, and the same reads (a gather costs ~5 % of CoDIT tokens/s on CPU, BENCHMARKS.md).
        self.paged_layout = self.blocks is not None and not self.blocks.fixed
        if self.paged_layout and not (cuda_graphs and self.device.type == "cuda") and bucket is None:
            self.bucket = self.block_size  # no graph per width to keep: gather only the blocks rows reach
        for lm in self.lms:
            if self.paged_layout:
                lm.allocate_paged(self.blocks.num_blocks * self.block_size)
            else:
                lm.allocate(batch, self.capacity)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.rows = torch.arange(batch, device=self.device)
        self.columns = torch.arange(self.capacity, device=self.device)
        self.bound = [0] * batch  # host-side upper bound of each row's cache length
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[int, tuple] = {}
        self.pool = None
        self.active = None
        self.post_step = None  # the engine's token choice, run right after the step (inside the graph)
        self.flex = None
        if decode_attention == "flex":  # one block mask per distinct sliding window (None: full), shared by the models
            from distill.decoding.flex import FlexDecodeAttention

            windows = {w for lm in self.lms for w in lm.windows}
            table = self.blocks if self.paged_layout else None
            self.flex = {w: FlexDecodeAttention(self.lengths, self.capacity, w, paged=table) for w in windows}
            self.bucket = self.capacity  # one width, one graph: the mask, not the width, bounds the reads
        # Eager FlexAttention is correct but dense and slow: where its compile fails (a head_dim
        # under 16 on a GPU, no Triton), an "auto" choice of flex falls back to SDPA instead.
        self.flex_fallback = flex_fallback
        # Each model after the first steps on its own CUDA stream: the models are independent until
        # the token choice, so in the graph one model's latency-bound kernels (norms, attention,
        # small GEMMs) can overlap the other's weight reads. A no-op on CPU.
        on_gpu = concurrent and self.device.type == "cuda"
        self.side_streams = [torch.cuda.Stream(self.device) for _ in self.lms[1:]] if on_gpu else []

    def prepare(self, tokens: torch.Tensor | None = None, active: torch.Tensor | None = None,
                post_step=None) -> bool:
        """Bind the engine's state and capture every attention width's graph up front.

        With `post_step` (the engine's sampling and bookkeeping, all on device), each decode
        call runs step + post_step as one graph: no per-token kernel launches at all. Called
        before any row is admitted, so the warm-up runs on all-inactive rows change nothing.
        Returns True when decode() runs post_step itself.
        """
        if post_step is not None and (tokens is None or active is None):
            raise ValueError("post_step needs the engine's tokens and active tensors")
        self.tokens = self.tokens if tokens is None else tokens
        self.active, self.post_step = active, post_step
        if self.flex is not None and self.flex_fallback:
            self._step(self.capacity)  # compiles FlexAttention now (no row is live: changes nothing)
            from distill.decoding.flex import flex_compile_failed

            if flex_compile_failed():
                log.warning("FlexAttention decode did not compile; using SDPA decode attention instead")
                self.flex, self.bucket = None, ATTENTION_BUCKET
        if self.use_graphs:
            for width in sorted({min(w, self.capacity) for w in range(self.bucket, self.capacity + self.bucket, self.bucket)}):
                if not self._try_capture(width):
                    break
        return post_step is not None

    @staticmethod
    def aligned_capacity(capacity: int, decode_attention: str = "sdpa") -> int:
        """Cache columns per row of a static cache: flex needs whole 128-column blocks and sdpa's
        kernels like 64-aligned widths."""
        align = 128 if decode_attention == "flex" else 64
        return -(-capacity // align) * align

    @classmethod
    def paged_geometry(cls, capacity: int, decode_attention: str, block_size: int, rows: int,
                       kv_blocks: int | None) -> tuple[int, int]:
        """(columns per row, blocks in the pool) of a paged cache. Without a budget, or with one that
        holds every row at full length, the pool is "fixed" and laid out as the static cache (its
        columns; its blocks are bookkeeping); else rows hold whole blocks."""
        static = cls.aligned_capacity(capacity, decode_attention)
        full = rows * -(-static // block_size) + 1  # + the scratch block
        if kv_blocks is None or kv_blocks >= full:
            return static, full
        return -(-capacity // block_size) * block_size, kv_blocks

    # --- the paged cache's admission and growth (no-ops for a static cache) -------------------

    def admit(self, slot: int, columns: int, lookahead: int) -> bool:
        """Room for a row of `columns` tokens plus its next `lookahead` in slot `slot`: take it or say no."""
        return self.blocks is None or self.blocks.admit(slot, columns, lookahead)

    def reserve(self, lookahead: int) -> list[int]:
        """Blocks for the next `lookahead` tokens of every live row; returns the slots preempted for them."""
        if self.blocks is None:
            return []
        preempted = self.blocks.reserve(lookahead, {s: self.bound[s] for s in self.blocks.live()})
        for s in preempted:
            self.bound[s] = 0
        return preempted

    @torch.no_grad()
    def _step(self, width: int) -> list[torch.Tensor]:
        for f in (self.flex or {}).values():
            f.update()
        paged = None
        if self.paged_layout:  # once per step, for every model and layer: they share the table
            paged = (self.blocks.addresses(self.rows, self.lengths),
                     None if self.flex is not None else self.blocks.gather_index(width))
        logits = self._decode_models(width, paged)
        if self.post_step is not None:
            self.lengths += self.active.long()  # finished rows stay put, overwriting one junk column
            self.post_step(logits)
        return logits

    def _decode_models(self, width: int, paged: tuple | None = None) -> list[torch.Tensor]:
        def decode(i: int) -> torch.Tensor:
            return self.lms[i].decode(self.tokens, self.lengths, self.rows, self.columns[:width], self.flex, paged)

        if not self.side_streams:
            return [decode(i) for i in range(len(self.lms))]
        main = torch.cuda.current_stream(self.device)
        logits = [None] * len(self.lms)
        for i, stream in enumerate(self.side_streams, 1):  # fork: each side stream starts after main's work so far
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                logits[i] = decode(i)
        logits[0] = decode(0)
        for i, stream in enumerate(self.side_streams, 1):  # join: the token choice needs every model's logits
            main.wait_stream(stream)
            if not torch.cuda.is_current_stream_capturing():  # eager: do not let the allocator reuse them early
                logits[i].record_stream(main)
        return logits

    def _capture(self, width: int) -> tuple:
        # Warm up on a side stream (allocator, cuBLAS workspaces), then capture. Warm-up writes
        # K/V at column lengths[b], the very column the next real step overwrites: harmless.
        with torch.cuda.device(self.device):  # streams and graphs live on the models' GPU, not cuda:0
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(width)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._step(width)
            torch.cuda.synchronize()
        self.pool = graph.pool()
        self.graphs[width] = (graph, logits)
        return self.graphs[width]

    def _try_capture(self, width: int) -> bool:
        try:
            self._capture(width)
            return True
        except torch.cuda.OutOfMemoryError:
            raise  # a batch too large must say so, not fall back to a slower path
        except Exception as exc:  # noqa: BLE001 - any other capture failure: the same step without graphs
            log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
            self.use_graphs = False
            return False

    @torch.no_grad()
    def prefill(self, slots: list[int], prompts: list[list[int]], max_tokens: int = 8192) -> list[torch.Tensor]:
        """Prompts into cache rows `slots`, in chunks of about `max_tokens` (bounds activation memory)."""
        width = max(len(p) for p in prompts)
        step = max(1, max_tokens // width)
        chunks = [self._prefill(slots[i:i + step], prompts[i:i + step]) for i in range(0, len(slots), step)]
        return [torch.cat(parts) for parts in zip(*chunks)]

    def _prefill(self, slots: list[int], prompts: list[list[int]]) -> list[torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
            self.bound[slots[i]] = len(p)
        ids = ids.to(self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        slots_t = torch.tensor(slots, device=self.device)
        paged = None
        if self.blocks is not None:
            for s, p in zip(slots, prompts):
                if not self.blocks.grow(s, len(p)):  # the engine admits only rows that fit (admit())
                    raise RuntimeError(f"no free cache blocks for a {len(p)}-token prompt in slot {s}")
        if self.paged_layout:
            pos = torch.arange(width, device=self.device)
            real = pos[None, :] < lengths[:, None]
            paged = (real, self.blocks.addresses(slots_t[:, None].expand(-1, width), pos.expand(len(slots), -1))[real])
        logits = [lm.prefill(slots_t, ids, lengths, paged).float() for lm in self.lms]
        self.lengths[slots_t] = lengths
        return logits

    def release(self, slots: list[int]) -> None:
        """Rows the engine is done with stop counting towards the attention width."""
        for s in slots:
            self.bound[s] = 0
            if self.blocks is not None:
                self.blocks.release(s)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        if tokens is not self.tokens:
            self.tokens.copy_(tokens)
        width = min(self.capacity, -(-(max(self.bound) + 1) // self.bucket) * self.bucket)
        # Graphs are captured only in prepare(): a capture's warm-up mid-run would run post_step.
        if self.use_graphs and width in self.graphs:
            graph, logits = self.graphs[width]
            graph.replay()
        else:
            logits = self._step(width)
        if self.post_step is None:
            self.lengths += active.long()  # finished rows stay put and keep overwriting one junk column
        self.bound = [min(b + 1, self.capacity - 1) for b in self.bound]
        return logits
