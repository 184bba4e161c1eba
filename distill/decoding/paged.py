"""A paged KV cache for the fast engine: cache blocks handed out as rows grow, freed as they finish.

The static cache holds prompt + max_new_tokens columns per row whatever the row uses, so at a
4096-token cap the batch is bounded by the cap, not by the tokens rows really hold. Here each
model keeps, per layer, one pool of blocks [blocks * block_size, kv_heads, head_dim], token-major so
that gathering a row's columns for SDPA copies whole tokens (on CPU several times faster than a
head-major gather; FlexAttention reads the pool in place as a strided [1, kv_heads, columns, d]),
and ONE block table [rows, blocks per row] serves every model: expert and amateur hold the same
tokens at the same columns.
Row b's logical column c lives at physical column table[b, c // block_size] * block_size +
c % block_size.

Blocks are handed out on the host (a free list), between runs of decode steps: before each run of
`check_every` steps the engine reserves every live row's next `check_every` columns
(`reserve`), so the steps themselves (one CUDA graph) only read the table. Block 0 is scratch:
empty and released slots point there, so their junk writes land where no row reads. When blocks
run out, `reserve` returns the longest live rows to preempt (the engine recomputes them later);
`admit` refuses a row whose prompt does not fit, so the engine stops admitting instead of failing.
"""

from __future__ import annotations

import torch

from distill import DistillError

SCRATCH = 0  # the physical block empty slots write into


class BlockTable:
    """The host-side free list and the device-side block table shared by the models of a pair."""

    def __init__(self, rows: int, num_blocks: int, block_size: int, columns_per_row: int, device):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_blocks = self.blocks_for(columns_per_row)
        if num_blocks - 1 < self.max_blocks:
            raise DistillError(
                f"a paged KV cache of {num_blocks - 1} blocks of {block_size} tokens cannot hold one row of "
                f"{columns_per_row} tokens (prompt + max_new_tokens); lower max_new_tokens, or give the cache more "
                f"memory (kv_blocks, or a larger GPU)")
        self.table = torch.full((rows, self.max_blocks), SCRATCH, dtype=torch.long, device=device)
        # physical block -> the slot that owns it (-1: none) and its logical index there. FlexAttention's
        # mask_mod reads both: its kernels visit only the listed blocks, but its eager reference
        # evaluates the mask over every column, so a column is visible only to the row owning it.
        self.owner = torch.full((num_blocks,), -1, dtype=torch.long, device=device)
        self.logical = torch.zeros(num_blocks, dtype=torch.long, device=device)
        # A pool with room for every slot at full length (no budget, as on CPU) is "fixed": nothing can
        # be preempted, and the fast engine lays it out as the static cache (the same reads, no table
        # to follow); its blocks are then host bookkeeping alone.
        self.fixed = num_blocks - 1 >= rows * self.max_blocks
        self.free = [] if self.fixed else list(range(num_blocks - 1, SCRATCH, -1))  # pop(): the lowest first
        self.n_free = num_blocks - 1
        self.owned: list[list[int]] = [[] for _ in range(rows)]

    def blocks_for(self, columns: int) -> int:
        return -(-columns // self.block_size)

    @property
    def free_blocks(self) -> int:
        return self.n_free

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - self.n_free

    def live(self) -> list[int]:
        return [s for s, blocks in enumerate(self.owned) if blocks]

    def grow(self, slot: int, columns: int) -> bool:
        """Blocks for columns 0..columns-1 of `slot` (capped at a full row); False if they are not free."""
        want = min(self.blocks_for(columns), self.max_blocks)
        have = len(self.owned[slot])
        if want - have > self.n_free:
            return False
        if want > have:
            new = (list(range(1 + slot * self.max_blocks + have, 1 + slot * self.max_blocks + want)) if self.fixed
                   else [self.free.pop() for _ in range(want - have)])
            self.n_free -= len(new)
            self.owned[slot] += new
            if self.fixed:
                return True
            ids = torch.tensor(new, dtype=torch.long)
            self.table[slot, have:want] = ids.to(self.table.device)
            ids = ids.to(self.logical.device)
            self.logical[ids] = torch.arange(have, want, device=self.logical.device)
            self.owner[ids] = slot
        return True

    def release(self, slot: int) -> None:
        if self.owned[slot]:
            self.n_free += len(self.owned[slot])
            if not self.fixed:
                self.owner[torch.tensor(self.owned[slot], device=self.owner.device)] = -1
                self.free.extend(reversed(self.owned[slot]))
                self.table[slot] = SCRATCH
            self.owned[slot] = []

    def admit(self, slot: int, columns: int, lookahead: int = 0) -> bool:
        """Room for a new row of `columns` tokens and its next `lookahead`: take its blocks, or say no."""
        if min(self.blocks_for(columns + lookahead), self.max_blocks) > self.n_free:
            return False
        return self.grow(slot, columns)

    def reserve(self, lookahead: int, lengths: dict[int, int]) -> list[int]:
        """Blocks for the next `lookahead` columns of every live row (`lengths`: slot -> cache length).

        Where the free blocks do not cover them all, the longest rows are preempted (released here;
        the caller recomputes them later) until the rest fit. Returns the preempted slots.
        """
        if self.fixed:  # every slot's run of blocks is its own: nothing to hand out, nothing to preempt
            return []
        need = {s: min(self.blocks_for(n + lookahead), self.max_blocks) - len(self.owned[s])
                for s, n in lengths.items()}
        preempted = []
        by_length = sorted(lengths, key=lambda s: (-lengths[s], s))
        while sum(max(0, v) for v in need.values()) > self.n_free and len(need) > 1:
            victim = by_length.pop(0)
            need.pop(victim)
            self.release(victim)
            preempted.append(victim)
        for s, n in lengths.items():
            if s in need and not self.grow(s, n + lookahead):
                raise DistillError(f"internal: slot {s} cannot grow to {n + lookahead} columns with "
                                   f"{self.n_free} free blocks")
        return preempted

    def addresses(self, slots: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Physical columns of logical `columns` in rows `slots` (broadcast shapes)."""
        bs = self.block_size
        return self.table[slots, torch.div(columns, bs, rounding_mode="floor")] * bs + columns % bs

    def gather_index(self, width: int) -> torch.Tensor:
        """[rows, width] physical columns of every row's logical columns 0..width-1 (width <= a full row)."""
        rows = torch.arange(self.table.shape[0], device=self.table.device)
        return self.addresses(rows[:, None], torch.arange(width, device=self.table.device)[None, :])


# --- the pool's size, and what fits in GPU memory ---------------------------------------------

def geometry(capacity: int, static_columns: int, block_size: int, rows: int,
             kv_blocks: int | None) -> tuple[int, int]:
    """(columns per row, blocks in the pool) of a paged cache for rows of `capacity` tokens.

    Without a budget, or with one that holds every row at full length, the pool is "fixed" and laid
    out as the static cache (its `static_columns`; the blocks are bookkeeping); else rows hold whole
    blocks."""
    full = rows * -(-static_columns // block_size) + 1  # + the scratch block
    if kv_blocks is None or kv_blocks >= full:
        return static_columns, full
    return -(-capacity // block_size) * block_size, kv_blocks


def pool_blocks(models, capacity: int, static_columns: int, block_size: int, rows: int, kv_blocks: int | None,
                gpu: bool) -> int:
    """The pool for `rows` slots: `kv_blocks`, else on a GPU what free memory holds (no more than every
    row at full length needs), else room for every row at full length."""
    full = geometry(capacity, static_columns, block_size, rows, None)[1]
    if kv_blocks is not None or not gpu:
        return kv_blocks or full
    blocks = min(full, blocks_that_fit(models, block_size, rows))
    per_row = -(-capacity // block_size)
    if blocks - 1 < per_row:
        raise DistillError(f"no room in GPU memory for the KV cache of one row of {capacity} tokens ({per_row} "
                           f"blocks of {block_size}) beside the models; lower max_new_tokens or use a larger GPU")
    return blocks


RESERVE_FRACTION = 0.1  # of the GPU's memory, left to the allocator, CUDA graphs and kernels' workspaces


def kv_bytes_per_token(models) -> int:
    """Bytes one cached token takes across every model and layer, keys and values."""
    from distill.decoding.families import text_parts

    total = 0
    for m in models:
        cfg, base = text_parts(m)
        head_dim = base.layers[0].self_attn.q_proj.weight.shape[0] // cfg.num_attention_heads
        elem = next(m.parameters()).element_size()
        total += 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem
    return total


def row_temporaries(models) -> int:
    """Bytes per row outside the cache: float32 logits and the sampler's temporaries, per model."""
    from distill.decoding.families import text_parts

    return sum(16 * text_parts(m)[0].vocab_size * 4 for m in models)


def _spare_gpu_bytes(models) -> float:
    free, total = torch.cuda.mem_get_info(next(models[0].parameters()).device)
    return free - RESERVE_FRACTION * total - 2**30


def rows_that_fit(models, capacity: int) -> int:
    """How many rows of a static KV cache of `capacity` columns fit in the free GPU memory."""
    return max(0, int(_spare_gpu_bytes(models) // (kv_bytes_per_token(models) * capacity + row_temporaries(models))))


def blocks_that_fit(models, block_size: int, rows: int) -> int:
    """How many paged-cache blocks fit in the free GPU memory beside `rows` rows' temporaries."""
    spare = _spare_gpu_bytes(models) - rows * row_temporaries(models)
    return max(0, int(spare // (kv_bytes_per_token(models) * block_size)))
