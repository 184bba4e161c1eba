"""One writer per output: a lock beside every output directory a stage writes, appends to or merges.

    PARENT/.OUT.lock           the gate: flock-held only for the moment a holder joins or leaves
                               (and while `critical()` runs, e.g. a merge)
    PARENT/.OUT.lock.00003     one file per holder, flock-held for the holder's whole life, with its
                               pid, host, command, launch id and rank inside (for the error message)

The files sit next to OUT, not in it: an output that is renamed into place whole (chat-vector,
zoo) would carry a lock inside it away, and a stage that fails before writing anything must not
leave OUT behind just because its lock was there. Both files are removed when the last holder
leaves; a killed holder's flock is released by the kernel, so the next writer finds its file free
and takes it over (with a log line).

Who is a second writer: a process that is not part of the holder's launch. A single process
(WORLD_SIZE unset or 1) is its own launch. The ranks of one `torchrun` / `deepspeed` launch
(WORLD_SIZE > 1) share a launch id, the first of DISTILL_LAUNCH_ID, TORCHELASTIC_RUN_ID (unless
"none"), MASTER_ADDR:MASTER_PORT (unique while the launch runs: its rendezvous store listens
there), else "world=N"; each rank holds its own file `.OUT.lock.<RANK>`, so ranks never refuse
each other, while any process of another launch (or a second copy of the same rank) is refused at
once with a `DistillError` naming the holder's pid, host and command.

Stale locks: a holder file whose flock is free belongs to a process that is gone; one whose flock
is held but whose pid on this host is dead is held only by that process's forked children (data
loader workers) and is unlinked and replaced. On a file system without flock the pid (same host)
decides alone.

    with output_lock(out, "synthesis output") as lock:   # every rank of a launch calls it
        ...
        with lock.critical():                             # one holder at a time, e.g. the merge
            merge(out)

A process may take the lock of one output again while it holds it (the count is kept).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from distill import DistillError
log = logging.getLogger("distill.lock")

_held: dict[str, "OutputLock"] = {}  # gate path -> the lock this process holds on it
_guard = threading.Lock()
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def host_name() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except (OverflowError, ValueError):
        return False
    return True


def launch_identity(env=None) -> tuple[str | None, int, int]:
    """(launch id, rank, world size) of this process; the id is None for a single process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE") or 1)
        rank = int(env.get("RANK") or 0)
    except ValueError:
        raise DistillError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} are not integers; "
                           f"unset them for a single process, or launch with torchrun / deepspeed") from None
    if world <= 1:
        return None, 0, 1
    for key in ("DISTILL_LAUNCH_ID", "TORCHELASTIC_RUN_ID"):
        value = env.get(key)
        if value and value != "none":
            return f"{key}={value}", rank, world
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"master={env['MASTER_ADDR']}:{env['MASTER_PORT']}", rank, world
    return f"world={world}", rank, world


def _paths(out: Path) -> tuple[Path, Path, str]:
    out = Path(out)
    parent = Path(os.path.realpath(out.parent if str(out.parent) else "."))
    gate = parent / f".{out.name}.lock"
    return parent, gate, gate.name + "."


class OutputLock:
    """The lock of one output, held by this process (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, what: str, launch: str | None, rank: int, world: int):
        self.out = Path(out)
        self.what = what
        self.parent, self.gate_path, self._prefix = _paths(self.out)
        self.launch, self.rank, self.world = launch, rank, world
        self.holder_path = self.parent / f"{self._prefix}{rank:05d}"
        self._fd: int | None = None
        self._depth = 0
        self._made_dirs: list[Path] = []
        self._gate_depth = 0
        self._gate_fd: int | None = None
        self._gate_thread: int | None = None

    # -- the holder record ----------------------------------------------------------------

    def record(self) -> dict:
        return {"pid": os.getpid(), "host": host_name(), "command": shlex.join(sys.argv) or sys.executable,
                "launch": self.launch, "rank": self.rank, "world": self.world,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "output": str(self.out)}

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def describe(self, info: dict, path: Path) -> str:
        who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
        if info.get("launch"):
            who += f" (rank {info.get('rank')} of {info.get('world')} of launch {info['launch']})"
        cmd = info.get("command")
        return who + (f", running `{cmd}`" if cmd else "") + (f" since {info['since']}" if info.get("since") else "") \
            + ("" if info else f" (lock file {path})")

    # -- taking and giving back -----------------------------------------------------------

    def _make_parent(self) -> None:
        missing = []
        p = self.parent
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                self._made_dirs.insert(0, d)
        except FileExistsError:
            pass  # made by someone else meanwhile
        except OSError as exc:
            raise DistillError(f"cannot write to {self.parent} ({exc.strerror}); choose a writable output path "
                               f"for {self.out}") from None
        if not self.parent.is_dir():
            raise DistillError(f"cannot write to {self.parent}: it is not a directory; choose another output path "
                               f"for {self.out}")

    def acquire(self, wait: bool = False) -> "OutputLock":
        self._make_parent()
        said = False
        while True:
            with self.critical():
                conflict = self._scan()
                if conflict is None:
                    self._take_slot()
                    return self
            info, path = conflict
            message = (f"{self.what} {self.out} is being written by {self.describe(info, path)}; one writer at a "
                       f"time: wait for it to finish (or stop it) and rerun, or choose another output path")
            if not wait:
                self._remove_made_dirs()
                raise DistillError(message)
            if not said:
                log.info("waiting: %s", message)
                said = True
            time.sleep(0.5)

    def _scan(self):
        """Clear stale holder files; return (record, path) of a live holder we may not join, or None."""
        mine = host_name()
        for path in sorted(self.parent.glob(self._prefix + "*")):
            suffix = path.name[len(self._prefix):]
            if not suffix.isdigit():
                continue
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise DistillError(f"cannot open the lock file {path} ({exc.strerror}); check its permissions") \
                    from None
            try:
                got = _try_flock(fd)
                info = self._read(path)
                pid = info.get("pid")
                dead_here = info.get("host") == mine and isinstance(pid, int) and not pid_alive(pid)
                busy = (not dead_here) if got is None else not got  # no flock on this file system: the pid decides
                if busy and not dead_here:
                    same_launch = self.launch is not None and info.get("launch") == self.launch
                    if same_launch and info.get("rank") != self.rank:
                        continue  # another rank of this launch
                    return info, path
                log.warning("taking over the lock of %s %s from %s, which is no longer running",
                            self.what, self.out, self.describe(info, path))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            finally:
                os.close(fd)
        return None

    def _take_slot(self) -> None:
        fd = _open_locked(self.holder_path, block=False)
        if fd is None:  # cannot happen under the gate after _scan cleared the path
            raise DistillError(f"{self.what} {self.out}: could not lock {self.holder_path}; is another process "
                               f"of rank {self.rank} writing it?")
        data = json.dumps(self.record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        self._depth = 1

    def release(self) -> None:
        if self._fd is None:
            return
        with self.critical(leaving=True):
            with contextlib.suppress(OSError):
                if _same_file(self.holder_path, self._fd):
                    self.holder_path.unlink()
            os.close(self._fd)
            self._fd = None
        self._remove_made_dirs()

    def _remove_made_dirs(self) -> None:
        for d in self._made_dirs:  # deepest first; only those still empty (no output was made)
            with contextlib.suppress(OSError):
                d.rmdir()
        self._made_dirs = []

    @contextlib.contextmanager
    def critical(self, leaving: bool = False) -> Iterator[None]:
        """Hold the gate: no holder joins or leaves, and no other holder runs its `critical()`, meanwhile."""
        if self._gate_depth and self._gate_thread == threading.get_ident():
            self._gate_depth += 1
            try:
                yield
            finally:
                self._gate_depth -= 1
            return
        started, said = time.monotonic(), False
        while True:
            fd = _open_locked(self.gate_path, block=False)
            if fd is not None:
                break
            if not said and time.monotonic() - started > 10:
                log.info("waiting for %s (another holder of %s %s is joining, leaving or merging)",
                         self.gate_path, self.what, self.out)
                said = True
            time.sleep(0.05)
        self._gate_fd, self._gate_depth, self._gate_thread = fd, 1, threading.get_ident()
        try:
            yield
        finally:
            self._gate_depth, self._gate_fd, self._gate_thread = 0, None, None
            if leaving and not any(p.name[len(self._prefix):].isdigit() for p in self.parent.glob(self._prefix + "*")):
                with contextlib.suppress(OSError):
                    if _same_file(self.gate_path, fd):
                        self.gate_path.unlink()  # the last holder left (joiners check the inode they lock)
            os.close(fd)


def _try_flock(fd: int) -> bool | None:
    """True: locked (it was free); False: someone holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FLOCK:
            return None
        raise
    return True


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _open_locked(path: Path, block: bool) -> int | None:
    """An fd of `path` holding its flock, or None if another process holds it. Checks that the
    path still names the locked file (a leaving holder may have unlinked it meanwhile)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DistillError(f"cannot create the lock file {path} ({exc.strerror}); choose a writable output "
                               f"path") from None
        got = _try_flock(fd)
        if got is False:
            os.close(fd)
            if not block:
                return None
            time.sleep(0.05)
            continue
        if _same_file(path, fd):
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, what: str = "output", wait: bool = False) -> Iterator[OutputLock]:
    """Hold the lock of output `out` for the block (see the module docstring).

    `what` names the output in messages ("synthesis output", "run directory"). `wait=True`
    waits for another writer to finish instead of refusing (for a shared cache entry). The
    launch and rank come from the environment (`launch_identity`)."""
    launch, rank, world = launch_identity()
    gate = str(_paths(Path(out))[1])
    with _guard:
        lock = _held.get(gate)
        if lock is not None:
            lock._depth += 1
    if lock is None:
        lock = OutputLock(out, what, launch, rank, world).acquire(wait=wait)
        with _guard:
            _held[gate] = lock
    try:
        yield lock
    finally:
        with _guard:
            lock._depth -= 1
            last = lock._depth == 0
            if last:
                _held.pop(gate, None)
        if last:
            lock.release()


def holders(out: str | os.PathLike) -> list[dict]:
    """The records of the live holders of `out`'s lock (for tests and messages)."""
    probe = OutputLock(out, "output", None, 0, 1)
    if not probe.parent.is_dir():
        return []
    found = []
    with probe.critical(leaving=True):  # under the gate: a probe never looks like a holder to a joiner
        for path in sorted(probe.parent.glob(probe._prefix + "*")):
            if not path.name[len(probe._prefix):].isdigit():
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if _try_flock(fd) is False:
                    found.append(OutputLock._read(path))
            finally:
                os.close(fd)
    return found


__all__ = ["output_lock", "OutputLock", "launch_identity", "holders", "pid_alive"]
