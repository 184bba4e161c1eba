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

import logging
import os
import time
from pathlib import Path

from distill import DistillError, __version__
from distill.io.files import fault_point
from distill.synthesize.config import SynthesizeConfig
from distill.synthesize.prompt_sets import load_prompt_set

from distill.synthesize.output import (changed_prompts, discard_rows, prepare_out,
                                     remove_skeleton)
from distill.synthesize.records import (ShardWriter, finished_rows, merge, repetition_rule,
                                   shard_path)

log = logging.getLogger(__name__)

def _rank() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _check_pair(cfg: SynthesizeConfig):
    """The expert's tokenizer (its template installed) and the pair's resolved rules (distill.decoding.pair):
    checked before anything is written or any model touches the device."""
    from distill.decoding.pair import check_pair

    return check_pair(cfg.expert, cfg.amateur, cfg.trust_remote_code, cfg.chat_template, cfg.chat_template_kwargs)


def _load(cfg: SynthesizeConfig, local_rank: int, vocab: int):
    """The models, on this rank's device."""
    import torch

    from distill.decoding.pair import check_embedding_rows
    from distill.io.models import load_causal_lm, torch_dtype

    device = cfg.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and _rank()[1] > 1:  # plain cuda is the first GPU: every rank would share it
        device = f"cuda:{local_rank}"
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
                           token_logprobs=cfg.token_logprobs, kv_cache=cfg.kv_cache, kv_block_size=cfg.kv_block_size,
                           kv_blocks=cfg.kv_blocks),
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
                      bon.pick(decoder.generate(requests), text, by_id, max(1, cfg.rows() // cfg.n)))
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
                if i % cfg.rows() == 0:
                    writer.sync()
                bar.update(1)
                # refresh=False: the bar's own interval decides when to redraw (see distill.io.progress)
                bar.set_postfix(tok_s=f"{decoder.tokens_generated / (time.perf_counter() - start):.0f}", refresh=False)
        finally:
            bar.close()
            writer.close()
            if decoder.kv_blocks:
                log.info("rank %d: paged KV cache of %d blocks; at most %d rows at once, %d preempted and recomputed",
                         rank, decoder.kv_blocks - 1, decoder.peak_rows, decoder.preemptions)
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
