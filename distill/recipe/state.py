"""A recipe's stages and `stages.json`, the record of which finished with which key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill.io.files import atomic_write_json


@dataclass
class Stage:
    name: str
    settings: dict  # everything that changes the stage's output
    run: Callable[[], dict]  # returns what later stages and the report need (paths, notes)
    inputs: list[str] = field(default_factory=list)  # names of the stages it reads
    processes: int = 1  # how many processes it runs on (a launch across GPUs: one per GPU)
    gpus: int = 0  # GPUs it holds while it runs (none on the CPU), for the report's GPU-hours


class StageState:
    """`stages.json` in the run directory: finished stages, their keys, outputs, wall times (seconds)
    and the processes and GPUs each ran on; rewritten atomically after each stage."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.done: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def key(self, stage: Stage) -> str:
        upstream = {name: self.done.get(name, {}).get("key") for name in stage.inputs}
        blob = json.dumps({"settings": stage.settings, "inputs": upstream}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def is_current(self, stage: Stage) -> bool:
        """Finished with these settings and inputs, and its outputs are still on disk."""
        entry = self.done.get(stage.name)
        return bool(entry) and entry["key"] == self.key(stage) and all(
            Path(v).exists() for v in entry.get("outputs", {}).values() if isinstance(v, str))

    def record(self, stage: Stage, outputs: dict, seconds: float) -> None:
        self.done[stage.name] = {"key": self.key(stage), "outputs": outputs, "seconds": round(seconds, 1),
                                 "processes": stage.processes, "gpus": stage.gpus}
        atomic_write_json(self.path, self.done)

    def forget(self, names: list[str]) -> None:
        for name in names:
            self.done.pop(name, None)
        atomic_write_json(self.path, self.done)

    def output(self, name: str) -> dict:
        return self.done.get(name, {}).get("outputs", {})
