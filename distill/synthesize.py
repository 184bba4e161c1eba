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
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from distill import DistillError, __version__
from distill.synth_records import (ShardWriter, finished_rows, load_prompts, merge, repetition_fraction,
                                   shard_path)

log = logging.getLogger(__name__)

# Settings that change the rows; a resumed run must match them (batch size, device do not).
RESUME_KEYS = ("expert", "amateur", "prompts", "method", "alpha", "beta", "temperature", "top_p",
               "max_new_tokens", "seed", "repetition_ngram", "repetition_threshold")


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
    max_new_tokens: int = 2048
    batch_size: int = 32
    seed: int = 0
    limit: int | None = None  # only the first `limit` prompts
    device: str = "auto"  # auto = cuda:LOCAL_RANK if available, else cpu
    dtype: str = "auto"  # auto = distill.models.default_dtype: bfloat16 on cuda, float32 on cpu
    engine: str = "auto"  # auto | eager | fast (see distill.decoding.DecodingConfig)
    cuda_graphs: bool = True  # fast engine: replay the decode step as CUDA graphs (False = a fallback)
    compile_layers: bool | None = None  # fast engine: torch.compile the layers (None: on a GPU only)
    decode_attention: str = "auto"  # fast engine: auto (flex on a GPU) | sdpa | flex (see DecodingConfig)
    concurrent_models: bool | None = None  # fast engine: the amateur on a second CUDA stream (None: on a GPU)
    repetition_ngram: int = 20
    repetition_threshold: float = 0.3  # flag a response if more of its characters repeat
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
        if not 0.0 <= self.repetition_threshold <= 1.0 or self.repetition_ngram < 1:
            raise DistillError("need 0 <= repetition_threshold <= 1 and repetition_ngram >= 1")
        from distill.decoding import DecodingConfig

        DecodingConfig(alpha=self.alpha, beta=self.beta, temperature=self.temperature, top_p=self.top_p,
                       max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, engine=self.engine,
                       decode_attention=self.decode_attention).validate()

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in RESUME_KEYS} | {"limit": self.limit}


def _rank() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _prepare_out(cfg: SynthesizeConfig, prompt_ids: list[str]) -> Path:
    """Create D (or check that an existing D continues this very run) and record provenance."""
    from distill.fsutil import atomic_write_json

    out = Path(cfg.out)
    prov = out / "provenance.json"
    try:
        if out.exists() and not out.is_dir():
            raise DistillError(f"output {out} is a file; choose a directory path for --out")
        if prov.exists():
            old = json.loads(prov.read_text())["settings"]
            changed = {k: (old.get(k), v) for k, v in cfg.settings().items() if k != "limit" and old.get(k) != v}
            # An output without a finished row (a run that failed at once) has nothing to lose.
            if changed and not cfg.overwrite and finished_rows(out):
                raise DistillError(f"output {out} holds a run with other settings {changed}; rerun with the "
                                   f"same settings to resume, or pass --overwrite, or choose another --out")
            if changed:
                _discard_rows(out)
        elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
            raise DistillError(f"output {out} exists and is not a synthesis run; choose another --out or --overwrite")
        (out / "shards").mkdir(parents=True, exist_ok=True)
        atomic_write_json(prov, {"distill_version": __version__, "settings": cfg.settings(),
                                 "prompt_ids": prompt_ids, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError as exc:
        raise DistillError(f"cannot write to {out} ({exc.strerror}); choose a writable --out") from exc
    return out


def _load_tokenizer(cfg: SynthesizeConfig):
    """The expert's tokenizer and the real vocabulary size, checked against the amateur's: before
    anything is written or any model touches the device."""
    from distill.decoding import check_same_tokenizer
    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.expert, cfg.trust_remote_code, what="expert")
    if tokenizer.chat_template is None:
        raise DistillError(f"expert {cfg.expert} has no chat template (tokenizer_config.json 'chat_template'); "
                           f"the expert must be a post-trained (chat) model")
    if cfg.amateur:
        vocab = check_same_tokenizer(tokenizer, load_tokenizer(cfg.amateur, cfg.trust_remote_code, what="amateur"),
                                     cfg.expert, cfg.amateur)
    else:
        vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    return tokenizer, vocab


def _load(cfg: SynthesizeConfig, local_rank: int, tokenizer, vocab: int):
    """The models, on this rank's device."""
    import torch

    from distill.decoding import check_embedding_rows
    from distill.models import default_dtype, load_causal_lm, stop_token_ids

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
    return expert, amateur, stop_token_ids(tokenizer, expert)  # the stops evaluation uses too


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


def _render(tokenizer, messages) -> list[int]:
    # Render to text then tokenize without adding specials: the template already holds BOS.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def synthesize(cfg: SynthesizeConfig) -> Path:
    """Run (or resume) one synthesis; returns the dataset directory D."""
    from distill.decoding import ContrastiveDecoder, DecodingConfig, Request, derive_seed
    from distill.progress import progress_bar

    rank, world, local_rank = _rank()
    prompts = load_prompts(cfg.prompts, cfg.limit)
    tokenizer, vocab = _load_tokenizer(cfg)
    out = _prepare_out(cfg, [p["id"] for p in prompts])
    done = finished_rows(out)
    if _changed_prompts(done, prompts, cfg):
        _discard_rows(out)
        done = {}
    writer = ShardWriter(shard_path(out, rank))
    todo = [p for p in prompts[rank::world] if p["id"] not in done]
    log.info("rank %d/%d: %d prompts, %d already done, %d to go", rank, world,
             len(prompts[rank::world]), len(prompts[rank::world]) - len(todo), len(todo))
    if todo:
        expert, amateur, stops = _load(cfg, local_rank, tokenizer, vocab)
        by_id = {p["id"]: p for p in todo}
        requests = [Request(p["id"], _render(tokenizer, p["messages"]), derive_seed(cfg.seed, p["id"])) for p in todo]
        decoder = ContrastiveDecoder(
            expert, amateur, vocab, stops,
            DecodingConfig(alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, engine=cfg.engine,
                           cuda_graphs=cfg.cuda_graphs, compile_layers=cfg.compile_layers,
                           decode_attention=cfg.decode_attention, concurrent_models=cfg.concurrent_models),
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
                rep = repetition_fraction(response, cfg.repetition_ngram)
                p = by_id[result.key]
                writer.write({"id": p["id"], "instruction": p["instruction"],
                              "messages": p["messages"] + [{"role": "assistant", "content": response}],
                              "response": response, "prompt_tokens": result.prompt_tokens,
                              "response_tokens": len(tokens), "finish_reason": result.finish_reason,
                              "repetition": round(rep, 4), "repetitive": rep > cfg.repetition_threshold,
                              **provenance, "row_seed": derive_seed(cfg.seed, p["id"])})
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
    if merge(out) is None:
        log.info("rank %d finished; other ranks still running; the last one to finish writes the dataset "
                 "(or run `distill synthesize --merge %s`)", rank, out)
    else:
        log.info("dataset written to %s", out)
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
                   help="longest response in tokens (default: 2048)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                   help="rows decoded together; finished rows are refilled from the queue (default: 32; 128+ on a big GPU)")
    p.add_argument("--seed", type=int, default=d["seed"].default,
                   help="run seed; each row samples with a seed derived from (seed, id) (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto = bfloat16 on cuda (float16 where bf16 is not native), float32 on cpu")
    p.add_argument("--engine", default="auto", choices=["auto", "eager", "fast"],
                   help="auto: the fast static-cache/CUDA-graph engine on cuda for Llama/Mistral/Qwen2, else the "
                        "eager Hugging Face engine")
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
    p.add_argument("--repetition-threshold", type=float, default=d["repetition_threshold"].default,
                   help="flag a response as repetitive when more than this fraction of its characters lie in a "
                        "repeated character n-gram (default: 0.3)")
    p.add_argument("--repetition-ngram", type=int, default=d["repetition_ngram"].default,
                   help="n of the character n-grams of the repetition filter (default: 20)")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with different settings")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--merge", metavar="D", help="only join the shards of the run in D into the final dataset")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.merge:
        if merge(Path(args.merge)) is None:
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
