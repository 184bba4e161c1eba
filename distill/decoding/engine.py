"""The batched contrastive-decoding engine around the CoDIT step (`distill.decoding.step`).

`ContrastiveDecoder` runs both models in one process with one KV cache each and keeps the
batch full by refilling finished rows (continuous batching). Two backends share that loop:
`distill.decoding.eager.EagerPair` (any Hugging Face causal LM, DynamicCache; the reference) and
`distill.decoding.fast.FastPair` (paged or static cache, CUDA graphs; the families of
`distill.decoding.families`: Llama, Mistral, Qwen2/3, Gemma-3, Olmo-2/3).

Admission with the paged cache (`batch_size="auto"`, the default): a queued row is admitted into
a free slot while the cache's free blocks hold its prompt and its next `check_every` tokens;
before each run of `check_every` steps every live row gets blocks for those steps, and where
they run out the longest live rows are preempted: stopped, put back at the head of the queue
with the tokens they have, and recomputed (prompt + tokens, one prefill) once blocks are free.
Counter-based sampling makes a row's tokens independent of all of this. Knobs: batch_size
(slots), kv_blocks (the pool), kv_block_size.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from distill import DistillError
from distill.decoding import CODIT_ALPHA
from distill.decoding.step import next_token

log = logging.getLogger(__name__)

AUTO_ROWS = 256  # slots of batch_size auto on a GPU with the paged cache; the free blocks bound the rows live
CPU_ROWS = 32  # batch_size auto elsewhere (CPU, the static cache, the eager engine)

# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

@dataclass
class DecodingConfig:
    """Settings of one decoding run. Defaults are the paper's public ones."""

    alpha: float = CODIT_ALPHA  # plausibility: keep tokens with p_e >= alpha * max p_e
    beta: float = 1.0  # amateur penalty; 0 = plain generation from the expert
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 4096  # the public CoDIT scripts' max_tokens (scripts/run_*.sh)
    # Rows decoded together; finished rows are refilled. "auto": on a GPU with the paged cache,
    # AUTO_ROWS slots, admitted while the cache's free blocks allow (kv_blocks); elsewhere CPU_ROWS.
    batch_size: int | str = "auto"
    # fast engine: "paged" hands out cache blocks (kv_block_size tokens) as rows grow and frees them
    # as rows finish, so the batch is bounded by the tokens rows hold, not by max_new_tokens;
    # "static" keeps prompt + max_new_tokens columns per row (the engine before the paged cache).
    kv_cache: str = "paged"
    kv_block_size: int = 128
    # paged cache: blocks in the pool (all models); None = what fits in free GPU memory beside the
    # weights (90 % of it, less 1 GiB and the rows' logits), or on CPU room for every row at full length.
    kv_blocks: int | None = None
    engine: str = "auto"  # auto | eager | fast ("auto": fast for the families it supports, on GPU and CPU)
    cuda_graphs: bool = True  # fast engine only; False = plain eager kernels (a fallback)
    check_every: int = 8  # steps between host checks for finished rows (no host sync in between)
    # Refill finished rows once this many slots are free (0 = auto: batch / 16 on a GPU, 1 on CPU).
    # On a GPU a refill is a prefill outside the CUDA graph that reads all weights, costing more
    # than a decode step, so it pays to batch refills; on CPU a few rows' prefill costs a
    # fraction of a step (tiny zoo: 5 ms against 13 ms), and waiting only idles slots.
    refill_min: int = 0
    # fast engine: torch.compile the per-layer work around attention, fusing its small kernels.
    # None = on a GPU only: +13 % tokens/s on an H100 at batch 128 (BENCHMARKS.md) for a compile
    # of ~10 s; on CPU the tiny models' compiled kernels do not pay. A failed compile runs eagerly.
    compile_layers: bool | None = None
    # fast engine: "sdpa" reads every row's cache up to the longest live row (bucketed); "flex"
    # (FlexAttention, compiled) reads only each row's own blocks, which pays most with long,
    # uneven responses (+6 % on an H100 at batch 128 even with 256 new tokens each; costs a
    # compile). "auto": flex on a GPU, falling back to sdpa if its compile fails; sdpa on CPU.
    decode_attention: str = "auto"
    # fast engine: step the amateur on a second CUDA stream, so that inside the graph the two models'
    # kernels overlap (they are independent until the token choice). None = on a GPU: +6.6 % CoDIT
    # tokens/s on an H100 at batch 128, +4.1 % on an H200 (BENCHMARKS.md). No effect on CPU.
    concurrent_models: bool | None = None
    # Record each chosen token's log_softmax(score), the value the public CoDIT code stores per token
    # (vLLM's logprobs of the contrastive scores it samples from). Costs one more softmax per step.
    token_logprobs: bool = False

    def levers_on(self, gpu: bool) -> tuple[str, bool, bool]:
        """The fast engine's decode attention, layer compile and second stream, "auto" / None resolved."""
        attention = ("flex" if gpu else "sdpa") if self.decode_attention == "auto" else self.decode_attention
        compiled = gpu if self.compile_layers is None else self.compile_layers
        return attention, compiled, gpu if self.concurrent_models is None else self.concurrent_models

    def validate(self) -> None:
        from distill.io.validate import finite

        finite(alpha=self.alpha, beta=self.beta, temperature=self.temperature, top_p=self.top_p)
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise DistillError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise DistillError(f"batch_size must be a number of rows or auto, got {self.batch_size!r}")
        for name in ("max_new_tokens", "check_every", "kv_block_size") + (
                () if self.batch_size == "auto" else ("batch_size",)):
            if getattr(self, name) < 1:
                raise DistillError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_blocks is not None and self.kv_blocks < 2:
            raise DistillError(f"kv_blocks must be >= 2 (one is scratch), got {self.kv_blocks}")
        if self.kv_cache not in ("paged", "static"):
            raise DistillError(f"kv_cache must be paged or static, got {self.kv_cache!r}")
        if self.refill_min < 0:
            raise DistillError(f"refill_min must be >= 0, got {self.refill_min}")
        if self.decode_attention not in ("auto", "sdpa", "flex"):
            raise DistillError(f"decode_attention must be auto, sdpa or flex, got {self.decode_attention!r}")
        if self.engine not in ("auto", "eager", "fast"):
            raise DistillError(f"engine must be auto, eager or fast, got {self.engine!r}")


@dataclass
class Request:
    key: str  # the prompt's id
    prompt_ids: Sequence[int]
    seed: int  # the row's own seed (see derive_seed); fixes its sampling noise
    max_new_tokens: int | None = None  # its own cap, at most the config's (None: the config's)
    # tokens already generated for it: a preempted row resumes from them (prompt + prefix recomputed)
    prefix: Sequence[int] = ()
    prefix_logprobs: Sequence[float] | None = None


@dataclass
class Result:
    key: str
    tokens: list[int]  # generated ids, including the stop token when finish_reason == "stop"
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    extra: dict = field(default_factory=dict)


def derive_seed(seed: int, key: str) -> int:
    """A row seed from (run seed, prompt id): stable across processes, batch sizes and resumes."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


class ContrastiveDecoder:
    """Batched two-model decoding with continuous batching. `amateur` may be None when beta == 0.

    score_hook(keys, steps, active, scores), if given, sees every score matrix (tests use it).
    """

    def __init__(self, expert, amateur, vocab_size: int, stop_token_ids: Iterable[int],
                 config: DecodingConfig | None = None, pad_token_id: int = 0,
                 score_hook: Callable | None = None):
        self.config = config or DecodingConfig()
        self.config.validate()
        if self.config.beta != 0.0 and amateur is None:
            raise DistillError("beta != 0 needs an amateur model (or use beta=0 / --method direct)")
        self.models = [expert] if self.config.beta == 0.0 else [expert, amateur]
        self.vocab_size = vocab_size
        self.stop_ids = sorted({int(t) for t in stop_token_ids if t is not None})
        self.pad_token_id = pad_token_id
        self.score_hook = score_hook
        self.device = next(expert.parameters()).device
        if amateur is not None and next(amateur.parameters()).device != self.device:
            raise DistillError(f"expert and amateur must be on one device (expert on {self.device}, amateur on "
                               f"{next(amateur.parameters()).device}); the engine steps both in one process")
        self.tokens_generated = 0
        self.preemptions = 0  # paged cache: rows stopped for want of blocks and recomputed later
        self.deferred = 0  # paged cache: admissions put off because the free blocks did not hold the row
        self.peak_rows = 0  # the most rows live at once (the batch the engine held)
        # summed over decode steps: steps, rows live, their cache tokens (mean batch = row_steps / steps)
        self.steps = self.row_steps = self.kv_token_steps = 0
        self.kv_blocks: int | None = None  # paged cache: the pool's blocks
        self.setup_seconds = 0.0
        self.engine_used: str | None = None  # set by each generate(): "fast" | "eager"
        self.engine_reason: str | None = None  # why not the fast engine (None when it ran)
        self._engine_warned: set[str] = set()  # one warning per reason, not per generate() call

    def _backend(self, n_requests: int, capacity: int):
        """The backend and the batch it runs (a static cache shrinks it to what fits in GPU memory).

        Records which engine ran and why on `engine_used` ("fast" | "eager") and `engine_reason`
        (None, or why not the fast engine), for the dataset card.
        """
        engine = self.config.engine
        self.engine_used = "eager"
        self.engine_reason = "engine=eager was requested"
        # auto: the fast engine wherever it runs the family, CPU included (on the tiny zoo's synthesis it
        # is ~10 % faster than the eager one there, with the same rows: BENCHMARKS.md, paged KV cache)
        if engine in ("fast", "auto"):
            from distill.decoding.fast import FastPair, unsupported_reason

            reasons = [r for r in (unsupported_reason(m) for m in self.models) if r]
            if engine == "fast" and reasons:
                raise DistillError(f"the fast engine cannot run this model: {reasons[0]}; use engine=eager")
            if not reasons:
                gpu = self.device.type == "cuda"
                attention, compiled, concurrent = self.config.levers_on(gpu)
                levers = dict(cuda_graphs=self.config.cuda_graphs, compile_layers=compiled, decode_attention=attention,
                              flex_fallback=self.config.decode_attention == "auto", concurrent=concurrent)
                self.engine_used, self.engine_reason = "fast", None
                if self.config.kv_cache == "paged":
                    return self._paged(n_requests, capacity, gpu, levers)
                batch = self._slots(n_requests, CPU_ROWS)
                if gpu:
                    columns = FastPair.aligned_capacity(capacity, attention)
                    from distill.decoding import paged

                    fit = paged.rows_that_fit(self.models, columns)
                    if fit < 1:
                        raise DistillError(f"no room in GPU memory for a KV cache of {capacity} tokens per row; "
                                           f"lower max_new_tokens or use a larger GPU")
                    if fit < batch:
                        log.warning("batch %d does not fit a static KV cache of %d tokens per row; using %d",
                                    batch, capacity, fit)
                        batch = fit
                return FastPair(self.models, batch, capacity, **levers), batch
            # One warning per decoder and reason (not per call of generate, not per model): a GPU run
            # on the eager engine is a silent slowdown otherwise.
            reason = "; ".join(dict.fromkeys(reasons))
            if reason not in self._engine_warned:
                self._engine_warned.add(reason)
                log.warning("using the eager engine: the fast engine cannot run this model (%s); the eager engine "
                            "steps Hugging Face's own forward per token as `generate` does, several times slower "
                            "than the fast engine on a GPU (BENCHMARKS.md, CoDIT decoding)", reason)
            self.engine_reason = reason
        from distill.decoding.eager import EagerPair

        batch = self._slots(n_requests, CPU_ROWS)
        return EagerPair(self.models, batch, self.pad_token_id), batch

    def _paged(self, n_requests: int, capacity: int, gpu: bool, levers: dict):
        """The fast backend on a paged cache: slots (batch_size, or AUTO_ROWS on a GPU when auto) and a
        block pool (kv_blocks, or what free GPU memory holds; on CPU room for every slot at full length)."""
        from distill.decoding import paged
        from distill.decoding.fast import FastPair

        block, rows = self.config.kv_block_size, self._slots(n_requests, AUTO_ROWS if gpu else CPU_ROWS)
        static = FastPair.aligned_capacity(capacity, levers["decode_attention"])
        self.kv_blocks = paged.pool_blocks(self.models, capacity, static, block, rows, self.config.kv_blocks, gpu)
        pair = FastPair(self.models, rows, capacity, kv_cache="paged", kv_blocks=self.kv_blocks, block_size=block,
                        **levers)
        log.info("paged KV cache: %d blocks of %d tokens (%d rows at full length), %d slots%s", self.kv_blocks - 1,
                 block, (self.kv_blocks - 1) // pair.blocks.max_blocks, rows,
                 "" if pair.blocks.fixed else ", admitted while blocks are free")
        return pair, rows

    def _slots(self, n_requests: int, auto_rows: int) -> int:
        """The batch: batch_size (auto_rows when "auto"), never more than the requests."""
        return min(n_requests, auto_rows if self.config.batch_size == "auto" else self.config.batch_size)

    def generate(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Yield one Result per request, in order of completion."""
        queue = deque(requests)
        if not queue:
            return
        cfg, dev = self.config, self.device
        capacity = max(len(r.prompt_ids) for r in queue) + cfg.max_new_tokens
        started = time.perf_counter()
        backend, batch = self._backend(len(queue), capacity)
        self.backend, self.batch = backend, batch  # the backend kept for its statistics (paged: blocks in use)
        self.stops = torch.tensor(self.stop_ids or [-1], device=dev)
        self.out = torch.zeros(batch, cfg.max_new_tokens + 1, dtype=torch.long, device=dev)
        self.lp_out = torch.zeros(batch, cfg.max_new_tokens + 1, device=dev) if cfg.token_logprobs else None
        self.n = torch.zeros(batch, dtype=torch.long, device=dev)  # tokens generated per row
        self.cur = torch.zeros(batch, dtype=torch.long, device=dev)  # last sampled token per row
        self.active = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.seeds = torch.zeros(batch, dtype=torch.long, device=dev)
        self.caps = torch.full((batch,), cfg.max_new_tokens, dtype=torch.long, device=dev)  # each row's own cap
        # The fast backend can run the token choice inside its CUDA graph (not with a score hook,
        # which needs the host).
        fused = False
        if hasattr(backend, "prepare"):
            post = None if self.score_hook else (lambda logits: self._pick(logits, slice(None), None))
            fused = backend.prepare(self.cur, self.active, post)
        self.setup_seconds = time.perf_counter() - started  # cache allocation and graph capture
        slots: list[Request | None] = [None] * batch
        free = self._admit(backend, slots, list(range(batch)), queue)
        refill_min = cfg.refill_min or (max(1, batch // 16) if dev.type == "cuda" else 1)
        while any(s is not None for s in slots):
            live = [i for i, s in enumerate(slots) if s is not None]
            self.peak_rows = max(self.peak_rows, len(live))
            # the batch held and the cache it must read, counted on the host (benchmarks report them)
            self.steps += cfg.check_every
            self.row_steps += len(live) * cfg.check_every
            if hasattr(backend, "bound"):
                self.kv_token_steps += sum(backend.bound[i] for i in live) * cfg.check_every
            # paged cache: blocks for every live row's next check_every tokens, before the steps that
            # write them (the steps never allocate); where they run out the longest rows wait
            preempted = backend.reserve(cfg.check_every) if hasattr(backend, "reserve") else []
            if preempted:
                self._preempt(preempted, slots, queue)
                free += preempted
            for _ in range(cfg.check_every):
                logits = backend.decode(self.cur, self.active)
                if not fused:
                    self._pick(logits, slice(None), [r.key if r else None for r in slots] if self.score_hook else None)
            done = ((~self.active).nonzero().flatten()).tolist()  # one host sync per check_every steps
            done = [i for i in done if slots[i] is not None]
            if done:
                lengths, stopped = self.n.tolist(), self.stopped.tolist()
                rows = self.out[done].tolist()
                lps = self.lp_out[done].tolist() if self.lp_out is not None else [None] * len(done)
                for row, lp, i in zip(rows, lps, done):
                    req = slots[i]
                    slots[i] = None
                    self.tokens_generated += lengths[i] - len(req.prefix)  # a resumed row counted its prefix
                    extra = {"token_logprobs": lp[:lengths[i]]} if lp is not None else {}
                    yield Result(req.key, row[:lengths[i]], "stop" if stopped[i] else "length",
                                 len(req.prompt_ids), extra)
                backend.release(done)
                free += done
            # Rows' tokens do not depend on when they start (counter-based sampling), so waiting
            # for several free slots changes no output, only how often prefill runs.
            if queue and free and (len(free) >= min(refill_min, len(queue)) or len(free) == batch
                                   or not any(s is not None for s in slots)):
                free = self._admit(backend, slots, free, queue)
                if not any(s is not None for s in slots):
                    raise DistillError("internal: the paged KV cache admitted no row into an empty batch")

    def _admit(self, backend, slots, free: list[int], queue: deque) -> list[int]:
        """Requests from the queue into free slots while the backend has room; returns the slots left free."""
        cfg, taken, reqs = self.config, [], []
        for i in free:
            if not queue:
                break
            r = queue[0]
            if hasattr(backend, "admit") and not backend.admit(i, len(r.prompt_ids) + len(r.prefix), cfg.check_every):
                self.deferred += 1
                break  # paged cache: no blocks for it now; rows finishing free them
            taken.append(i)
            reqs.append(queue.popleft())
        if not taken:
            return free
        for i, r in zip(taken, reqs):
            slots[i] = r
        idx = torch.tensor(taken, device=self.device)
        logits = backend.prefill(taken, [list(r.prompt_ids) + list(r.prefix) for r in reqs])
        self.seeds[idx] = torch.tensor([r.seed for r in reqs], device=self.device)
        self.caps[idx] = torch.tensor([min(r.max_new_tokens or cfg.max_new_tokens, cfg.max_new_tokens) for r in reqs],
                                      device=self.device)
        self.n[idx] = torch.tensor([len(r.prefix) for r in reqs], device=self.device)
        for i, r in zip(taken, reqs):  # a resumed row's tokens so far, as if it had never stopped
            if r.prefix:
                self.out[i, :len(r.prefix)] = torch.tensor(list(r.prefix), device=self.device)
                if self.lp_out is not None and r.prefix_logprobs is not None:
                    self.lp_out[i, :len(r.prefix)] = torch.tensor(list(r.prefix_logprobs), device=self.device)
        self.stopped[idx] = False
        self.active[idx] = True
        self._pick(logits, idx, [r.key for r in reqs])
        return [i for i in free if i not in set(taken)]

    def _preempt(self, preempted: list[int], slots, queue: deque) -> None:
        """Rows the paged cache had no blocks for: stopped now, back at the head of the queue with the
        tokens they have, and recomputed (prompt + those tokens, one prefill) when blocks are free."""
        idx = torch.tensor(preempted, device=self.device)
        self.active[idx] = False
        n = self.n[idx].tolist()
        rows = self.out[idx].tolist()
        lps = self.lp_out[idx].tolist() if self.lp_out is not None else [None] * len(preempted)
        # the longest goes back first, at the head of the queue: admission waits until it fits again,
        # so long rows are not starved by short ones
        for i, k, row, lp in sorted(zip(preempted, n, rows, lps), key=lambda t: t[1]):
            req = slots[i]
            slots[i] = None
            self.tokens_generated += k - len(req.prefix)
            queue.appendleft(Request(req.key, req.prompt_ids, req.seed, req.max_new_tokens, tuple(row[:k]),
                                     None if lp is None else tuple(lp[:k])))
        self.preemptions += len(preempted)
        log.debug("paged KV cache: %d row(s) preempted for want of blocks, recomputed later", len(preempted))

    def _pick(self, logits: list[torch.Tensor], rows, keys) -> None:
        """Choose the next token for `rows` (a slice or index tensor) and update their state on device."""
        cfg = self.config
        n = self.n[rows]
        tok, scores = next_token(logits[0], logits[1] if len(logits) > 1 else None, cfg,
                                 self.seeds[rows], n, self.vocab_size)
        if self.score_hook is not None:
            self.score_hook(keys, n.tolist(), self.active[rows].tolist(), scores)
        live = self.active[rows]
        # `out` has one spare column, so a finished row (n == max_new_tokens) writes its filler
        # token there; columns at or beyond a row's n are never read.
        self.out[rows] = self.out[rows].scatter(1, n[:, None], tok[:, None])
        if self.lp_out is not None:
            lp = torch.log_softmax(scores, dim=-1).gather(1, tok[:, None])
            self.lp_out[rows] = self.lp_out[rows].scatter(1, n[:, None], lp)
        # A broadcast compare, not torch.isin: with more than ~20 stop ids isin sorts and calls
        # unique, a host sync that invalidates CUDA-graph capture (the step then runs without graphs).
        hit_stop = (tok[:, None] == self.stops).any(-1) & live
        n = n + live.long()
        self.n[rows] = n
        self.cur[rows] = tok
        self.stopped[rows] = self.stopped[rows] | hit_stop
        self.active[rows] = live & ~hit_stop & (n < self.caps[rows])
