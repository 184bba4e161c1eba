"""`distill synthesize`: prompts in, a CoDIT (or direct) instruction dataset out.

    distill synthesize --expert POST --amateur BASE --prompts P.jsonl --out D

Each prompt is rendered with the expert's chat template and answered by the contrastive
decoding engine (`distill.decoding.engine`). Rows are appended to D/shards/rank-XXXXX.jsonl as they
finish; rerunning the same command after a crash (even `kill -9`) skips finished ids, cuts a
torn last line and continues, and because each row samples from a seed derived from
(seed, id), the result equals an uninterrupted run. Under `torchrun` / the `deepspeed`
launcher (RANK, WORLD_SIZE, LOCAL_RANK) rank r answers prompts[r::world_size]; the rank that
finds every prompt answered writes the final dataset (or run `distill synthesize --merge D`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional
from pathlib import Path

from distill import DistillError, __version__
from distill.config import opt
from distill.evaluate.judge import judge_option, judge_settings
from distill.decoding.step import CODIT_ALPHA
from distill.io.files import fault_point
from distill.synthesize.prompt_sets import LAYOUTS, load_prompt_set

PROMPT_LAYOUTS = ("auto",) + LAYOUTS
from distill.synthesize.output import (SELECTION_KEYS, changed_prompts, discard_rows, prepare_out,
                                     remove_skeleton)
from distill.synthesize.records import (ShardWriter, finished_rows, merge, repetition_rule,
                                   shard_path)

log = logging.getLogger(__name__)

# Settings that change the rows; a resumed run must match them (batch size, device do not).
RESUME_KEYS = ("expert", "amateur", "prompts", "method", "alpha", "beta", "temperature", "top_p",
               "max_new_tokens", "seed", "chat_template", "chat_template_kwargs", "token_logprobs", "repetition_rule",
               "repetition_ngram", "repetition_threshold")
BEST_OF_N_KEYS = ("n", "judge", "judge_template")  # change best-of-n's rows too


@dataclass(kw_only=True)
class SynthesizeConfig:
    """One synthesis run: the `distill synthesize` options, the recipe's `synthesis:` section and
    its `prompts:` keys. The defaults are the public CoDIT code's settings."""

    expert: str = opt(help="post-trained (chat) model: local HF directory or HF-cache id")
    prompts: str = opt(help="prompts: .jsonl, .json, .parquet, a datasets directory or a cached hub dataset; rows in "
                            "any layout of --prompt-layout")
    out: str = opt(help="output dataset directory; rerun the same command to resume an interrupted run")
    amateur: Optional[str] = opt(None, "the expert's pre-trained base model (same tokenizer); not needed for "
                                       "--method direct")
    method: Literal["codit", "direct", "best-of-n"] = opt(
        "codit", "codit: contrastive decoding; direct: sampling from the expert alone (beta=0; the amateur is never "
                 "loaded); best-of-n: --n direct samples per prompt, the one --judge scores best is kept")
    alpha: Optional[float] = opt(None, "plausibility: only tokens with p_expert >= alpha * max p_expert are candidates "
                                       f"(None: {CODIT_ALPHA} for codit, 0 for direct, i.e. plain sampling)")
    beta: float = opt(1.0, "weight of the amateur's log-probability subtracted from the expert's")
    temperature: float = opt(1.0, "sampling temperature on the contrastive scores; 0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling mass (1.0 = off)")
    max_new_tokens: int = opt(4096, "longest response in tokens (the max_tokens of the public CoDIT scripts but "
                                    "run_Qwen3-8B.sh, which uses 2048)")
    batch_size: int = opt(32, "rows decoded together; finished rows are refilled from the queue (128+ on a big GPU)")
    seed: int = opt(0, "run seed; each row samples with a seed derived from (seed, id)")
    # Which prompts (distill.synthesize.prompt_sets): the layout, the turns kept, the counted drops
    # (empty, over max_prompt_chars, duplicate text), then the first `limit` or a seeded `sample`.
    limit: Optional[int] = opt(None, "only the first N prompts (after the drops below)")
    sample: Optional[int] = opt(None, "N prompts drawn with --seed, kept in source order")
    prompt_layout: Literal[PROMPT_LAYOUTS] = opt(
        "auto", "layout of the prompt rows: instruction, messages, conversation (LMSYS-Chat-1M, WildChat), sharegpt "
                "(conversations with from/value), alpaca (instruction + input); auto detects it from the first row")
    prompt_turns: Literal["first", "all"] = opt(
        "first", "first: the first user turn (with any system turn before it), as the public CoDIT code; all: every "
                 "turn up to the last user turn")
    max_prompt_chars: Optional[int] = opt(16000, "drop prompts longer than this many characters, counted in the card")
    dedupe: bool = opt(True, "keep only the first of prompts whose normalised text repeats (--no-dedupe keeps all)")
    long_prompts: Literal["drop", "error"] = opt(
        "drop", "a prompt whose rendered tokens + --max-new-tokens exceed the models' positions "
                "(max_position_embeddings): drop it, counted in the card, or stop with an error")
    device: Optional[str] = opt("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0, ...")
    dtype: Optional[Literal["auto", "float32", "bfloat16", "float16"]] = opt(
        "auto", "model dtype; auto = bfloat16 on cuda (float16 where bf16 is not native), float32 on cpu")
    engine: Literal["auto", "eager", "fast"] = opt(
        "auto", "auto: the fast static-cache/CUDA-graph engine on cuda for Llama, Mistral, Qwen2/3, Gemma-3 and "
                "Olmo-2/3, else the eager Hugging Face engine (the card records which ran)")
    cuda_graphs: bool = opt(True, "fast engine: replay the decode step as CUDA graphs (--no-cuda-graphs: a fallback "
                                  "if graph capture misbehaves on your setup)")
    compile_layers: Optional[bool] = opt(None, "fast engine: torch.compile the per-layer work around attention "
                                               "(None: on a GPU only)")
    decode_attention: Literal["auto", "sdpa", "flex"] = opt(
        "auto", "fast engine: flex (FlexAttention: each row reads only its own live cache blocks) or sdpa (every "
                "row reads up to the longest row); auto = flex on a GPU, with sdpa where flex does not compile")
    concurrent_models: Optional[bool] = opt(None, "fast engine: step the amateur on a second CUDA stream so the two "
                                                  "models' kernels overlap inside the CUDA graph (None: on a GPU only)")
    repetition_rule: Literal["public", "ngram"] = opt(
        "public", "which rows are marked repetitive: public = the public CoDIT code's rule (a response of 100+ "
                  "characters whose top character 2/3/4-gram is >= 0.16/0.18/0.20 of its n-grams, or whose top "
                  "character 100-gram occurs 10+ times); ngram = distill's own rule, set by the two options below")
    repetition_ngram: int = opt(20, "--repetition-rule ngram: n of the character n-grams")
    repetition_threshold: float = opt(0.3, "--repetition-rule ngram: flag a response as repetitive when more than "
                                           "this fraction of its characters lie in a repeated character n-gram")
    chat_template: Optional[str] = opt(None, "chat template (a .jinja file or the template text) for an expert whose "
                                             "tokenizer has none; both models get the prompt it renders",
                                       metavar="FILE_OR_TEXT")
    chat_template_kwargs: Optional[str] = opt(
        None, "a JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}' (a template that reads "
              "enable_thinking, as Qwen3's does, gets false unless set here, as the public CoDIT code runs it); "
              "recorded in provenance", metavar="JSON")
    token_logprobs: bool = opt(False, "store each chosen token's log_softmax(score) in the row's token_logprobs (as "
                                      "the public code's 'score' field), for analysis")
    # best-of-n (distill.synthesize.best_of_n): N direct samples, judged 1..10 (distill.evaluate.judge)
    n: int = opt(4, "best-of-n: samples per prompt")
    judge: str = judge_option("judge")  # the judge's settings, as `distill evaluate`'s
    judge_url: Optional[str] = judge_option("judge_url")
    judge_template: Optional[str] = judge_option("judge_template")
    judge_concurrency: int = judge_option("judge_concurrency")
    judge_timeout: float = judge_option("judge_timeout")
    judge_retries: int = judge_option("judge_retries")
    judge_max_new_tokens: int = judge_option("judge_max_new_tokens")
    overwrite: bool = opt(False, "replace an output made with different settings")
    trust_remote_code: bool = opt(False, "allow model code from the model directory")
    progress: bool = opt(True, "show a progress bar (--no-progress: none)")

    def __post_init__(self):
        self.device, self.dtype = self.device or "auto", self.dtype or "auto"  # null in a recipe: auto
        if self.method not in ("codit", "direct", "best-of-n"):
            raise DistillError(f"method must be codit, direct or best-of-n, got {self.method!r}")
        if self.alpha is None:
            self.alpha = CODIT_ALPHA if self.method == "codit" else 0.0
        if self.method != "codit":
            self.beta, self.amateur = 0.0, None
        if self.method == "best-of-n":
            from distill.io.validate import at_least

            at_least(1, n=self.n, judge_concurrency=self.judge_concurrency)
            if not self.judge_timeout > 0:
                raise DistillError(f"judge_timeout must be > 0, got {self.judge_timeout}")
        if self.method == "codit" and not self.amateur:
            raise DistillError("method codit needs --amateur (the expert's base model); or use --method direct")
        # Every value checked before anything is written: a run that fails here leaves nothing behind.
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise DistillError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        repetition_rule(self.repetition_rule, self.repetition_ngram, self.repetition_threshold)  # raises if bad
        from distill.synthesize.fit import LONG_PROMPT_POLICIES

        if self.long_prompts not in LONG_PROMPT_POLICIES:
            raise DistillError(f"long_prompts must be drop or error, got {self.long_prompts!r}")
        from distill.decoding.engine import DecodingConfig
        from distill.decoding.pair import template_kwargs

        if isinstance(self.chat_template_kwargs, dict):  # recipes give a mapping; settings keep one JSON form
            self.chat_template_kwargs = json.dumps(self.chat_template_kwargs, sort_keys=True)
        template_kwargs(_NoTemplate, self.chat_template_kwargs)  # not JSON: an error now, before anything loads
        DecodingConfig(alpha=self.alpha, beta=self.beta, temperature=self.temperature, top_p=self.top_p,
                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, engine=self.engine,
                       decode_attention=self.decode_attention).validate()

    def settings(self) -> dict:
        # The prompt selection is recorded but not a resume key: rows are keyed by prompt id and their
        # text is checked, so another selection keeps what it shares with the old one.
        keys = RESUME_KEYS + (BEST_OF_N_KEYS if self.method == "best-of-n" else ())
        return {k: getattr(self, k) for k in keys} | {k: getattr(self, k) for k in SELECTION_KEYS}

    def judge_settings(self):
        return judge_settings(self, batch_size=self.batch_size)


def _rank() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


class _NoTemplate:
    chat_template = None


def _check_pair(cfg: SynthesizeConfig):
    """The expert's tokenizer (its template installed) and the pair's resolved rules (distill.decoding.pair):
    checked before anything is written or any model touches the device."""
    from distill.decoding.pair import check_pair

    return check_pair(cfg.expert, cfg.amateur, cfg.trust_remote_code, cfg.chat_template, cfg.chat_template_kwargs)


def _load(cfg: SynthesizeConfig, local_rank: int, vocab: int):
    """The models, on this rank's device."""
    import torch

    from distill.decoding.engine import check_embedding_rows
    from distill.io.models import load_causal_lm, torch_dtype

    device = cfg.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # one GPU per rank; CUDA graphs capture on the current device
    dtype = torch_dtype(cfg.dtype, device)
    expert = load_causal_lm(cfg.expert, dtype, device, cfg.trust_remote_code, what="expert")
    check_embedding_rows(expert, vocab, f"expert {cfg.expert}")
    amateur = None
    if cfg.amateur:
        amateur = load_causal_lm(cfg.amateur, dtype, device, cfg.trust_remote_code, what="amateur")
        check_embedding_rows(amateur, vocab, f"amateur {cfg.amateur}")
    return expert, amateur


def synthesize(cfg: SynthesizeConfig) -> Path:
    """Run (or resume) one synthesis; returns the dataset directory D.

    One writer per D (`distill.io.locking`): another run on D is refused at once while this one
    runs, naming it; the ranks of one launch share the lock. A run that fails before its first
    row removes the D it created, so a failure leaves no empty skeleton behind."""
    from distill.io.locking import output_lock

    out = Path(cfg.out)
    with output_lock(out, "synthesis output") as lock:
        created = not out.exists()
        empty = created or (out.is_dir() and not any(out.iterdir()))
        try:
            return _synthesize(cfg, lock)
        except BaseException:
            if empty and _rank()[1] == 1:  # one process: nobody else can be writing into D
                remove_skeleton(out, created)
            raise


def _best_of_n(cfg: SynthesizeConfig, out: Path):
    from distill.synthesize.best_of_n import BestOfN

    rule_rows = []
    if cfg.judge == "rule":  # the rule judge reads the prompts' own constraints (the world's prompt rows)
        from distill.io.sources import open_rows

        rule_rows = [r for r in open_rows(cfg.prompts) if isinstance(r, dict) and r.get("constraints")]
    return BestOfN(cfg.n, cfg.seed, cfg.judge_settings(), out / "judgments.jsonl", rule_rows)


def _synthesize(cfg: SynthesizeConfig, lock) -> Path:
    from distill.decoding.engine import ContrastiveDecoder, DecodingConfig, Request, derive_seed
    from distill.decoding.pair import render_prompt
    from distill.io.progress import progress_bar

    rank, world, local_rank = _rank()
    prompt_set = load_prompt_set(cfg.prompts, layout=cfg.prompt_layout, turns=cfg.prompt_turns,
                                 max_prompt_chars=cfg.max_prompt_chars, limit=cfg.limit, sample=cfg.sample,
                                 seed=cfg.seed, dedupe=cfg.dedupe)
    prompts = prompt_set.rows
    tokenizer, pair = _check_pair(cfg)
    from distill.synthesize.fit import fit_prompts

    # Before anything is written: prompts longer than the models' positions (with the response) are
    # dropped and counted, or refused (--long-prompts error).
    prompts = fit_prompts(prompts, tokenizer, pair.chat_template_kwargs,
                          [(cfg.expert, "expert"), (cfg.amateur, "amateur")], cfg.max_new_tokens, cfg.long_prompts,
                          prompt_set.stats)
    out = prepare_out(cfg, [p["id"] for p in prompts], {"pair": pair.as_dict(), "prompt_set": prompt_set.stats})
    fault_point("synthesize.prepared")
    done = finished_rows(out)
    if changed_prompts(done, prompts, cfg):
        discard_rows(out)
        done = {}
    writer = ShardWriter(shard_path(out, rank))
    todo = [p for p in prompts[rank::world] if p["id"] not in done]
    log.info("rank %d/%d: %d prompts, %d already done, %d to go", rank, world,
             len(prompts[rank::world]), len(prompts[rank::world]) - len(todo), len(todo))
    if todo:
        bon = _best_of_n(cfg, out) if cfg.method == "best-of-n" else None  # a bad judge fails before models load
        expert, amateur = _load(cfg, local_rank, pair.vocab_size)
        by_id = {p["id"]: p for p in todo}
        if bon:
            requests = bon.requests(todo, lambda p: render_prompt(tokenizer, p["messages"], pair.chat_template_kwargs))
        else:
            requests = [Request(p["id"], render_prompt(tokenizer, p["messages"], pair.chat_template_kwargs),
                                derive_seed(cfg.seed, p["id"])) for p in todo]
        decoder = ContrastiveDecoder(
            expert, amateur, pair.vocab_size, pair.stop_ids,
            DecodingConfig(alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, engine=cfg.engine,
                           cuda_graphs=cfg.cuda_graphs, compile_layers=cfg.compile_layers,
                           decode_attention=cfg.decode_attention, concurrent_models=cfg.concurrent_models,
                           token_logprobs=cfg.token_logprobs),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        provenance = {"method": cfg.method, "expert": cfg.expert, "amateur": cfg.amateur, "alpha": cfg.alpha,
                      "beta": cfg.beta, "temperature": cfg.temperature, "top_p": cfg.top_p,
                      "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "distill_version": __version__}
        start = time.perf_counter()
        bar = progress_bar(total=len(todo), desc=f"synthesize rank {rank}", unit="prompt", disable=not cfg.progress)
        try:
            def text(r):
                kept = r.tokens[:-1] if r.finish_reason == "stop" else r.tokens
                return tokenizer.decode(kept, skip_special_tokens=True).strip()

            stream = (((r, {}) for r in decoder.generate(requests)) if bon is None else
                      bon.pick(decoder.generate(requests), text, by_id, max(1, cfg.batch_size // cfg.n)))
            for i, (result, more) in enumerate(stream, 1):
                tokens = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
                response = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                rep = repetition_rule(cfg.repetition_rule, cfg.repetition_ngram, cfg.repetition_threshold)(response)
                p = by_id[result.key]
                writer.write({"id": p["id"], "instruction": p["instruction"],
                              "messages": p["messages"] + [{"role": "assistant", "content": response}],
                              "response": response, "prompt_tokens": result.prompt_tokens,
                              "response_tokens": len(tokens), "finish_reason": result.finish_reason,
                              "repetition": rep.score, "repetitive": rep.repetitive,
                              "repetition_rule": rep.rule,
                              **provenance, "engine": getattr(decoder, "engine_used", None),
                              "row_seed": derive_seed(cfg.seed, p["id"]), **result.extra, **more})  # more: best-of-n
                fault_point("synthesize.row")
                if i % cfg.batch_size == 0:
                    writer.sync()
                bar.update(1)
                # refresh=False: the bar's own interval decides when to redraw (see distill.io.progress)
                bar.set_postfix(tok_s=f"{decoder.tokens_generated / (time.perf_counter() - start):.0f}", refresh=False)
        finally:
            bar.close()
            writer.close()
            if bon:
                bon.close()
    else:
        writer.close()
    with lock.critical():  # one merge at a time: the ranks of a launch may finish together
        fault_point("synthesize.merge")
        merged = merge(out)
    if merged is not None:
        log.info("dataset written to %s", out)
    elif world > 1:
        log.info("rank %d finished; other ranks still running; the last one to finish writes the dataset "
                 "(or run `distill synthesize --merge %s`)", rank, out)
    else:  # one process answered every prompt: rows can only be missing if something else removed them
        missing = len({p["id"] for p in prompts} - set(finished_rows(out)))
        raise DistillError(f"{out}: {missing} prompt(s) have no row after this run answered them all (its shards "
                           f"were changed while it ran); rerun the same command to generate them")
    return out


__all__ = ["SynthesizeConfig", "synthesize", "merge"]
