"""The embedded default: a synthetic world and its tiny model zoo.

Made-up facts (`knowledge`), verifiable instruction constraints (`constraints`), prompt sets
(`instructions`), two tokenizers (`tokenizers`) and four small models (`zoo`), all built
deterministically from a seed so that every stage can run offline on a laptop.
Nothing outside this package knows that the world is synthetic.
"""

from __future__ import annotations

from pathlib import Path


def build_zoo(preset: str = "tiny", out: str | None = None, force: bool = False) -> Path:
    """Build (or reuse from the cache) the zoo for `preset`; returns its directory."""
    from distill.world.zoo import build_zoo as _build

    return _build(preset, out=out, force=force)
