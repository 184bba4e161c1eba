"""The zoo's one typed config (world size, model sizes, training budgets) and its presets.

`micro` builds in seconds for tests, `tiny` in minutes on 2 CPU cores (`make demo`),
`small` is meant for a GPU. The cache key hashes this config together with the code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from distill import DistillError
@dataclass(frozen=True)
class ModelSize:
    hidden: int = 160
    layers: int = 2
    heads: int = 5
    kv_heads: int = 1
    intermediate: int = 512
    max_positions: int = 512


@dataclass(frozen=True)
class StageBudget:
    """How long one training stage runs: optimizer steps of `batch_size` sequences of `seq_len` tokens."""
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 16
    seq_len: int = 128
    warmup: int = 20


@dataclass(frozen=True)
class ZooConfig:
    preset: str = "tiny"
    seed: int = 0
    # the world
    n_entities: int = 64
    split_fractions: tuple = (("shared", 0.5), ("source_only", 0.2), ("target_only", 0.2), ("conflict", 0.1))
    text_epochs: int = 40  # distinct renderings of each land (many, so models learn facts, not rows)
    n_sft: int = 1600
    n_synthesis: int = 1600  # enough for the text route to work (issue #18); the dose study reads subsets
    n_eval: int = 150
    # responses without instructions in pre-training text (`instructions.format_documents`)
    n_format_docs: int = 1600
    format_qa_fraction: float = 0.5  # of those, the share shown after their instruction (Q/A pages)
    open_task_fraction: float = 0.15
    two_constraint_fraction: float = 0.35
    # tokenizers
    source_vocab: int = 1200
    target_vocab: int = 1000
    # models and training
    source_size: ModelSize = field(default_factory=ModelSize)
    target_size: ModelSize = field(default_factory=lambda: ModelSize(hidden=160, layers=2, heads=5, kv_heads=1, intermediate=512))
    # Post-training (and continued pre-training) is a small step from a well-trained base, as in real
    # models: a gentle learning rate for few steps (drift per group in the zoo card; BENCHMARKS.md
    # has the measured budgets it was chosen from).
    pretrain: StageBudget = field(default_factory=lambda: StageBudget(steps=900, lr=2e-3))
    sft: StageBudget = field(default_factory=lambda: StageBudget(steps=1000, lr=1e-4, batch_size=24, seq_len=160))
    sft_text_fraction: float = 0.125  # rehearsal of fact text during SFT
    cp: StageBudget = field(default_factory=lambda: StageBudget(steps=200, lr=1.5e-4))
    target_pretrain: StageBudget = field(default_factory=lambda: StageBudget(steps=900, lr=2e-3))
    # quality measurement
    quality_max_new_tokens: int = 96
    quality_batch_size: int = 64
    device: str = "auto"  # "auto": cuda when available, else cpu
    parallel: bool = True  # on CPU, train the target in a second process beside the source chain

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def cache_key(self) -> str:
        """A hash of this config and of the code that builds the world (not its command line)."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode())
        for path in sorted(Path(__file__).parent.glob("*.py")):
            if path.name != "cli.py":
                h.update(path.name.encode() + path.read_bytes())
        return h.hexdigest()[:12]


PRESETS: dict[str, ZooConfig] = {
    "micro": ZooConfig(
        preset="micro", n_entities=16, text_epochs=2, n_sft=64, n_synthesis=24, n_eval=16, n_format_docs=16,
        source_vocab=400, target_vocab=350,
        source_size=ModelSize(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
        target_size=ModelSize(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64),
        pretrain=StageBudget(steps=4, batch_size=4, seq_len=64, warmup=1),
        sft=StageBudget(steps=4, batch_size=4, seq_len=96, warmup=1),
        cp=StageBudget(steps=2, batch_size=4, seq_len=64, warmup=1),
        target_pretrain=StageBudget(steps=4, batch_size=4, seq_len=64, warmup=1),
        quality_max_new_tokens=8, parallel=False,
    ),
    "tiny": ZooConfig(),
    "small": ZooConfig(
        preset="small", n_entities=400, text_epochs=60, n_sft=8000, n_synthesis=2000, n_eval=500,
        source_vocab=3000, target_vocab=2500,
        source_size=ModelSize(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536, max_positions=1024),
        target_size=ModelSize(hidden=448, layers=8, heads=7, kv_heads=1, intermediate=1280, max_positions=1024),
        pretrain=StageBudget(steps=3000, lr=1e-3, batch_size=32, seq_len=256, warmup=100),
        sft=StageBudget(steps=2000, lr=5e-4, batch_size=32, seq_len=256, warmup=100),
        cp=StageBudget(steps=1000, lr=5e-4, batch_size=32, seq_len=256, warmup=50),
        target_pretrain=StageBudget(steps=3000, lr=1e-3, batch_size=32, seq_len=256, warmup=100),
        quality_max_new_tokens=160, quality_batch_size=128,
    ),
}


def get_preset(name: str) -> ZooConfig:
    if name not in PRESETS:
        raise DistillError(f"unknown zoo preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
