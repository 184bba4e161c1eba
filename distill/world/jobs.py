"""The zoo's four training jobs and how they are scheduled.

source-base must come first (post and cp start from it); target-base is independent. On a
CPU the target trains in a second process while the source chain runs, one thread each:
tiny matrices use two single-threaded processes far better than one two-threaded one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("distill.world")


@dataclass
class Job:
    name: str
    arch: str  # "mistral" | "qwen2"
    out: Path  # the model directory; its tokenizer is already saved there
    budget: object  # a StageBudget
    seed: int
    docs: list[str]
    size: object = None  # a ModelSize, for a model trained from scratch
    init: Path | None = None  # a model directory to start from
    chat_rows: list[dict] = field(default_factory=list)
    text_fraction: float = 0.0
    device: str = "cpu"
    threads: int = 0  # 0: leave torch's default


def run_job(job: Job, log_level: int = logging.INFO) -> dict:
    """Train one model and save it (safetensors) next to its tokenizer; returns its stats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from distill.world.training import chat_examples, new_model, pack_text, train

    if not logging.getLogger().handlers:  # a fresh worker process: show its progress too
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    hf_logging.disable_progress_bar()
    if job.threads:
        torch.set_num_threads(job.threads)
    tok = AutoTokenizer.from_pretrained(job.out)
    if job.init is not None:
        model = AutoModelForCausalLM.from_pretrained(job.init, dtype=torch.float32, use_safetensors=True)
    else:
        model = new_model(job.arch, job.size, tok, job.seed)
    seq = job.budget.seq_len
    chat = chat_examples(tok, job.chat_rows, seq) if job.chat_rows else None
    # Rehearsal rows in SFT are short so that most of each batch is chat.
    text = pack_text(tok, job.docs, seq if chat is None else min(seq, 64))
    stats = train(model, job.name, job.budget, job.seed, torch.device(job.device), text=text, chat=chat,
                  text_fraction=job.text_fraction, pad_id=tok.pad_token_id)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(job.out, safe_serialization=True)
    from distill.io.files import fault_point

    fault_point("zoo.model")
    stats["parameters"] = sum(p.numel() for p in model.parameters())
    return stats


def run_all(base: Job, post: Job, cp: Job, target: Job, parallel: bool) -> dict[str, dict]:
    """base, then post in this process; target and then cp in a worker process if `parallel`."""
    if not parallel:
        return {j.name: run_job(j) for j in (base, post, cp, target)}
    import torch

    threads = torch.get_num_threads()
    for job in (base, post, cp, target):
        job.threads = 1
    level = logging.getLogger("distill.world").getEffectiveLevel()
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        target_future = pool.submit(run_job, target, level)
        stats = {"source-base": run_job(base)}
        cp_future = pool.submit(run_job, cp, level)  # queued behind the target
        stats["source-post"] = run_job(post)
        stats["source-cp"] = cp_future.result()
        stats["target-base"] = target_future.result()
    torch.set_num_threads(threads)
    return stats


def can_parallelize(device: str) -> bool:
    return device == "cpu" and (os.cpu_count() or 1) >= 2
