"""Clocks, compile counts and profiles for bench/train_workers.py: what a timed region measured,
and what tells whether one step (a compile, a sync) dominated it."""

from __future__ import annotations

import statistics
import time
from itertools import pairwise
from pathlib import Path


def profiled(device, out_file):
    """A torch.profiler context for the extra steps after the timed ones; on exit, writes the top
    kernels and whether the step is bound by the GPU or by the host (Python, launches, syncs)."""
    import contextlib

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    @contextlib.contextmanager
    def ctx():
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            yield
            sync(device)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        # kernel rows only (CPU ops carry their kernels' time too: summing both counts it twice)
        gpu_busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
        busy = (f"GPU kernels busy {gpu_busy:.3f} s ({100 * gpu_busy / wall:.0f} % of wall: well under 100 % "
                f"means the host, launches or syncs hold the GPU back; kernels on overlapping streams, "
                f"as ZeRO's communication, are summed, so it can pass 100 %)") if device == "cuda" else "no GPU"
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(f"wall {wall:.3f} s for the profiled steps; {busy}\n\n"
                                  + events.table(sort_by=sort, row_limit=30, max_name_column_width=70) + "\n")

    return ctx()


def no_last_checkpoint_callback():
    """Skips the Trainer's checkpoint after the last step, which comes before distill's final save:
    under ZeRO-2 it holds the optimizer state too (fp32 weights and two moments: ~18.5 GB for the
    1.5B target), and a benchmark never resumes. Runs after the Trainer's DefaultFlowCallback, which
    asks for that checkpoint."""
    from transformers import TrainerCallback

    class NoLastCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                control.should_save = False

    return NoLastCheckpoint()


def profile_callback(start, device, out_file):
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        ctx = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == start and self.ctx is None:
                self.ctx = profiled(device, out_file)
                self.ctx.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.ctx is not None and state.global_step >= start + 2:
                self.ctx.__exit__(None, None, None)
                self.ctx = None

    return Profile()


def timer_callback(warmup, device, stop_at=None, on_stop=None):
    """Times the optimizer steps from `warmup` to `stop_at` (default: the last); `on_stop(timer)` runs
    as soon as the clock stops."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.tokens = 0
            self.peak = None
            self.marks = []  # the timed steps' ends on the device's timeline, the clock's start first
            self.compiles = CompileWatch()

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                self.compiles.__enter__()
                sync(device)
                reset_peak(device)
                self.t0 = time.perf_counter()
                self.marks = [mark(device)]

        def on_step_end(self, args, state, control, **kw):
            if self.t0 is not None and self.t1 is None:
                # packed rows: count the real tokens of this step's rows
                self.tokens += self.tokens_per_step
                self.marks.append(mark(device))
                if state.global_step >= (stop_at or state.max_steps):
                    # Stop the clock at the last optimizer step: what follows (profiled steps, the
                    # Trainer's checkpoint, distill's final save) is not training speed.
                    self._stop()

        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            ds = train_dataloader.dataset if train_dataloader is not None else None
            rows = [len(x) for x in ds["input_ids"]] if ds is not None else [0]
            self.tokens_per_step = sum(rows) / len(rows) * args.per_device_train_batch_size * \
                args.gradient_accumulation_steps * args.world_size

        def on_train_end(self, args, state, control, **kw):
            if self.t1 is None:
                self._stop()

        def _stop(self):
            sync(device)
            self.t1 = time.perf_counter()
            self.peak = peak(device)
            self.compiles.__exit__(None, None, None)
            if on_stop is not None:
                on_stop(self)

        def stats(self):
            return timing(self.tokens, self.t1 - self.t0, self.tokens_per_step, durations(self.marks, device),
                           self.compiles)

    return Timer()


class CompileWatch:
    """Counts torch.compile's compilations while entered, and their host seconds, through dynamo's
    compile callbacks: they fire for each frame dynamo compiles (first compile or recompile) and for
    AOTAutograd's lazy backward compile at a graph's first backward (with a cold inductor cache; a
    warm one compiles the backward with the forward). torch._dynamo.utils.counters misses the lazy
    one: `stats.unique_graphs` and `aot_autograd.total` move at the forward's compile only, the
    backward's moves only inductor's cache counters (checked on torch 2.13, CPU)."""

    def __init__(self):
        self.count, self.seconds, self._t = 0, 0.0, None

    def __enter__(self):
        import torch._dynamo

        handler = getattr(torch._dynamo, "callback_handler", None)
        if handler is None or not hasattr(handler, "remove_start_callback"):
            self.count = None  # a torch without these hooks: no count, and the measurement goes on
            return self
        handler.register_start_callback(self._start)
        handler.register_end_callback(self._end)
        return self

    def __exit__(self, *exc):
        import torch._dynamo

        if self.count is not None:
            torch._dynamo.callback_handler.remove_start_callback(self._start)
            torch._dynamo.callback_handler.remove_end_callback(self._end)

    def _start(self, *_):  # older torch calls these without arguments
        self._t = time.perf_counter()

    def _end(self, *_):
        self.count += 1
        self.seconds += time.perf_counter() - self._t


def mark(device):
    """Now on the device's timeline: a CUDA event (recorded, not waited for, so no host sync per
    step) or, on CPU, the clock."""
    import torch

    if device != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def durations(marks, device):
    """Seconds between consecutive marks; CUDA events only after a sync."""
    if device == "cuda":
        return [a.elapsed_time(b) / 1e3 for a, b in pairwise(marks)]
    return [b - a for a, b in pairwise(marks)]


def timing(tokens, elapsed, tokens_per_step, step_s, compiles) -> dict:
    """The mean speed over the timed steps, and what tells whether one step dominates it: each step's
    seconds, the speed at the median step, and the compilations that ran while the clock did."""
    return dict(tokens_per_s=tokens / elapsed, tokens_per_s_median=tokens_per_step / statistics.median(step_s),
                step_s=[round(x, 3) for x in step_s], compiles_in_timed_region=compiles.count,
                compile_s_in_timed_region=round(compiles.seconds, 3))


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device):
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
