"""Filesystem helpers: outputs appear whole or not at all.

Every stage writes into a temporary sibling and renames it into place at the end, so an
interrupted run never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from distill import DistillError


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output directory unless `overwrite` is set."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DistillError(f"output {out} already exists; choose another path or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise DistillError(f"cannot write to {parent}: check its permissions or choose another --out")
    return out


@contextlib.contextmanager
def scratch_dir(beside: Path, tag: str) -> Iterator[Path]:
    """A folder of this process's own next to `beside` (same disk as the output), removed on exit.

    Named after host and pid: a process killed before its cleanup (a launcher's SIGTERM to the
    other ranks skips `finally`) leaves one behind, and the next run on that host removes the
    leftovers whose pid is gone, never another host's or a live process's.
    """
    beside = Path(beside)
    host = socket.gethostname().replace(".", "_")
    prefix = f".{beside.name}.{tag}-{host}-"
    for old in beside.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=beside.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; rename it to `out` if the block succeeds."""
    out = check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename; a plain mkdir's mode instead
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename a finished temporary directory to `out`, replacing what is there."""
    if out.exists():
        # Move the old one aside first so there is never a moment with neither.
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file under a temporary name and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")  # not the locale's: rows hold any script (ensure_ascii=False)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def iter_jsonl(path: str | os.PathLike, what: str = "file"):
    """(line number, row) for each non-blank line; invalid JSON is an error naming the line."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DistillError(f"{what} {path} line {n} is not valid JSON ({exc.msg}); fix or remove it") from None
