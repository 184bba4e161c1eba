"""The fast decoding backend: Llama, Mistral, Qwen2/3, Gemma-3 and Olmo2/3. Each model is a
`distill.decoding.model.FastLM` (a compact decoder over the Hugging Face model's own weight
tensors); `FastPair` steps them together.

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

from distill.decoding.families import SUPPORTED, text_parts, unsupported_reason  # noqa: F401 (re-exported)
from distill.decoding.model import FastLM  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

ATTENTION_BUCKET = 256  # attention width grows in steps of this many cache columns (one CUDA graph each)
PAGE_SIZE = 128  # tokens per paged-cache block: FlexAttention's block size, so one mask block is one cache block


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
            from distill.decoding.paged import BlockTable, geometry

            self.capacity, num_blocks = geometry(capacity, self.capacity, self.block_size, batch, kv_blocks)
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
