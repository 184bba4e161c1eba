"""Chat vectors in parameter space: Δ = θ_post − θ_base, added to a same-architecture target.

`extract` writes Δ as a plain safetensors directory plus `chat_vector.json` (what it was
made from); `apply` writes θ_target + Σ λᵢ·Δᵢ as a loadable Hugging Face model directory with
the target's config and tokenizer. Both stream tensor by tensor (see `distill.io.checkpoints`),
computing in float32, so a 70B model needs the memory of a few of its tensors, not of the model.

Vocabulary rows (embeddings, LM head) may differ in count between models (added chat
tokens, padded vocabularies): the arithmetic then covers the shared leading rows only and
says so. `skip_embeddings` leaves them out entirely, the Chat Vector paper's practice when
the target's tokenizer differs. `stats` lives in `distill.chat_vector.stats`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from distill import DistillError
from distill.chat_vector.config import ApplyConfig, ExtractConfig
from distill.io.checkpoints import Checkpoint, ShardedWriter, copy_through, dtype_from_name, dtype_name
from distill.io.files import atomic_dir, fault_point
from distill.io.progress import progress_bar
from distill.io.streaming import pipelined, row_chunks

log = logging.getLogger(__name__)

META_NAME = "chat_vector.json"
FORMAT = "distill.chat_vector.core/1"
# Tensors indexed by token id: their row count follows the vocabulary, not the architecture.
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")


def is_head(name: str) -> bool:
    return name.endswith(HEAD_SUFFIXES) or name == "output.weight"


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(EMBED_SUFFIXES) or is_head(name)


def _name_diff(a: set[str], b: set[str], a_label: str, b_label: str) -> str:
    parts = []
    for only, label in ((sorted(a - b), a_label), (sorted(b - a), b_label)):
        if only:
            more = f" and {len(only) - 10} more" if len(only) > 10 else ""
            parts.append(f"only in {label}: {', '.join(only[:10])}{more}")
    return "; ".join(parts)


def _architecture(config: dict) -> tuple:
    return (config.get("model_type"), tuple(config.get("architectures") or ()))


def _check_architectures(a: dict, b: dict, a_label: str, b_label: str) -> None:
    if _architecture(a) != _architecture(b):
        raise DistillError(
            f"architectures differ: {a_label} is {_architecture(a)[1] or a.get('model_type')} "
            f"(model_type {a.get('model_type')}), {b_label} is {_architecture(b)[1] or b.get('model_type')} "
            f"(model_type {b.get('model_type')}); a chat vector only applies within one architecture - "
            f"use CoDIT (distill synthesize + train) to cross architectures")


def _shared_rows(name: str, a: tuple, b: tuple, a_label: str, b_label: str) -> int | None:
    """Rows both tensors share: None when shapes agree, else the smaller vocab (raises on other diffs)."""
    if a == b:
        return None
    if is_vocab_tensor(name) and len(a) == len(b) and a[1:] == b[1:]:
        return min(a[0], b[0])
    raise DistillError(f"tensor {name} has shape {list(a)} in {a_label} but {list(b)} in {b_label}; "
                       f"only vocabulary rows may differ - are these models of the same size?")


def _progress(total: int, desc: str, enabled: bool):
    return progress_bar(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def extract(base, post, out, dtype=None, overwrite: bool = False, **options) -> Path:
    """Write Δ = θ_post − θ_base to `out` (a safetensors directory + chat_vector.json)."""
    return run_extract(ExtractConfig(base=str(base), post=str(post), out=str(out), dtype=dtype, overwrite=overwrite, **options))


def run_extract(cfg: ExtractConfig) -> Path:
    base = Checkpoint.open(cfg.base, what="base model")
    post = Checkpoint.open(cfg.post, what="post-trained model")
    _check_architectures(base.config, post.config, f"base {base.path}", f"post {post.path}")
    if set(base.tensors) != set(post.tensors):
        raise DistillError("tensor names differ between the models: "
                           + _name_diff(set(base.tensors), set(post.tensors), f"base {base.path}",
                                        f"post {post.path}"))
    if cfg.dtype is not None:
        out_dtype = dtype_from_name(cfg.dtype)
    elif base.dtype() == post.dtype():
        out_dtype = post.dtype()
    else:
        out_dtype = torch.float32
        log.info("base is %s, post is %s: storing the vector in float32", base.dtype(), post.dtype())

    plan, rows, skipped = [], {}, []
    for name in post.ordered():
        b, p = base.tensors[name], post.tensors[name]
        if not (b.dtype.is_floating_point and p.dtype.is_floating_point):
            skipped.append(name)  # integer buffers are not weights; nothing to subtract
            continue
        n = _shared_rows(name, b.shape, p.shape, "base", "post")
        if n is not None:
            rows[name] = n
            log.info("%s: base has %d rows, post %d; the vector covers the %d shared rows",
                     name, b.shape[0], p.shape[0], n)
        plan.append((name, (n, *p.shape[1:]) if n is not None else p.shape, out_dtype))
    if skipped:
        log.info("not part of the vector (non-floating): %s", ", ".join(skipped))

    meta = {
        "format": FORMAT,
        "base": str(base.path.resolve()),
        "post": str(post.path.resolve()),
        "dtype": dtype_name(out_dtype),
        "model_type": post.config.get("model_type"),
        "architectures": post.config.get("architectures"),
        "vocab_size": {"base": base.config.get("vocab_size"), "post": post.config.get("vocab_size")},
        "shared_rows": rows,
        "tie_word_embeddings": {"base": base.config.get("tie_word_embeddings"),
                                "post": post.config.get("tie_word_embeddings")},
        "num_tensors": len(plan),
    }

    def work(job) -> int:
        name, start, stop = job
        p, b = post.get(name, start, stop).to(cfg.device), base.get(name, start, stop).to(cfg.device)
        if p.dtype == b.dtype == out_dtype:
            # torch's bf16/fp16 kernels compute in float32 and round once: the same result as
            # the float32 route below, with a third of the memory traffic
            out = torch.sub(p, b)
        else:
            out = p.to(torch.float32, copy=True).sub_(b).to(out_dtype)
        del p, b
        writer.write(name, out, start)
        fault_point("chat_vector.chunk")
        return out.nbytes

    jobs = [(name, start, stop) for name, shape, _ in plan for start, stop in row_chunks(shape)]
    with atomic_dir(cfg.out, overwrite=cfg.overwrite, what="chat vector output") as tmp:
        with ShardedWriter(tmp, plan, cfg.max_shard_size, metadata={"distill": FORMAT}) as writer, \
                _progress(writer.total_size, "extract", cfg.progress) as bar:
            for nbytes in pipelined(work, jobs, cfg.workers):
                bar.update(nbytes)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("chat vector (%d tensors, %s) written to %s", len(plan), dtype_name(out_dtype), cfg.out)
    return Path(cfg.out)


def open_vector(ref) -> tuple[Checkpoint, dict]:
    """A chat vector directory and its chat_vector.json."""
    path = Path(os.path.expanduser(str(ref)))
    meta_path = path / META_NAME
    if path.is_dir() and not meta_path.exists():
        raise DistillError(f"{path} is not a chat vector directory (no {META_NAME}); make one with "
                           f"`distill chat-vector extract --base B --post P --out {path}`")
    vector = Checkpoint.open(path, what="chat vector", require_config=False)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DistillError(f"{meta_path} is not valid JSON ({exc}); extract the vector again") from None
    return vector, meta


def _plan_sources(target: Checkpoint, vector: Checkpoint, label: str, skip_embeddings: bool) -> dict[str, str]:
    """{target tensor: vector tensor to add to it}, handling tied embeddings on either side."""
    t_names, v_names = set(target.tensors), set(vector.tensors)
    t_float = {n for n in t_names if target.tensors[n].dtype.is_floating_point}
    sources = {n: n for n in t_float & v_names}
    embeds = [n for n in t_names | v_names if n.endswith(EMBED_SUFFIXES)]
    embed = embeds[0] if len(embeds) == 1 else None
    extra_v = set(v_names - t_names)
    for head in [n for n in v_names | t_names if is_head(n)]:
        if head in v_names and head not in t_names and embed in t_names:
            # The target ties its head to its embeddings: one matrix, one Δ (the embedding's).
            log.warning("target %s ties lm_head to its embeddings; %s's separate %s Δ is not applied",
                        target.path, label, head)
            extra_v.discard(head)
        elif head in t_float and head not in v_names and embed in v_names:
            # The vector comes from tied models: the head moved exactly as the embeddings did.
            log.info("%s comes from tied embeddings: applying its %s Δ to %s too", label, embed, head)
            sources[head] = embed
    missing = t_float - set(sources)
    if missing or extra_v:
        raise DistillError("tensor names differ between target and vector: "
                           + _name_diff(missing, extra_v, f"target {target.path}", f"vector {vector.path}"))
    if skip_embeddings:
        sources = {t: v for t, v in sources.items() if not is_vocab_tensor(t)}
    return sources


def apply(target, vectors, out, skip_embeddings: bool = False, overwrite: bool = False, **options) -> Path:
    """Write θ_target + Σ scale·Δ to `out`. `vectors` is a list of (vector dir, scale)."""
    return run_apply(ApplyConfig(target=str(target), out=str(out), vectors=[(str(v), float(s)) for v, s in vectors],
                                 skip_embeddings=skip_embeddings, overwrite=overwrite, **options))


def run_apply(cfg: ApplyConfig) -> Path:
    if not cfg.vectors:
        raise DistillError("no chat vector given; pass --vector V (and optionally --scale λ)")
    target = Checkpoint.open(cfg.target, what="target model")
    opened = []  # (vector, scale, {target name: vector name}, label)
    for path, scale in cfg.vectors:
        vector, meta = open_vector(path)
        label = f"vector {vector.path}"
        _check_architectures(target.config, {"model_type": meta.get("model_type"),
                                             "architectures": meta.get("architectures")},
                             f"target {target.path}", label)
        opened.append((vector, scale, _plan_sources(target, vector, label, cfg.skip_embeddings), label))

    plan = [(name, target.tensors[name].shape, target.tensors[name].dtype) for name in target.ordered()]
    # per target tensor: [(vector, scale, vector tensor name, shared rows or None)]
    additions: dict[str, list] = {}
    for name, shape, _ in plan:
        for vector, scale, sources, label in opened:
            if name not in sources or scale == 0.0:
                continue
            vname = sources[name]
            rows = _shared_rows(name, shape, vector.tensors[vname].shape, "target", label)
            if rows is not None:
                log.info("%s: target has %d rows, %s %d; applying on the %d shared rows",
                         name, shape[0], label, vector.tensors[vname].shape[0], rows)
            additions.setdefault(name, []).append((vector, scale, vname, rows))

    def work(job) -> int:
        name, start, stop = job
        tensor = target.get(name, start, stop)
        todo = []
        for vector, scale, vname, rows in additions.get(name, ()):
            vstop = stop if rows is None else min(stop, rows)
            if rows is None or vstop > start:  # else this chunk lies in the target's extra vocab rows
                todo.append((vector.get(vname, start, vstop).to(cfg.device), scale, rows, vstop))
        if todo:
            dtype = tensor.dtype
            # One addend of the target's dtype: torch's kernel computes t + λ·Δ in float32 and rounds
            # once. Several: accumulate in float32 and round once at the end. copy=True either way:
            # never modify a tensor that maps the input file.
            single = len(todo) == 1 and todo[0][0].dtype == dtype
            tensor = tensor.to(cfg.device, dtype if single else torch.float32, copy=True)
            for delta, scale, rows, vstop in todo:
                (tensor if rows is None else tensor[: vstop - start]).add_(delta, alpha=scale)
            del todo, delta
            tensor = tensor.to(dtype)
        writer.write(name, tensor, start)
        fault_point("chat_vector.chunk")
        return tensor.nbytes

    jobs = [(name, start, stop) for name, shape, _ in plan for start, stop in row_chunks(shape)]
    with atomic_dir(cfg.out, overwrite=cfg.overwrite, what="model output") as tmp:
        with ShardedWriter(tmp, plan, cfg.max_shard_size) as writer, \
                _progress(writer.total_size, "apply", cfg.progress) as bar:
            for nbytes in pipelined(work, jobs, cfg.workers):
                bar.update(nbytes)
        copy_through(target.path, tmp)
    log.info("θ_target + %s written to %s",
             " + ".join(f"{s:g}·{Path(p).name}" for p, s in cfg.vectors), cfg.out)
    return Path(cfg.out)
