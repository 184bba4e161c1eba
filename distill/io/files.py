"""Filesystem helpers: outputs appear whole or not at all.

Every stage writes into a temporary sibling and renames it into place at the end, so an
interrupted run never leaves something that looks complete; temporary names carry host and pid,
so the next run of the same command removes what a killed one left (`remove_leftovers`).
`fault_point` is the test hook that kills a process at a named point (tests/test_faults.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from distill import DistillError
from distill.io.locking import pid_alive

log = logging.getLogger(__name__)


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output directory unless `overwrite` is set."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DistillError(f"output {out} already exists; choose another path or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    from distill.io.validate import guard_path

    guard_path(out)  # a file on the way (`--out a-file/sub`): one line, not a FileExistsError from mkdir
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise DistillError(f"cannot write to {parent}: check its permissions or choose another --out")
    return out


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _dead_here(name: str, prefix: str) -> bool:
    """`name` is PREFIX + "<pid>" or PREFIX + "<pid>-..." and that pid is not running here."""
    pid = name[len(prefix):].split("-", 1)[0]
    return pid.isdigit() and not pid_alive(int(pid))


@contextlib.contextmanager
def scratch_dir(beside: Path, tag: str) -> Iterator[Path]:
    """A folder of this process's own next to `beside` (same disk as the output), removed on exit.

    Named after host and pid: a process killed before its cleanup (a launcher's SIGTERM to the
    other ranks skips `finally`) leaves one behind, and the next run on that host removes the
    leftovers whose pid is gone, never another host's or a live process's.
    """
    beside = Path(beside)
    prefix = f".{beside.name}.{tag}-{_host()}-"
    for old in beside.parent.glob(prefix + "*"):
        if _dead_here(old.name, prefix):
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=beside.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)



# mkdtemp's random part (tempfile's alphabet): the name an older distill gave its temporary outputs
_LEGACY_TMP = re.compile(r"[a-z0-9_]{8}")


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what killed writers of `out` left beside it: their temporary directories
    (`.OUT.tmp-HOST-PID-*`, full shards) and an old output moved aside by an interrupted
    `replace_dir` (`.OUT.old-HOST-PID`). Only this host's, only of pids that are gone; call it
    while holding `out`'s lock (`distill.io.locking`), which also makes an older distill's
    `.OUT.tmp-XXXXXXXX` safe to remove (no live writer of `out` can own it)."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        base = f".{out.name}.{kind}-"
        mine = f"{base}{_host()}-"
        for path in out.parent.glob(base + "*"):
            rest = path.name[len(base):]
            if path.name.startswith(mine):
                stale = _dead_here(path.name, mine)
            elif kind == "tmp":
                stale = bool(_LEGACY_TMP.fullmatch(rest))
            else:
                stale = rest.isdigit() and not pid_alive(int(rest))  # older distill: .OUT.old-PID
            if stale and path.is_dir() and not path.is_symlink():
                log.info("removing %s, left by a killed run", path)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temporary directory next to `out`; rename it to `out` if the block succeeds.

    Holds `out`'s lock throughout (a second writer is refused, `distill.io.locking`) and first
    removes the temporary directories killed writers of `out` left (`remove_leftovers`)."""
    from distill.io.locking import output_lock

    with output_lock(out, what):
        out = check_output_dir(out, overwrite)
        remove_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_host()}-{os.getpid()}-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename; a plain mkdir's mode instead
        try:
            yield tmp
            fault_point("atomic_dir.filled")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename a finished temporary directory to `out`, replacing what is there."""
    if out.exists():
        # Move the old one aside first so there is never a moment with neither.
        old = out.parent / f".{out.name}.old-{_host()}-{os.getpid()}"
        os.replace(out, old)
        fault_point("replace_dir.swap")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file under a temporary name and rename it into place (first removing the
    temporary files of killed writers of this path on this host)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = f".{path.name}.tmp-"
    mine = f"{base}{_host()}-"
    for old in path.parent.glob(base + "*"):
        rest = old.name[len(base):]
        if (_dead_here(old.name, mine) if old.name.startswith(mine) else rest.isdigit() and not pid_alive(int(rest))) \
                and old.is_file():
            old.unlink(missing_ok=True)
    tmp = path.with_name(f"{mine}{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")  # not the locale's: rows hold any script (ensure_ascii=False)
        fault_point("atomic_write.tmp")
        os.replace(tmp, path)
    except OSError as exc:  # disk full, permissions: no stray temporary file, one line naming the path
        tmp.unlink(missing_ok=True)
        from distill.io.validate import storage_error

        raise (storage_error(exc, path) or exc) from None


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Fault injection (tests): DISTILL_FAULT_AT=POINT:N[:stop][,POINT:N...]
# ---------------------------------------------------------------------------------------------

_fault_hits: dict[str, int] = {}
_fault_guard = threading.Lock()


def fault_point(name: str) -> None:
    """A named point where tests kill the process: with DISTILL_FAULT_AT=NAME:N the N-th pass
    through NAME sends this process SIGKILL (NAME:N:stop sends SIGSTOP, to hold it there).
    DISTILL_FAULT_PID limits it to that pid (not a stage's worker processes);
    DISTILL_FAULT_TRACE=FILE appends each point passed to FILE (to choose the points).
    Unset (always, outside tests) it costs one environment lookup.

    Points: atomic_dir.filled (the temporary directory is complete, not yet renamed),
    replace_dir.swap (the old output moved aside, the new one not yet in place),
    atomic_write.tmp (a file's temporary copy written, not renamed), chat_vector.chunk
    (a row chunk of a tensor written), synthesize.prepared / synthesize.row / synthesize.merge,
    zoo.model (a model trained and saved), zoo.quality (a model scored), run.stage (a recipe
    stage finished, not yet recorded in stages.json)."""
    spec = os.environ.get("DISTILL_FAULT_AT")
    trace = os.environ.get("DISTILL_FAULT_TRACE")
    if not spec and not trace:
        return
    only = os.environ.get("DISTILL_FAULT_PID")
    if only and only != str(os.getpid()):
        return
    with _fault_guard:  # points are passed from worker threads too (chat-vector's pipeline)
        n = _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    for item in (spec or "").split(","):
        point, _, rest = item.strip().partition(":")
        count, _, action = rest.partition(":")
        if point == name and count.isdigit() and int(count) == n:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


INVALID_JSONL = "{what} {path} line {n} is not valid JSON ({msg}); fix or remove it"


def iter_jsonl(path: str | os.PathLike, what: str = "file", *, invalid: str = INVALID_JSONL,
               skip_torn_tail: bool = False):
    """(line number, row) for each non-blank line; invalid JSON is an error naming the line.

    The one JSONL reader of the package (`read_jsonl` is its list form). `invalid` is that
    error's text, a format string of {what}, {path}, {n} (the line) and {msg} (the parser's
    reason), for a caller whose fix is another one; `skip_torn_tail` ignores a last line
    without its newline (a write cut short: see `distill.synthesize.records.read_shard`).
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if skip_torn_tail and not line.endswith("\n"):
                return
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DistillError(invalid.format(what=what, path=path, n=n, msg=exc.msg)) from None


def read_jsonl(path: str | os.PathLike, what: str = "file", limit: int | None = None, **kwargs) -> list:
    """The rows of a JSONL file in order (the first `limit` when given), by `iter_jsonl`, whose
    keyword arguments it passes on; a caller that names lines in its own messages iterates that."""
    rows = []
    for _, row in iter_jsonl(path, what, **kwargs):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    return rows
