"""Every judgment kept in an append-only JSONL file, keyed by (judge, template version, mode, item):
a rerun, or a run after a crash (even kill -9), asks the judge only what it has not answered.

Lines are appended in chunks as answers arrive and fsynced; a torn last line (a kill mid-write) is
cut when the file is opened. A judgment without a value (unparseable after its retries) is kept
too: it was asked, and is counted by the scores rather than asked again forever.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Sequence

from distill.evaluate.judge.base import Item, Judge, Pair, Verdict
from distill.io.files import fault_point


def judgment_key(judge: Judge, mode: str, item) -> str:
    blob = json.dumps([judge.name, judge.version, mode, asdict(item) if is_dataclass(item) else item],
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class CachedJudge(Judge):
    """`judge` with its answers remembered in `path`; asks in chunks of `chunk` items."""

    def __init__(self, judge: Judge, path: str | os.PathLike, chunk: int = 16):
        self.inner, self.path, self.chunk = judge, Path(path), max(1, chunk)
        self.name, self.version = judge.name, judge.version
        self.known: dict[str, Verdict] = {}
        self.asked = 0  # judgments this process asked for (not from the file)
        self._read()

    def _read(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = data[: data.rfind(b"\n") + 1]  # a torn last line: cut
        if len(good) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(good))
        for line in good.decode("utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                self.known[row["key"]] = Verdict(row["value"], row.get("raw", ""), row.get("attempts", 1),
                                                 row.get("error"))

    def absolute(self, items: Sequence[Item]) -> list[Verdict]:
        return self._cached(items, "absolute", self.inner.absolute)

    def pairwise(self, pairs: Sequence[Pair]) -> list[Verdict]:
        return self._cached(pairs, "pairwise", self.inner.pairwise)

    def _cached(self, items, mode, ask) -> list[Verdict]:
        keys = [judgment_key(self, mode, it) for it in items]
        todo = list(dict.fromkeys(k for k in keys if k not in self.known))  # each distinct item once
        first = {k: it for k, it in zip(keys, items)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(todo), self.chunk):
            part = todo[start:start + self.chunk]
            verdicts = ask([first[k] for k in part])
            with open(self.path, "a", encoding="utf-8") as f:
                for k, v in zip(part, verdicts):
                    f.write(json.dumps({"key": k, "mode": mode, "judge": self.name, "version": self.version,
                                        **v.as_dict()}, ensure_ascii=False) + "\n")
                    self.known[k] = v
                f.flush()
                os.fsync(f.fileno())
            self.asked += len(part)
            fault_point("judge.chunk")
        return [self.known[k] for k in keys]

    def close(self) -> None:
        self.inner.close()
