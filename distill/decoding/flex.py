"""Decode attention that reads only each row's live part of the static KV cache (FlexAttention).

The fast engine's default decode attention (SDPA with an additive mask) reads every row's cache
up to one shared width: the longest live row's length, rounded up to a bucket. In a synthesis run
with long, uneven responses that width sits near max_new_tokens while most rows are far shorter,
and at batch 128 a Mistral-7B pair's caches cost ~34 MB per column: at 2,048 columns, more bytes
per step than the two models' weights. FlexAttention's block-sparse kernels skip the cache blocks
past each row's length instead: the block mask lists, per row, the blocks from the first one a
sliding window still sees (0 without a window) to length // BLOCK, and a mask_mod masks the
columns outside that range inside the first and the last block.

Everything here is device tensors, built once per step inside the engine's CUDA graph, so one
graph serves every length (no per-width graphs). DecodingConfig.decode_attention picks it: by
default on a GPU, with SDPA as the fallback where it does not compile.
"""

from __future__ import annotations

import functools
import inspect

import torch

BLOCK = 128  # cache columns per block: FlexAttention's default block size


@functools.cache
def _flex_attention():
    """FlexAttention runs fused only when compiled (eagerly it is correct, dense and slow)."""
    from torch.nn.attention.flex_attention import flex_attention

    from distill.decoding.compiled import CompiledOrEager

    return CompiledOrEager(flex_attention, "FlexAttention decode")


def flex_compile_failed() -> bool:
    """True once FlexAttention's compile has failed in this process (it then runs eagerly)."""
    return _flex_attention().failed


class FlexDecodeAttention:
    """Per-step block mask over a [batch, kv_heads, capacity, head_dim] cache, and the attention call.

    `lengths` is the engine's device tensor of cache lengths (read at every step, so the mask
    follows the rows as they grow and are refilled): row b attends to columns 0..lengths[b].
    """

    def __init__(self, lengths: torch.Tensor, capacity: int, window: int | None, paged=None):
        """`paged`: a `distill.decoding.paged.BlockTable`; the cache is then its pool, read as [1,
        kv_heads, blocks * block_size, d], the mask lists each row's physical blocks and the mask_mod maps a
        physical column back to the row's logical one (the conversion torch's PagedAttention does)."""
        from torch.nn.attention.flex_attention import BlockMask

        block = paged.block_size if paged is not None else BLOCK
        if paged is None and capacity % BLOCK:
            raise ValueError(f"capacity {capacity} must be a multiple of {BLOCK}")
        self.lengths, self.window, self.paged, self.block = lengths, window, paged, block
        # logical blocks per row, and the cache's (physical) length
        self.blocks = paged.max_blocks if paged is not None else capacity // BLOCK
        self.capacity = paged.num_blocks * block if paged is not None else capacity
        self.block_ids = torch.arange(self.blocks, dtype=torch.int32, device=lengths.device)
        self.all_blocks = self.block_ids.expand(lengths.shape[0], -1).contiguous()  # no window: every row

        def visible(b, col):
            seen = col <= lengths[b]
            return seen if window is None else seen & (col > lengths[b] - window)

        if paged is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return visible(b, kv_idx)
        else:
            owner, logical = paged.owner, paged.logical  # physical block -> owning slot, its index there

            def mask_mod(b, h, q_idx, kv_idx):
                page = kv_idx // block
                return (owner[page] == b) & visible(b, logical[page] * block + kv_idx % block)

        self.mask_mod = mask_mod
        # Decoding needs no backward: skip the transposed (query-block) indices where torch can.
        self._extra = {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(
            BlockMask.from_kv_blocks).parameters else {}
        self._from_kv_blocks = BlockMask.from_kv_blocks
        self.block_mask = None
        self.update()

    def update(self) -> None:
        """The block mask for the current lengths (call once per step, before the layers)."""
        block = self.block
        last = torch.div(self.lengths, block, rounding_mode="floor").clamp_(max=self.blocks - 1)
        if self.window is None:  # blocks 0..last: the same index list every step
            count, indices = last + 1, self.all_blocks
        else:  # from the block of the first column the window sees (length - window + 1)
            first = torch.div((self.lengths - self.window + 1).clamp_(min=0), block, rounding_mode="floor")
            first = torch.minimum(first, last)
            count = last - first + 1
            # row b lists blocks first[b], first[b] + 1, ...; the entries past count[b] are never read
            indices = (first[:, None].to(torch.int32) + self.block_ids).clamp_(max=self.blocks - 1)
        if self.paged is not None:  # logical -> physical blocks; as wide as the pool (the mask's dense form)
            physical = self.paged.table.gather(1, indices.long()).to(torch.int32)
            indices = torch.nn.functional.pad(physical, (0, self.paged.num_blocks - self.blocks))
        self.block_mask = self._from_kv_blocks(count.to(torch.int32)[:, None, None], indices[:, None, None, :],
                                               BLOCK_SIZE=block, mask_mod=self.mask_mod,
                                               seq_lengths=(1, self.capacity), **self._extra)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
        """q [B, heads, d] (one token per row) -> attention output [B, heads * d]; scale None: d ** -0.5.

        The cache: [B, kv_heads, capacity, d], or a paged pool [columns, kv_heads, d] shared by every
        row (read as [1, kv_heads, columns, d], a strided view)."""
        batch, heads, d = q.shape
        if k_cache.dim() == 3:
            k_cache, v_cache = k_cache.permute(1, 0, 2)[None], v_cache.permute(1, 0, 2)[None]
        o = _flex_attention()(q[:, :, None, :], k_cache, v_cache, block_mask=self.block_mask, scale=scale,
                              enable_gqa=heads != k_cache.shape[1])
        return o.reshape(batch, heads * d)
