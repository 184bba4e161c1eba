"""Row-chunked, pipelined tensor work: bounded memory whatever the tensor size.

A 7B model's embedding matrix alone is 0.5 GB in float32; processing it in row chunks keeps
peak memory at a few chunks. Chunks run on a small thread pool (torch ops, safetensors reads
and `os.pwrite` release the GIL), so reading, arithmetic and writing overlap, with at most
`workers` chunks in flight.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")

CHUNK_ELEMENTS = 16 * 2**20  # 64 MiB per float32 chunk: big enough that per-chunk overhead vanishes


def row_chunks(shape: tuple[int, ...], stop: int | None = None,
               max_elements: int | None = None) -> list[tuple[int, int | None]]:
    """Split rows [0, stop or shape[0]) into (start, stop) ranges of at most `max_elements` each.

    A 0-d tensor is one chunk (0, None), meaning "the whole tensor".
    """
    if not shape:
        return [(0, None)]
    rows = shape[0] if stop is None else stop
    per_row = max(1, _prod(shape[1:]))
    step = max(1, (max_elements or CHUNK_ELEMENTS) // per_row)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)] or [(0, 0)]


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def pipelined(fn: Callable[[Job], Result], jobs: Iterable[Job], workers: int = 2) -> Iterator[Result]:
    """Yield fn(job) for each job, in order, running up to `workers` jobs at once."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="distill-stream") as pool:
        in_flight: deque = deque()
        try:
            for job in jobs:
                if len(in_flight) >= workers:
                    yield in_flight.popleft().result()
                in_flight.append(pool.submit(fn, job))
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:  # on error or interrupt: do not start what is queued
                future.cancel()
