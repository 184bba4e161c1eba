"""`distill synthesize`: prompts in, a CoDIT (or direct) instruction dataset out.

    distill synthesize --expert POST --amateur BASE --prompts P.jsonl --out D

Each prompt is rendered with the expert's chat template and answered by the contrastive
decoding engine (`distill.decoding`). Rows are appended to D/shards/rank-XXXXX.jsonl as they
finish; rerunning the same command after a crash (even `kill -9`) skips finished ids, cuts a
torn last line and continues, and because each row samples from a seed derived from
(seed, id), the result equals an uninterrupted run. Under `torchrun` / the `deepspeed`
launcher (RANK, WORLD_SIZE, LOCAL_RANK) rank r answers prompts[r::world_size]; the rank that
finds every prompt answered writes the final dataset (or run `distill synthesize --merge D`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from distill import DistillError, __version__
from distill.fsutil import fault_point
from distill.prompt_sets import LAYOUTS, load_prompt_set
from distill.synth_records import (ShardWriter, finished_rows, merge, repetition_rule,
                                   shard_path)

log = logging.getLogger(__name__)

# What a run recorded before a setting existed meant: rows flagged by our n-gram rule, not "public".
LEGACY_DEFAULTS = {"repetition_rule": "ngram"}
SELECTION_KEYS = ("limit", "sample", "prompt_layout", "prompt_turns", "max_prompt_chars", "dedupe", "long_prompts")
# Settings that change the rows; a resumed run must match them (batch size, device do not).
RESUME_KEYS = ("expert", "amateur", "prompts", "method", "alpha", "beta", "temperature", "top_p",
               "max_new_tokens", "seed", "chat_template", "chat_template_kwargs", "token_logprobs", "repetition_rule",
               "repetition_ngram", "repetition_threshold")


@dataclass
class SynthesizeConfig:
    """One synthesis run; the defaults are the paper's public CoDIT settings."""

    expert: str  # post-trained model: local dir or HF-cache id
    prompts: str  # .jsonl or datasets dir with `instruction` or `messages`
    out: str  # dataset directory (created; resumed if it holds a run with the same settings)
    amateur: str | None = None  # the expert's base model; unused for method="direct"
    method: str = "codit"  # codit | direct (direct: beta = 0, the amateur is never loaded)
    alpha: float | None = None  # None: 0.01 for codit, 0 for direct (plain sampling from the expert)
    beta: float = 1.0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 4096  # the public CoDIT scripts' max_tokens (scripts/run_*.sh; run_Qwen3-8B.sh: 2048)
    batch_size: int = 32
    seed: int = 0
    # Which prompts (distill.prompt_sets): the layout (auto-detected), the turns kept, the counted
    # drops (empty, over max_prompt_chars, duplicate text), then the first `limit` or a seeded `sample`.
    limit: int | None = None  # only the first `limit` prompts
    sample: int | None = None  # N prompts drawn with `seed`, in source order
    prompt_layout: str = "auto"  # auto | instruction | messages | conversation | sharegpt | alpaca
    prompt_turns: str = "first"  # first: the first user turn; all: every turn up to the last user turn
    max_prompt_chars: int | None = 16000
    dedupe: bool = True
    # A prompt whose rendered tokens + max_new_tokens exceed the models' positions (config.json's
    # max_position_embeddings): "drop" it, counted in the card, or "error" (distill.validate.fit_prompts).
    long_prompts: str = "drop"
    device: str = "auto"  # auto = cuda:LOCAL_RANK if available, else cpu
    dtype: str = "auto"  # auto = distill.models.default_dtype: bfloat16 on cuda, float32 on cpu
    engine: str = "auto"  # auto | eager | fast (see distill.decoding.DecodingConfig)
    cuda_graphs: bool = True  # fast engine: replay the decode step as CUDA graphs (False = a fallback)
    compile_layers: bool | None = None  # fast engine: torch.compile the layers (None: on a GPU only)
    decode_attention: str = "auto"  # fast engine: auto (flex on a GPU) | sdpa | flex (see DecodingConfig)
    concurrent_models: bool | None = None  # fast engine: the amateur on a second CUDA stream (None: on a GPU)
    # Which rows are flagged `repetitive` (distill.repetition): "public" = the public CoDIT code's rule;
    # "ngram" = ours, with the two settings below (unused by "public").
    repetition_rule: str = "public"
    repetition_ngram: int = 20
    repetition_threshold: float = 0.3  # ngram: flag a response if more of its characters repeat
    # The expert's chat template renders every prompt for both models (distill.pair). chat_template: a
    # .jinja file or the template text, for an expert whose tokenizer has none; chat_template_kwargs:
    # a JSON object passed to the template (a template reading enable_thinking gets False unless set).
    chat_template: str | None = None
    chat_template_kwargs: str | None = None
    token_logprobs: bool = False  # store each chosen token's log_softmax(score), as the public code does
    overwrite: bool = False  # discard an existing output made with other settings
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.method not in ("codit", "direct"):
            raise DistillError(f"method must be codit or direct, got {self.method!r}")
        if self.alpha is None:
            self.alpha = 0.01 if self.method == "codit" else 0.0
        if self.method == "direct":
            self.beta, self.amateur = 0.0, None
        elif not self.amateur:
            raise DistillError("method codit needs --amateur (the expert's base model); or use --method direct")
        # Every value checked before anything is written: a run that fails here leaves nothing behind.
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise DistillError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        repetition_rule(self.repetition_rule, self.repetition_ngram, self.repetition_threshold)  # raises if bad
        from distill.validate import LONG_PROMPT_POLICIES

        if self.long_prompts not in LONG_PROMPT_POLICIES:
            raise DistillError(f"long_prompts must be drop or error, got {self.long_prompts!r}")
        from distill.decoding import DecodingConfig
        from distill.pair import template_kwargs

        if isinstance(self.chat_template_kwargs, dict):  # recipes give a mapping; settings keep one JSON form
            self.chat_template_kwargs = json.dumps(self.chat_template_kwargs, sort_keys=True)
        template_kwargs(_NoTemplate, self.chat_template_kwargs)  # not JSON: an error now, before anything loads
        DecodingConfig(alpha=self.alpha, beta=self.beta, temperature=self.temperature, top_p=self.top_p,
                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, engine=self.engine,
                       decode_attention=self.decode_attention).validate()

    def settings(self) -> dict:
        # The prompt selection is recorded but not a resume key: rows are keyed by prompt id and their
        # text is checked, so another selection keeps what it shares with the old one.
        return {k: getattr(self, k) for k in RESUME_KEYS} | {k: getattr(self, k) for k in SELECTION_KEYS}


def _rank() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


class _NoTemplate:
    chat_template = None


def _prepare_out(cfg: SynthesizeConfig, prompt_ids: list[str], record: dict) -> Path:
    """Create D (or check that an existing D continues this very run) and record provenance."""
    from distill.fsutil import atomic_write_json

    out = Path(cfg.out)
    prov = out / "provenance.json"
    try:
        if out.exists() and not out.is_dir():
            raise DistillError(f"output {out} is a file; choose a directory path for --out")
        if prov.exists():
            old = json.loads(prov.read_text())["settings"]
            # A key an older distill did not record counts as its default (the rows were made that way).
            defaults = {f.name: f.default for f in dataclasses.fields(SynthesizeConfig)} | LEGACY_DEFAULTS
            changed = {k: (old.get(k, defaults.get(k)), v) for k, v in cfg.settings().items()
                       if k not in SELECTION_KEYS and old.get(k, defaults.get(k)) != v}
            # An output without a finished row (a run that failed at once) has nothing to lose.
            if changed and not cfg.overwrite and finished_rows(out):
                raise DistillError(f"output {out} holds a run with other settings {changed}; rerun with the "
                                   f"same settings to resume, or pass --overwrite, or choose another --out")
            if changed:
                _discard_rows(out)
        elif out.exists() and not _only_skeleton(out) and not cfg.overwrite:
            raise DistillError(f"output {out} exists and is not a synthesis run; choose another --out or --overwrite")
        (out / "shards").mkdir(parents=True, exist_ok=True)
        atomic_write_json(prov, {"distill_version": __version__, "settings": cfg.settings(), **record,
                                 "prompt_ids": prompt_ids, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError as exc:
        from distill.validate import storage_error

        raise storage_error(exc, out) or DistillError(f"cannot write to {out} ({exc.strerror}); choose a writable "
                                                      f"--out") from None
    return out


def _only_skeleton(out: Path) -> bool:
    """D holds nothing but what a run killed before its provenance was in place leaves: an empty
    shards/ and the temporary copy of provenance.json (removed when it is written again)."""
    return all((p.name == "shards" and p.is_dir() and not any(p.iterdir()))
               or p.name.startswith(".provenance.json.tmp-") for p in out.iterdir())


def _check_pair(cfg: SynthesizeConfig):
    """The expert's tokenizer (its template installed) and the pair's resolved rules (distill.pair):
    checked before anything is written or any model touches the device."""
    from distill.pair import check_pair

    return check_pair(cfg.expert, cfg.amateur, cfg.trust_remote_code, cfg.chat_template, cfg.chat_template_kwargs)


def _load(cfg: SynthesizeConfig, local_rank: int, vocab: int):
    """The models, on this rank's device."""
    import torch

    from distill.decoding import check_embedding_rows
    from distill.models import default_dtype, load_causal_lm

    device = cfg.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # one GPU per rank; CUDA graphs capture on the current device
    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else default_dtype(device)
    expert = load_causal_lm(cfg.expert, dtype, device, cfg.trust_remote_code, what="expert")
    check_embedding_rows(expert, vocab, f"expert {cfg.expert}")
    amateur = None
    if cfg.amateur:
        amateur = load_causal_lm(cfg.amateur, dtype, device, cfg.trust_remote_code, what="amateur")
        check_embedding_rows(amateur, vocab, f"amateur {cfg.amateur}")
    return expert, amateur


def _discard_rows(out: Path) -> None:
    """--overwrite: drop our own files of the old run (nothing else in D).

    One process only: ranks start independently, so one rank could delete a shard another rank
    has just begun to write."""
    import shutil

    world = _rank()[1]
    if world > 1:
        raise DistillError(f"output {out} holds an older run, and {world} ranks cannot discard it safely in "
                           f"parallel; delete {out} first (or choose another --out), then launch again")

    shutil.rmtree(out / "shards", ignore_errors=True)
    shutil.rmtree(out / "data", ignore_errors=True)
    (out / "README.md").unlink(missing_ok=True)
    (out / "shards").mkdir()


def _changed_prompts(done: dict[str, dict], prompts: list[dict], cfg: SynthesizeConfig) -> bool:
    """A resumed run must answer the same prompts: matching ids alone would keep stale rows for
    edited prompts. True (start over) only with --overwrite; otherwise an error."""
    changed = [p["id"] for p in prompts if p["id"] in done and done[p["id"]]["messages"][:-1] != p["messages"]]
    if changed and not cfg.overwrite:
        raise DistillError(f"output {cfg.out} holds rows for {len(changed)} prompt id(s) whose prompt in {cfg.prompts} "
                           f"has changed since (first: id {changed[0]!r}); restore the original prompts, or pass "
                           f"--overwrite to start over, or choose another --out")
    return bool(changed)


def synthesize(cfg: SynthesizeConfig) -> Path:
    """Run (or resume) one synthesis; returns the dataset directory D.

    One writer per D (`distill.locking`): another run on D is refused at once while this one
    runs, naming it; the ranks of one launch share the lock. A run that fails before its first
    row removes the D it created, so a failure leaves no empty skeleton behind."""
    from distill.locking import output_lock

    out = Path(cfg.out)
    with output_lock(out, "synthesis output") as lock:
        created = not out.exists()
        empty = created or (out.is_dir() and not any(out.iterdir()))
        try:
            return _synthesize(cfg, lock)
        except BaseException:
            if empty and _rank()[1] == 1:  # one process: nobody else can be writing into D
                _remove_skeleton(out, created)
            raise


def _remove_skeleton(out: Path, created: bool) -> None:
    """D was empty or absent when this run began: if it still holds no row, remove what the run
    put there (and D itself if the run made it)."""
    import shutil

    try:
        if not out.is_dir() or finished_rows(out):
            return
        if created:
            shutil.rmtree(out, ignore_errors=True)
            return
        for p in out.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    except (DistillError, OSError):  # a corrupt or unreadable shard: keep it for the user to see
        pass


def _synthesize(cfg: SynthesizeConfig, lock) -> Path:
    from distill.decoding import ContrastiveDecoder, DecodingConfig, Request, derive_seed
    from distill.pair import render_prompt
    from distill.progress import progress_bar

    rank, world, local_rank = _rank()
    prompt_set = load_prompt_set(cfg.prompts, layout=cfg.prompt_layout, turns=cfg.prompt_turns,
                                 max_prompt_chars=cfg.max_prompt_chars, limit=cfg.limit, sample=cfg.sample,
                                 seed=cfg.seed, dedupe=cfg.dedupe)
    prompts = prompt_set.rows
    tokenizer, pair = _check_pair(cfg)
    from distill.validate import fit_prompts

    # Before anything is written: prompts longer than the models' positions (with the response) are
    # dropped and counted, or refused (--long-prompts error).
    prompts = fit_prompts(prompts, tokenizer, pair.chat_template_kwargs,
                          [(cfg.expert, "expert"), (cfg.amateur, "amateur")], cfg.max_new_tokens, cfg.long_prompts,
                          prompt_set.stats)
    out = _prepare_out(cfg, [p["id"] for p in prompts], {"pair": pair.as_dict(), "prompt_set": prompt_set.stats})
    fault_point("synthesize.prepared")
    done = finished_rows(out)
    if _changed_prompts(done, prompts, cfg):
        _discard_rows(out)
        done = {}
    writer = ShardWriter(shard_path(out, rank))
    todo = [p for p in prompts[rank::world] if p["id"] not in done]
    log.info("rank %d/%d: %d prompts, %d already done, %d to go", rank, world,
             len(prompts[rank::world]), len(prompts[rank::world]) - len(todo), len(todo))
    if todo:
        expert, amateur = _load(cfg, local_rank, pair.vocab_size)
        by_id = {p["id"]: p for p in todo}
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
            for i, result in enumerate(decoder.generate(requests), 1):
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
                              "row_seed": derive_seed(cfg.seed, p["id"]), **result.extra})
                fault_point("synthesize.row")
                if i % cfg.batch_size == 0:
                    writer.sync()
                bar.update(1)
                # refresh=False: the bar's own interval decides when to redraw (see distill.progress)
                bar.set_postfix(tok_s=f"{decoder.tokens_generated / (time.perf_counter() - start):.0f}", refresh=False)
        finally:
            bar.close()
            writer.close()
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_cli(subparsers, summary: str | None = None) -> None:
    d = SynthesizeConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "synthesize", help=summary,
        # --expert/--prompts/--out are required unless --merge, which argparse cannot say itself
        usage="distill synthesize --expert E [--amateur A] --prompts P --out D [options]\n"
              "       distill synthesize --merge D",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expert", help="post-trained (chat) model: local HF directory or HF-cache id")
    p.add_argument("--amateur", help="the expert's pre-trained base model (same tokenizer); not needed for --method direct")
    p.add_argument("--prompts", help="prompts: .jsonl or a datasets directory; rows need 'instruction' or chat "
                                     "'messages', and optionally 'id'")
    p.add_argument("--out", help="output dataset directory; rerun the same command to resume an interrupted run")
    p.add_argument("--method", choices=["codit", "direct"], default="codit",
                   help="codit: contrastive decoding (default); direct: sampling from the expert alone "
                        "(beta=0; the amateur is never loaded)")
    p.add_argument("--alpha", type=float, default=None,
                   help="plausibility: only tokens with p_expert >= alpha * max p_expert are candidates "
                        "(default: 0.01 for codit, 0 for direct, i.e. plain sampling)")
    p.add_argument("--beta", type=float, default=d["beta"].default,
                   help="weight of the amateur's log-probability subtracted from the expert's (default: 1.0)")
    p.add_argument("--temperature", type=float, default=d["temperature"].default,
                   help="sampling temperature on the contrastive scores; 0 = greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=d["top_p"].default, help="nucleus sampling mass (default: 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"].default,
                   help="longest response in tokens (default: %(default)s, the max_tokens of the public CoDIT "
                        "scripts but run_Qwen3-8B.sh, which uses 2048)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                   help="rows decoded together; finished rows are refilled from the queue (default: 32; 128+ on a big GPU)")
    p.add_argument("--seed", type=int, default=d["seed"].default,
                   help="run seed; each row samples with a seed derived from (seed, id) (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (after the drops below)")
    p.add_argument("--sample", type=int, default=None, help="N prompts drawn with --seed, kept in source order")
    p.add_argument("--prompt-layout", choices=("auto",) + LAYOUTS, default="auto",
                   help="layout of the prompt rows: instruction, messages, conversation (LMSYS-Chat-1M, WildChat), "
                        "sharegpt (conversations with from/value), alpaca (instruction + input); auto detects it "
                        "from the first row (default)")
    p.add_argument("--prompt-turns", choices=("first", "all"), default="first",
                   help="first: the first user turn (with any system turn before it), as the public CoDIT code; "
                        "all: every turn up to the last user turn (default: first)")
    p.add_argument("--max-prompt-chars", type=int, default=d["max_prompt_chars"].default,
                   help="drop prompts longer than this many characters, counted in the card (default: %(default)s)")
    p.add_argument("--long-prompts", choices=["drop", "error"], default=d["long_prompts"].default,
                   help="a prompt whose rendered tokens + --max-new-tokens exceed the models' positions "
                        "(max_position_embeddings): drop it, counted in the card, or stop with an error "
                        "(default: %(default)s)")
    p.add_argument("--no-dedupe", dest="dedupe", action="store_false",
                   help="keep prompts whose normalised text repeats (default: keep the first of each)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto = bfloat16 on cuda (float16 where bf16 is not native), float32 on cpu")
    p.add_argument("--engine", default="auto", choices=["auto", "eager", "fast"],
                   help="auto: the fast static-cache/CUDA-graph engine on cuda for Llama, Mistral, Qwen2/3, "
                        "Gemma-3 and Olmo-2/3, else the eager Hugging Face engine (the card records which ran)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="fast engine without CUDA graphs (a fallback if graph capture misbehaves on your setup)")
    p.add_argument("--compile-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="fast engine: torch.compile the per-layer work around attention (default: on a GPU only)")
    p.add_argument("--decode-attention", choices=["auto", "sdpa", "flex"], default=d["decode_attention"].default,
                   help="fast engine: flex (FlexAttention: each row reads only its own live cache blocks) or sdpa "
                        "(every row reads up to the longest row); auto = flex on a GPU, with sdpa where flex does "
                        "not compile (default: %(default)s)")
    p.add_argument("--concurrent-models", action=argparse.BooleanOptionalAction, default=None,
                   help="fast engine: step the amateur on a second CUDA stream so the two models' kernels overlap "
                        "inside the CUDA graph (default: on a GPU only)")
    p.add_argument("--repetition-rule", choices=["public", "ngram"], default=d["repetition_rule"].default,
                   help="which rows are marked repetitive: public = the public CoDIT code's rule (a response of 100+ "
                        "characters whose top character 2/3/4-gram is >= 0.16/0.18/0.20 of its n-grams, or whose "
                        "top character 100-gram occurs 10+ times); ngram = distill's own rule, set by the two "
                        "options below (default: %(default)s)")
    p.add_argument("--repetition-threshold", type=float, default=d["repetition_threshold"].default,
                   help="--repetition-rule ngram: flag a response as repetitive when more than this fraction of its "
                        "characters lie in a repeated character n-gram (default: 0.3)")
    p.add_argument("--repetition-ngram", type=int, default=d["repetition_ngram"].default,
                   help="--repetition-rule ngram: n of the character n-grams (default: 20)")
    p.add_argument("--chat-template", metavar="FILE_OR_TEXT",
                   help="chat template (a .jinja file or the template text) for an expert whose tokenizer has none; "
                        "both models get the prompt it renders")
    p.add_argument("--chat-template-kwargs", metavar="JSON",
                   help="a JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}' (a template "
                        "that reads enable_thinking, as Qwen3's does, gets false unless set here, as the public CoDIT "
                        "code runs it); recorded in provenance")
    p.add_argument("--token-logprobs", action="store_true",
                   help="store each chosen token's log_softmax(score) in the row's token_logprobs (as the public "
                        "code's 'score' field), for analysis")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with different settings")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--merge", metavar="D", help="only join the shards of the run in D into the final dataset")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.merge:
        from distill.locking import output_lock

        with output_lock(args.merge, "synthesis output") as lock, lock.critical():
            merged = merge(Path(args.merge))
        if merged is None:
            raise DistillError(f"{args.merge}: some prompts have no row yet; rerun the synthesis to finish them")
        print(args.merge)
        return 0
    missing = [f"--{k}" for k in ("expert", "prompts", "out") if not getattr(args, k)]
    if missing:
        raise DistillError(f"missing {', '.join(missing)}; see `distill synthesize --help`")
    fields = set(SynthesizeConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    cfg = SynthesizeConfig(**kwargs, progress=not args.no_progress, cuda_graphs=not args.no_cuda_graphs)
    print(synthesize(cfg))
    return 0


__all__ = ["SynthesizeConfig", "synthesize", "add_cli", "merge"]
