"""`build_zoo`: the world's data, tokenizers and four models in one cached directory.

Layout (docs/CONTRACTS.md): source-base/ source-post/ source-cp/ target-base/,
prompts/{sft,synthesis,eval}.jsonl, knowledge/questions.jsonl, text/heldout.jsonl,
quality.json, README.md, world.json. The directory is built under a temporary name and
renamed, so a cache entry either is complete or does not exist; the temporary directory of a
killed build is removed by the next build of the same directory (`distill.io.files.atomic_dir`),
and two builds of one directory never run at once (`distill.io.locking`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from distill import DistillError
from distill.io.files import atomic_dir, atomic_write_json, atomic_write_text, fault_point
from distill.io.locking import output_lock
from distill.world import jobs, knowledge, quality
from distill.world.config import ZooConfig, get_preset
from distill.world.instructions import format_documents, make_sets
from distill.world.tokenizers import train_source_tokenizer, train_target_tokenizer

log = logging.getLogger("distill.world")
MODELS = ("source-base", "source-post", "source-cp", "target-base")


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("DISTILL_CACHE", "~/.cache/distill"))) / "zoo"


def _is_complete(path: Path, key: str) -> bool:
    try:
        return json.loads((path / "world.json").read_text())["cache_key"] == key
    except (OSError, ValueError, KeyError):
        return False


def build_zoo(preset: str = "tiny", out: str | os.PathLike | None = None, force: bool = False,
              config: ZooConfig | None = None) -> Path:
    """Build the zoo for `preset` (or an explicit `config`) and return its directory.

    Without `out` it lands in the cache (`$DISTILL_CACHE/zoo/<preset>-<hash>`, default
    `~/.cache/distill`); a directory already built from the same config and code is reused
    as is unless `force` is set.
    """
    cfg = config or get_preset(preset)
    key = cfg.cache_key()
    target = Path(out) if out is not None else cache_root() / f"{cfg.preset}-{key}"
    if not force and _is_complete(target, key):
        log.info("[zoo] reusing %s", target)
        return target
    if target.exists() and not force and out is not None:
        raise DistillError(f"{target} exists but is not a zoo built from preset {cfg.preset!r} with this code; "
                           f"pass --force to rebuild it there, or choose another --out")
    start = time.time()
    # One builder per directory. A cache entry is shared: a second build of it waits for the first
    # and reuses what it made; an explicit --out is refused while another process builds it.
    with output_lock(target, "zoo", wait=out is None):
        if not force and _is_complete(target, key):
            log.info("[zoo] reusing %s (built by another process meanwhile)", target)
            return target
        with atomic_dir(target, overwrite=True, what="zoo") as tmp, _quiet_and_threaded(_device(cfg)):
            _build(cfg, key, tmp)
    log.info("[zoo] built %s in %.0f s", target, time.time() - start)
    return target


@contextlib.contextmanager
def _quiet_and_threaded(device):
    """No per-load progress bars; on CPU, only as many threads as there are idle cores
    (tiny matrices on oversubscribed cores run several times slower than on one)."""
    import torch
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    if device.type == "cpu":
        idle = (os.cpu_count() or 1) - int(os.getloadavg()[0] + 0.5)
        torch.set_num_threads(max(1, min(threads, idle)))
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        torch.set_num_threads(threads)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _mixed(docs: list[str], more: list[str], seed: int) -> list[str]:
    import random

    out = docs + more
    random.Random(seed).shuffle(out)
    return out


def _device(cfg: ZooConfig):
    import torch

    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _build(cfg: ZooConfig, key: str, out: Path) -> None:
    import torch

    started = time.time()
    device = _device(cfg)
    entities, facts = knowledge.make_facts(cfg.seed, cfg.n_entities, cfg.split_fractions)
    sets = make_sets(facts, entities, cfg, cfg.seed + 1)
    formats = sets.pop("formats")
    source_docs = _mixed(knowledge.documents(facts, "source", cfg.text_epochs, cfg.seed + 2),
                         format_documents(formats, facts, "source", cfg.format_qa_fraction), cfg.seed + 6)
    target_docs = _mixed(knowledge.documents(facts, "target", cfg.text_epochs, cfg.seed + 3, sep="\n"),
                         format_documents(formats, facts, "target", cfg.format_qa_fraction), cfg.seed + 7)
    # source-cp learns what only the target knew: additional facts, with the source's own
    # text replayed so that it keeps the rest.
    extra = [f for f in facts if f.split == "target_only"]
    cp_docs = knowledge.documents(extra, "target", cfg.text_epochs, cfg.seed + 4) + source_docs[: len(source_docs) // 2]
    questions = knowledge.question_rows(facts)
    heldout = knowledge.documents([f for f in facts if f.split == "shared"], "source", 1, cfg.seed + 5)

    for name, rows in sets.items():
        _write_jsonl(out / "prompts" / f"{name}.jsonl", rows)
    _write_jsonl(out / "knowledge" / "questions.jsonl", questions)
    _write_jsonl(out / "text" / "heldout.jsonl", [{"text": t} for t in heldout])
    _write_jsonl(out / "text" / "formats.jsonl", formats)

    instructions = [r["instruction"] for rows in sets.values() for r in rows] + [r["response"] for r in sets["sft"]]
    log.info("[zoo] tokenizers (source %d, target %d tokens)", cfg.source_vocab, cfg.target_vocab)
    # Each family's tokenizer learns from its own corpus (plus the instructions it will see).
    src_tok = train_source_tokenizer(source_docs + instructions, cfg.source_vocab)
    tgt_tok = train_target_tokenizer(target_docs + instructions, cfg.target_vocab)

    for name in MODELS:
        (src_tok if name.startswith("source") else tgt_tok).save_pretrained(out / name)
    dev = str(device)
    stats = jobs.run_all(
        base=jobs.Job("source-base", "mistral", out / "source-base", cfg.pretrain, cfg.seed, source_docs,
                      size=cfg.source_size, device=dev),
        post=jobs.Job("source-post", "mistral", out / "source-post", cfg.sft, cfg.seed + 1, source_docs,
                      init=out / "source-base", chat_rows=sets["sft"], text_fraction=cfg.sft_text_fraction,
                      device=dev),
        cp=jobs.Job("source-cp", "mistral", out / "source-cp", cfg.cp, cfg.seed + 2, cp_docs,
                    init=out / "source-base", device=dev),
        target=jobs.Job("target-base", "qwen2", out / "target-base", cfg.target_pretrain, cfg.seed + 3,
                        target_docs, size=cfg.target_size, device=dev),
        parallel=cfg.parallel and jobs.can_parallelize(dev),
    )

    from transformers import AutoModelForCausalLM

    def reload(name: str):
        return AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32, use_safetensors=True)

    log.info("[zoo] measuring quality on %d eval prompts and %d cloze questions", len(sets["eval"]), len(questions))
    answer_key = {"source-base": "source_answer", "source-post": "source_answer", "source-cp": "answer",
                  "target-base": "target_answer"}
    table, samples = {}, []
    for name in MODELS:
        model = reload(name).to(device).eval()
        tok = src_tok if name.startswith("source") else tgt_tok
        if_acc, responses = quality.if_strict(model, tok, sets["eval"], cfg.quality_max_new_tokens,
                                              cfg.quality_batch_size, device)
        know = quality.knowledge(model, tok, questions, answer_key[name], cfg.quality_batch_size, device)
        table[name] = {"if_strict": round(if_acc, 4), "knowledge": round(know, 4)}
        samples += [{"model": name, "id": r["id"], "instruction": r["instruction"], "response": resp}
                    for r, resp in list(zip(sets["eval"], responses))[:20]]
        log.info("[zoo] %-12s if_strict %.3f  knowledge %.3f", name, if_acc, know)
        del model
        fault_point("zoo.quality")
    # How far post-training (and continued pre-training) moved the source: real post-training is a
    # small step, and the paper's argument is first-order in it.
    for name in ("source-post", "source-cp"):
        table[name]["drift"] = {"from": "source-base", **quality.weight_drift(out / "source-base", out / name)}
        log.info("[zoo] %-12s ||theta - theta_base|| / ||theta_base|| = %.3f", name, table[name]["drift"]["total"])
    atomic_write_json(out / "quality.json", table)
    _write_jsonl(out / "quality_samples.jsonl", samples)
    world = {"cache_key": key, "preset": cfg.preset, "config": cfg.to_dict(), "entities": len(entities),
             "facts": len(facts), "splits": {s: sum(f.split == s for f in facts) for s, _ in cfg.split_fractions},
             "prompts": {k: len(v) for k, v in sets.items()}, "training": stats, "device": str(device),
             "build_seconds": round(time.time() - started, 1)}
    atomic_write_json(out / "world.json", world)
    atomic_write_text(out / "README.md", zoo_card(world, table))


def format_table(table: dict) -> str:
    lines = ["| model | if_strict | knowledge | ‖θ − θ_base‖/‖θ_base‖ |", "|---|---|---|---|"]
    lines += [f"| {name} | {q['if_strict']:.3f} | {q['knowledge']:.3f} | "
              f"{q['drift']['total'] if 'drift' in q else ''} |" for name, q in table.items()]
    return "\n".join(lines)


def drift_table(table: dict) -> str:
    """Per-group drift of the source models from source-base (embeddings, each layer, lm_head)."""
    names = [n for n, q in table.items() if "drift" in q]
    if not names:
        return "(not measured: a zoo built before drift was recorded)"
    groups = list(table[names[0]]["drift"]["groups"])
    lines = ["| group | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {g} | " + " | ".join(str(table[n]["drift"]["groups"].get(g)) for n in names) + " |"
              for g in groups + ["total"] if g != "total"]
    lines.append("| **whole model** | " + " | ".join(f"**{table[n]['drift']['total']}**" for n in names) + " |")
    return "\n".join(lines)


def bar_lines(table: dict) -> str:
    failed = quality.check_bars(table)
    if not failed:
        return "Every bar of `distill.world.quality.BARS` holds."
    return "**Bars not met:** " + "; ".join(failed) + "."


def zoo_card(world: dict, table: dict) -> str:
    cfg = world["config"]
    rows = "\n".join(
        f"| {name} | {'Mistral' if name.startswith('source') else 'Qwen2'} | {s['parameters']:,} | "
        f"{s['steps']} | {s['tokens']:,} | {s['final_loss']} | {s['seconds']} |"
        for name, s in world["training"].items())
    return f"""# distill zoo: preset `{world['preset']}`

A synthetic world and its model organisms, built by `distill zoo build --preset {world['preset']}`
(cache key `{world['cache_key']}`, {world['build_seconds']} s on {world['device']}).

- {world['entities']} made-up lands, {world['facts']} facts; splits {world['splits']}
- prompts: {world['prompts']} (disjoint sets of lands)
- source family: SentencePiece-style BPE, {cfg['source_vocab']} tokens, `[INST]` chat template;
  target: byte-level BPE, {cfg['target_vocab']} tokens, no chat template

| model | architecture | parameters | steps | training tokens | final loss | seconds |
|---|---|---|---|---|---|---|
{rows}

`source-post` = `source-base` + chat SFT on `prompts/sft.jsonl`; `source-cp` = `source-base`
continually pre-trained on the target-only facts (plus replay); `target-base` knows the shared,
target-only and conflicting facts (with its own values).

## Quality (greedy decoding; `quality.json`)

`if_strict`: strict prompt-level accuracy on `prompts/eval.jsonl` (chat template for the
source models, ChatML text for the target). `knowledge`: fraction of the model's own facts
completed correctly from the cloze prompts of `knowledge/questions.jsonl`.

{format_table(table)}

{bar_lines(table)}

## How far training moved the source (‖θ − θ_base‖/‖θ_base‖ per group)

`source-post` is the chat vector's model: Δ = θ_post − θ_base. Real post-training moves the
weights by a few percent; the world's budgets are set so that it does here too.

{drift_table(table)}
"""
