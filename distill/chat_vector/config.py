"""`ExtractConfig` and `ApplyConfig`: every option of `distill chat-vector extract / apply` and the
recipe's `chat_vector:` / `weight_arithmetic:` sections (distill.config); no torch at import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from distill.config import opt


_COMMON = dict(
    max_shard_size=lambda: opt("5GB", "largest output shard, e.g. 5GB or 500MB"),
    overwrite=lambda: opt(False, "replace --out if it already exists"),
    progress=lambda: opt(True, "show a progress bar (--no-progress: none)"),
    device=lambda: opt("cpu", "device for the arithmetic, e.g. cuda; files are read and written on the CPU either way"),
    workers=lambda: opt(2, "row chunks (of at most 64 MiB in float32) in flight at once, so reading, arithmetic and "
                           "writing overlap; peak memory grows with it"),
)


@dataclass(kw_only=True)
class ExtractConfig:
    """`distill chat-vector extract`: Δ = post − base."""

    base: str = opt(help="pre-trained model directory (or hub id in the local HF cache)")
    post: str = opt(help="post-trained (chat/instruct) model of the same architecture")
    out: str = opt(help="vector directory to write")
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = opt(
        "auto", "storage dtype of Δ; auto = the models' dtype (float32 if they differ). float32 keeps Δ at full "
                "precision, e.g. to apply it to a model of another dtype")
    max_shard_size: str = _COMMON["max_shard_size"]()
    overwrite: bool = _COMMON["overwrite"]()
    progress: bool = _COMMON["progress"]()
    device: str = _COMMON["device"]()
    workers: int = _COMMON["workers"]()

    def __post_init__(self):  # before anything is opened or written (distill.io.validate)
        from distill.io.validate import at_least

        if self.dtype == "auto":
            self.dtype = None  # the models' own
        at_least(1, workers=self.workers)


@dataclass(kw_only=True)
class ApplyConfig:
    """`distill chat-vector apply`: θ_target + Σ scaleᵢ·Δᵢ."""

    target: str = opt(help="model directory to add the vector(s) to")
    out: str = opt(help="model directory to write")
    # (vector dir, scale λ); the command line gives them as --vector V --scale λ pairs
    vectors: list[tuple[str, float]] = opt(factory=list, cli=False, help="(vector directory, scale λ) pairs")
    skip_embeddings: bool = opt(False, "leave embeddings and LM head as the target's (use when the target's tokenizer "
                                       "differs from the source's)")
    max_shard_size: str = _COMMON["max_shard_size"]()
    overwrite: bool = _COMMON["overwrite"]()
    progress: bool = _COMMON["progress"]()
    device: str = _COMMON["device"]()
    workers: int = _COMMON["workers"]()

    def __post_init__(self):  # before anything is opened or written: a nan scale made an all-NaN model
        from distill.io.validate import at_least, finite

        for i, (_, scale) in enumerate(self.vectors):
            finite(**{"scale" if len(self.vectors) == 1 else f"scale {i + 1}": scale})
        at_least(1, workers=self.workers)
