"""`distill evaluate`: instruction following, knowledge and perplexity of one model on a world.

A "zoo" here is any directory of the world's layout (docs/CONTRACTS.md): `prompts/eval.jsonl`
(instructions with verifiable constraints), `knowledge/questions.jsonl` (cloze facts split into
shared / source_only / target_only / conflict) and `text/heldout.jsonl` (pre-training-style text).

- if: greedy responses with the model's OWN chat template (a model without one gets the bare
  instruction, and the scores say so), scored strict and loose, prompt- and instruction-level
  (IFEval's four numbers) and per constraint kind, plus response-length statistics;
- knowledge: the greedy continuation of a bare cloze must start with the answer; per split, the
  model's own facts (its family is recognised by its tokenizer), and for conflicting facts
  whether it answers the source's way or the target's;
- ppl: held-out perplexity and bits per byte (comparable across tokenizers).

Scores go to `<model>/scores.json` (for a hub id from the HF cache: `scores/<org>--<name>.json`)
unless `out` says otherwise, responses beside them (`*.responses.jsonl`); both are written
atomically. `--lm-eval TASKS` passes the model to
lm-evaluation-harness for real checkpoints whose task data is cached locally.

Under `torchrun --nproc_per_node N -m distill.cli evaluate ...` the ranks split the if, knowledge and
ppl items (one GPU each) and the last to finish writes the scores, equal to one process's
(`distill.evaluate.shards`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from distill import DistillError
from distill.evaluate.config import ALL_SUITES, SUITES, EvaluateConfig  # noqa: F401 - SUITES, ALL_SUITES: the API
from distill.io.files import atomic_write_json, atomic_write_text, iter_jsonl
from distill.evaluate.metrics import OWN_SPLITS, instruction_following, knowledge_accuracy, length_stats, perplexity
from distill.evaluate.shards import SPLIT, Shard, gather
from distill.evaluate.shards import lock as scores_lock

log = logging.getLogger(__name__)

def read_jsonl(path: Path, need: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file; a missing file or field is an error naming the line and the fix."""
    if path.is_dir():
        raise DistillError(f"{path} is a directory; pass a .jsonl file (one JSON object per line)")
    if not path.is_file():
        raise DistillError(f"{path} not found; build the world with `distill zoo build` or pass the file's path")
    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise DistillError(f"{path}:{n}: a {type(row).__name__}, not a JSON object; each row needs {list(need)}")
        missing = [k for k in need if k not in row]
        if missing:
            raise DistillError(f"{path}:{n}: row lacks {missing}; each row needs {list(need)} (docs/CONTRACTS.md)")
        wrong = [k for k in need if not isinstance(row[k], (list, type(None)) if k == "constraints" else str)]
        if wrong:
            raise DistillError(f"{path}:{n}: {wrong[0]} is {row[wrong[0]]!r}, not a "
                               f"{'list' if wrong[0] == 'constraints' else 'string'}; fix or remove the row")
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise DistillError(f"{path} has no rows")
    return rows


def detect_family(tokenizer, zoo: Path | None) -> str | None:
    """'source' / 'target' when the model's vocabulary contains that zoo base's vocabulary (same ids).

    Containment, not equality, so a target whose tokenizer gained ChatML tokens in SFT still counts.
    """
    if zoo is None:
        return None
    from distill.io.models import load_tokenizer

    vocab = tokenizer.get_vocab()
    best: tuple[int, str | None] = (0, None)
    for name, family in (("source-base", "source"), ("target-base", "target")):
        if (zoo / name / "config.json").exists():
            try:
                base = load_tokenizer(zoo / name).get_vocab()
            except Exception:  # noqa: BLE001 - an unreadable zoo model just means "unknown"
                continue
            # The largest contained vocabulary wins: a small BPE vocabulary can be a subset of a larger one.
            if all(vocab.get(t) == i for t, i in base.items()) and len(base) > best[0]:
                best = (len(base), family)
    return best[1]


def _if_prompts(tokenizer, rows) -> tuple[list[list[int]], bool]:
    from distill.evaluate.generate import encode_prompts, render_prompt

    rendered = [render_prompt(tokenizer, r["instruction"]) for r in rows]
    templated = rendered[0][1]
    return encode_prompts(tokenizer, [t for t, _ in rendered], templated), templated


def _score_if(rows, gens, templated) -> tuple[dict, list[dict]]:
    from distill.evaluate.checkers import check_loose, check_strict

    responses = [g["text"] for g in gens]
    scores = instruction_following(responses, rows, check_strict, check_loose)
    scores["prompt_format"] = "chat_template" if templated else "plain (the model has no chat template)"
    scores["length"] = length_stats(responses, [g["tokens"] for g in gens], [g["finish_reason"] for g in gens])
    records = [{"suite": "if", "id": r.get("id", str(i)), "response": g["text"], "tokens": g["tokens"],
                "finish_reason": g["finish_reason"],
                "strict": check_strict(r.get("constraints") or [], g["text"])}
               for i, (r, g) in enumerate(zip(rows, gens))]
    return scores, records


def _knowledge_prompts(tokenizer, rows) -> tuple[list[list[int]], int]:
    """The clozes' ids and the new tokens each gets: room for the longest answer, and two more."""
    from distill.evaluate.generate import encode_prompts

    # A cloze is plain text for every model (chat-tuned or not): it tests stored facts, not chat.
    answers = [a for r in rows for a in (r.get("answer"), r.get("source_answer"), r.get("target_answer")) if a]
    longest = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in answers)
    return encode_prompts(tokenizer, [r["prompt"] for r in rows], templated=False), longest + 2


def _score_knowledge(rows, gens, family) -> tuple[dict, list[dict]]:
    conts = [g["text"] for g in gens]
    scores = knowledge_accuracy(conts, rows, family)
    records = [{"suite": "knowledge", "id": r.get("id", str(i)), "split": r.get("split"), "continuation": c}
               for i, (r, c) in enumerate(zip(rows, conts))]
    return scores, records


def _ppl_texts(tokenizer, rows, cfg) -> tuple[list[list[int]], int]:
    seqs, n_bytes = [], 0
    for r in rows:
        ids = tokenizer(r["text"], add_special_tokens=True, truncation=True, max_length=cfg.max_length)["input_ids"]
        seqs.append(ids)
        n_bytes += len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
    return seqs, n_bytes


def _score_ppl(rows, sums, n_bytes) -> dict:
    scores = perplexity(-sum(s for s, _ in sums), sum(n for _, n in sums), n_bytes)
    scores["texts"] = len(rows)
    return scores


def _greedy(model, tokenizer, ids, max_new_tokens, cfg, shard, desc) -> dict[int, dict]:
    """This rank's greedy continuations, by item index (one process: every item)."""
    from distill.evaluate.generate import generate_greedy

    mine = shard.items([len(x) for x in ids], cfg.batch_size)
    gens = generate_greedy(model, tokenizer, [ids[i] for i in mine], max_new_tokens, cfg.batch_size, desc=desc,
                           order=range(len(mine)))
    return dict(zip(mine, gens))


def _logprobs(model, tokenizer, seqs, cfg, shard) -> dict[int, tuple[float, int]]:
    """This rank's (sum of log-probabilities, tokens) of whole texts, by item index."""
    from distill.evaluate.generate import sum_logprobs

    mine = shard.items([len(x) for x in seqs], cfg.batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = sum_logprobs(model, [seqs[i] for i in mine], [1] * len(mine), cfg.batch_size, pad, order=range(len(mine)))
    return dict(zip(mine, sums))


def run_evaluation(cfg: EvaluateConfig) -> dict:
    """Evaluate one model; returns the scores dict and writes it (and the responses) to disk. Under a
    launcher (WORLD_SIZE > 1) the ranks split the work (`distill.evaluate.shards`): the one that
    merges returns the scores, the others None."""
    from distill.evaluate.generate import resolve_device_dtype
    from distill.io.models import load_causal_lm, load_tokenizer, resolve_model

    from distill.io.validate import check_model_dir

    cfg.validate()
    if cfg.family not in (None, *[f for f in OWN_SPLITS if f]):
        raise DistillError(f"--family must be 'source' or 'target', got {cfg.family!r}")
    model_dir = resolve_model(cfg.model)
    check_model_dir(model_dir)  # config.json and every shard's header, before an input is read or a weight loaded
    zoo = Path(cfg.zoo) if cfg.zoo else None
    world = zoo or cfg.prompts or cfg.questions or cfg.heldout
    suites = tuple(x for x in cfg.suites if world or (x == "judge" and cfg.judge_benchmark))
    if zoo is not None and not zoo.is_dir():
        raise DistillError(f"zoo directory {zoo} not found; build one with `distill zoo build` or point --zoo at it")
    if not suites and not cfg.lm_eval_tasks:
        raise DistillError("nothing to evaluate: give --zoo DIR (the world's layout), --suite judge with "
                           "--judge-benchmark, and/or --lm-eval TASKS")

    def path(override, *rel):
        if override:
            return Path(override)
        if zoo is None:
            raise DistillError(f"no zoo given for {'/'.join(rel)}: pass --zoo DIR")
        return zoo.joinpath(*rel)

    # Read every input before loading the model, so a bad file fails in a second, not a minute.
    inputs = {}
    if "if" in suites:
        inputs["if"] = read_jsonl(path(cfg.prompts, "prompts", "eval.jsonl"), ("instruction", "constraints"), cfg.limit)
    if "knowledge" in suites:
        inputs["knowledge"] = read_jsonl(path(cfg.questions, "knowledge", "questions.jsonl"),
                                         ("prompt", "answer"), cfg.limit)
    if "ppl" in suites:
        inputs["ppl"] = read_jsonl(path(cfg.heldout, "text", "heldout.jsonl"), ("text",), cfg.limit)
    if "judge" in suites:
        inputs["judge"] = _judge_inputs(cfg, path)

    out = Path(cfg.out) if cfg.out else default_scores_path(cfg.model, model_dir)
    from distill.io.validate import guard_path

    guard_path(out, "scores")
    if out.is_dir():
        raise DistillError(f"scores path {out} is a directory; pass --out FILE.json")
    if not os.access(out.parent if out.parent.exists() else out.parent.parent, os.W_OK):
        raise DistillError(f"cannot write scores to {out}: pass --out to a writable path")
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    shard = Shard.current()
    if shard.world > 1 and not any(x in inputs for x in SPLIT):
        if shard.rank:  # nothing here is split item by item: the first rank runs it all
            log.info("rank %d of %d: nothing to split (suites %s); rank 0 writes %s", shard.rank, shard.world,
                     list(suites), out)
            return None
        shard = Shard()
    start = time.time()
    scores: dict = {"model": str(model_dir), "zoo": str(zoo) if zoo else None, "suites": list(suites),
                    "settings": {k: v for k, v in asdict(cfg).items() if k not in ("model", "zoo", "suites", "out")}}
    scores["settings"].update(device=device, dtype=str(dtype).replace("torch.", ""))
    records: list[dict] = []
    with scores_lock(out, shard) as held:
        if suites:
            tokenizer = load_tokenizer(model_dir)
            model = load_causal_lm(model_dir, dtype=dtype, device=shard.device(device))
            family = cfg.family or detect_family(tokenizer, zoo)
            scores["family"] = family
            scores["chat_template"] = bool(getattr(tokenizer, "chat_template", None))
            items: dict | None = {}
            if "if" in inputs:
                ids, templated = _if_prompts(tokenizer, inputs["if"])
                items["if"] = _greedy(model, tokenizer, ids, cfg.max_new_tokens, cfg, shard, "if")
            if "knowledge" in inputs:
                ids, max_new = _knowledge_prompts(tokenizer, inputs["knowledge"])
                items["knowledge"] = _greedy(model, tokenizer, ids, max_new, cfg, shard, "knowledge")
            if "ppl" in inputs:
                seqs, n_bytes = _ppl_texts(tokenizer, inputs["ppl"], cfg)
                items["ppl"] = _logprobs(model, tokenizer, seqs, cfg, shard)
            if shard.world > 1:
                items = gather(out, shard, held, items)
                if items is None:
                    log.info("rank %d of %d: its part is written; the last rank to finish writes %s", shard.rank,
                             shard.world, out)
                    return None

            def ordered(suite: str) -> list:
                return [items[suite][i] for i in range(len(inputs[suite]))]

            if "if" in inputs:
                scores["if"], recs = _score_if(inputs["if"], ordered("if"), templated)
                records += recs
            if "knowledge" in inputs:
                scores["knowledge"], recs = _score_knowledge(inputs["knowledge"], ordered("knowledge"), family)
                records += recs
            if "ppl" in inputs:
                scores["ppl"] = _score_ppl(inputs["ppl"], ordered("ppl"), n_bytes)
            if "judge" in inputs:
                from distill.evaluate.judge.suite import judge_suite

                bench, judge = inputs["judge"]
                cache = Path(cfg.judge_cache) if cfg.judge_cache else out.with_name(out.stem + ".judgments.jsonl")
                # the if suite's greedy answers to the same prompt file are the judge suite's answers too
                same = "if" in inputs and Path(bench.name) == path(cfg.prompts, "prompts", "eval.jsonl")
                answered = {r["id"]: {"text": r["response"], "finish_reason": r["finish_reason"]}
                            for r in records if r["suite"] == "if"} if same else None
                scores["judge"], recs = judge_suite(model, tokenizer, bench, judge, cache, cfg.max_new_tokens,
                                                    cfg.batch_size, answered)
                records += recs
            del model
        if cfg.lm_eval_tasks:
            from distill.evaluate.lm_eval import run_lm_eval

            scores["lm_eval"] = run_lm_eval(model_dir, cfg.lm_eval_tasks, shard.device(device),
                                            scores["settings"]["dtype"], cfg.batch_size, cfg.limit)
        scores["seconds"] = round(time.time() - start, 2)
        atomic_write_json(out, scores)
        if cfg.save_responses and records:
            atomic_write_text(responses_path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    log.info("scores written to %s", out)
    return scores


def _judge_inputs(cfg: EvaluateConfig, path):
    """The judged benchmark and the judge's settings, checked before the model loads."""
    from distill.evaluate.judge import judge_settings
    from distill.evaluate.judge.benchmarks import load_benchmark, read_reference
    from distill.evaluate.judge.templates import load_templates

    spec = cfg.judge_benchmark or str(path(None, "prompts", "eval.jsonl"))
    mode = cfg.judge_mode or ("pairwise" if cfg.judge_reference else None)
    bench = load_benchmark(spec, None if cfg.judge_reference else mode, cfg.limit)
    if cfg.judge_reference:
        read_reference(cfg.judge_reference, bench.items)
        bench.mode = mode
    from distill.evaluate.judge.suite import prepare_judge

    load_templates(cfg.judge_template)  # a template without its placeholders: an error now
    settings = judge_settings(cfg, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype)
    return bench, prepare_judge(bench, settings)


def default_scores_path(model_ref: str, model_dir: Path) -> Path:
    """<model>/scores.json for a local directory; for a hub id resolved from the Hugging Face
    cache, scores/<org>--<name>.json in the working directory: the cache is not ours to write
    into (and is often read-only, shared)."""
    if Path(os.path.expanduser(str(model_ref))).is_dir():
        return model_dir / "scores.json"
    return Path("scores") / (str(model_ref).replace("/", "--") + ".json")


def responses_path(scores_json: Path) -> Path:
    return scores_json.with_name(scores_json.stem + ".responses.jsonl")


def evaluate(model, zoo=None, suites=SUITES, out=None, **settings) -> dict:
    """Python entry point (docs/CONTRACTS.md); `settings` are EvaluateConfig fields."""
    return run_evaluation(EvaluateConfig(model=str(model), zoo=str(zoo) if zoo else None, suites=list(suites),
                                         out=str(out) if out else None, **settings))


def summary_lines(scores: dict) -> list[str]:
    lines = [f"model: {scores['model']} (family: {scores.get('family')}, chat template: {scores.get('chat_template')})"]
    if "if" in scores:
        s = scores["if"]
        lines.append(f"if: prompt strict {s['prompt_level_strict']:.3f} loose {s['prompt_level_loose']:.3f}; "
                     f"instruction strict {s['inst_level_strict']:.3f} loose {s['inst_level_loose']:.3f}; "
                     f"mean words {s['length']['mean_words']:.1f}")
    if "knowledge" in scores:
        k = scores["knowledge"]
        per = ", ".join(f"{n} {v['accuracy']:.3f}" for n, v in k["per_split"].items())
        lines.append(f"knowledge: {per}; conflicts answered source's way {k['conflict']['source_way']}")
    if "ppl" in scores:
        lines.append(f"ppl: {scores['ppl']['perplexity']:.3f} ({scores['ppl']['bits_per_byte']:.4f} bits/byte)")
    if "judge" in scores:
        j = scores["judge"]
        if j.get("win_rate") is not None:
            lines.append(f"judge ({j['judge']}, {j['benchmark']}): win rate {j['win_rate']:.1f} %, length-controlled "
                         f"{j['lc_win_rate']:.1f} %; unjudged {j['unjudged']}")
        else:
            mean = "n/a" if j.get("mean") is None else f"{j['mean']:.2f}"
            lines.append(f"judge ({j['judge']}, {j['benchmark']}, {j['mode']}): mean score {mean} of 10; "
                         f"unjudged {j.get('unjudged', 0)}")
    if "lm_eval" in scores:
        lines.append(f"lm-eval: {json.dumps(scores['lm_eval'].get('results', {}))[:400]}")
    return lines
