"""torch.compile for the speed levers (decode layers, the fused loss), with the eager function as the fallback.

A compile can fail where the eager code runs: no C++ compiler, an Inductor limitation on some
platform, or dynamo's recompile limit (8 shapes per function; each new batch size or cache
capacity is a new shape with `dynamic=False`, and `fullgraph=True` makes the limit an error).
A speed lever must not turn into a crash, so the first failure is logged and the function runs
eagerly from then on, with the same results.
"""

from __future__ import annotations

import logging
import weakref

import torch

log = logging.getLogger(__name__)

_made: weakref.WeakSet = weakref.WeakSet()  # every CompiledOrEager of this process, for fell_back_to_eager()


class CompiledOrEager:
    """Call `fn` through torch.compile(fullgraph) until a compile fails, then eagerly.

    Static shapes by default; `dynamic=True` for a function whose input sizes change call to call
    (one compile with symbolic sizes instead of one per size)."""

    def __init__(self, fn, what: str, dynamic: bool = False):
        self.fn, self.what = fn, what
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        self.failed = False
        _made.add(self)

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise  # not a compile problem: the eager path would run out of memory too
            except Exception as exc:  # noqa: BLE001 - Inductor and dynamo raise many types
                self.failed = True
                log.warning("torch.compile of %s failed (%s: %s); running it eagerly from now on",
                            self.what, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return self.fn(*args, **kwargs)


def fell_back_to_eager() -> list[str]:
    """What, of the compiled levers made in this process, runs eagerly after a failed compile: a
    benchmark line with one of these measured something other than it names."""
    return sorted(c.what for c in _made if c.failed)
