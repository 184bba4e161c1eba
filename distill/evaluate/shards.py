"""`distill evaluate` across the ranks of a launch, as `distill synthesize` shards its prompts.

    torchrun --nproc_per_node 8 -m distill.cli evaluate --model M --zoo Z --out S.json

Under `torchrun` / the `deepspeed` launcher (RANK, WORLD_SIZE, LOCAL_RANK; no process group) each
suite's items are cut into batches in the one-process order (longest first, --batch-size each) and
rank r computes batches r, r + N, r + 2N, ... Every item is thus computed in the very batch it has in
one process: the batch a prompt shares can move a near-tie greedy token, so splitting item by item
would not give the one-process scores, and this does, exactly. Each rank writes what it computed
beside the scores, atomically:

    PARENT/.S.json.part-LAUNCH-RRRRR-of-NNNNN.json

and the rank that finds every part of its launch there (under the output's lock, `distill.io.locking`)
merges them and goes on alone: it computes the metrics once, runs what is not split (the judge suite,
lm-eval) and writes the scores; the other ranks return None. Parts of another launch are what a
killed launch left (the lock lets one launch at a time write an output): the merger removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from distill.io.files import atomic_write_json
from distill.io.locking import launch_identity, output_lock

SPLIT = ("if", "knowledge", "ppl")  # the suites computed item by item, so split across ranks


@dataclass(frozen=True)
class Shard:
    """This process's place in its launch (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launch: str | None = None

    @classmethod
    def current(cls) -> "Shard":
        launch, rank, world = launch_identity()
        return cls(rank, world, int(os.environ.get("LOCAL_RANK") or 0), launch)

    def items(self, lengths: Sequence[int], batch_size: int) -> list[int]:
        """This rank's item indices, batch after batch, in the order the one-process run computes them
        (`generate_greedy` and `sum_logprobs` sort longest first, stably, and cut every batch_size)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
        return [i for batch in batches[self.rank::self.world] for i in batch]

    def device(self, device: str) -> str:
        """The device this rank loads the model on: its own GPU where the run says just cuda."""
        return f"cuda:{self.local_rank}" if self.world > 1 and device == "cuda" else device


def lock(out: Path, shard: Shard):
    """The scores' lock, shared by the ranks of one launch; one process needs none (as before)."""
    return output_lock(out, "evaluation scores") if shard.world > 1 else contextlib.nullcontext()


def _prefix(out: Path) -> str:
    return f".{out.name}.part-"


def part_path(out: Path, shard: Shard) -> Path:
    tag = hashlib.sha256(str(shard.launch).encode()).hexdigest()[:12]
    return out.with_name(f"{_prefix(out)}{tag}-{shard.rank:05d}-of-{shard.world:05d}.json")


def gather(out: Path, shard: Shard, held, items: dict[str, dict[int, object]]) -> dict[str, dict[int, object]] | None:
    """Write this rank's items ({suite: {index: result}}); every rank's, merged, if this rank is the
    last of its launch to get here, else None. `held`: the lock from `lock()`."""
    out = Path(out)
    atomic_write_json(part_path(out, shard), {"launch": shard.launch, "rank": shard.rank, "world": shard.world,
                                              "items": items})
    parts = [part_path(out, Shard(r, shard.world, 0, shard.launch)) for r in range(shard.world)]
    with held.critical():  # one merger: ranks finishing together see the parts one after the other
        if not all(p.exists() for p in parts):
            return None
        merged: dict[str, dict[int, object]] = {}
        for p in parts:
            for suite, results in json.loads(p.read_text())["items"].items():
                merged.setdefault(suite, {}).update({int(i): r for i, r in results.items()})
        for p in out.parent.glob(_prefix(out) + "*"):  # this launch's, and any a killed launch left
            p.unlink(missing_ok=True)
    return merged
