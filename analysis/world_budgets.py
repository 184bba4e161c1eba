"""How the tiny world's training budgets were chosen (issue #18): one source-base, then one
post-training (or continued pre-training) variant from it, reporting ‖θ − θ_base‖/‖θ_base‖ per group
and the variant's IF strict and knowledge. Results: analysis/results/world/budgets.md.

    python analysis/world_budgets.py OUT_DIR '{"base_dir": "BASE_DIR", "formats": 1600, "qa": 0.5,
        "cfg": {"pretrain": {"steps": 900, "lr": 2e-3}, "sft": {"steps": 700, "lr": 1e-4, "batch_size": 24,
                "seq_len": 160, "warmup": 20}}}'

It is the exploration script as it was run, kept so the table can be reproduced: its format pages
are drawn from a second land partition (make_sets with another seed), not from the SFT lands as the
world's `formats` set now is, so its numbers differ from the built world's (the zoo card has those).
"""
import dataclasses, json, sys, time, logging, os
from pathlib import Path
import torch
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
from distill.world import knowledge, jobs, quality
from distill.world.config import get_preset, StageBudget
from distill.world.instructions import make_sets
from distill.world.tokenizers import train_source_tokenizer, train_target_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

out = Path(sys.argv[1]); spec = json.loads(sys.argv[2])
torch.set_num_threads(1)
cfg = get_preset("tiny")
cfg = dataclasses.replace(cfg, **{k: StageBudget(**v) if isinstance(v, dict) else v for k, v in spec.get("cfg", {}).items()})
entities, facts = knowledge.make_facts(cfg.seed, cfg.n_entities, cfg.split_fractions)
sets = make_sets(facts, entities, dataclasses.replace(cfg, n_format_docs=0, n_synthesis=300), cfg.seed + 1)
source_docs = knowledge.documents(facts, "source", cfg.text_epochs, cfg.seed + 2)
if spec.get("formats"):
    import random
    fmt = make_sets(facts, entities, dataclasses.replace(cfg, n_sft=spec["formats"], n_format_docs=0, n_synthesis=300), cfg.seed + 11)["sft"]
    qa = spec.get("qa", 0.0)
    fdocs = [(f"Question: {r['instruction']}\nAnswer: {r['response']}" if i < qa * len(fmt) else r["response"]) for i, r in enumerate(fmt)]
    base_docs = source_docs + fdocs * spec.get("format_reps", 1)
    random.Random(0).shuffle(base_docs)
else:
    base_docs = source_docs
print("DOCS", len(source_docs), sum(len(d) for d in source_docs), len(base_docs), sum(len(d) for d in base_docs))
questions = knowledge.question_rows(facts)
base_dir = Path(spec["base_dir"])
if not (base_dir / "model.safetensors").exists():
    instructions = [r["instruction"] for rows in sets.values() for r in rows] + [r["response"] for r in sets["sft"]]
    tok = train_source_tokenizer(source_docs + instructions, cfg.source_vocab)
    tok.save_pretrained(base_dir)
    st = jobs.run_job(jobs.Job("source-base", "mistral", base_dir, cfg.pretrain, cfg.seed, base_docs, size=cfg.source_size))
    print("BASE", st, flush=True)
tok = AutoTokenizer.from_pretrained(base_dir)
if spec.get("stage", "sft") == "sft":
    tok.save_pretrained(out)
    st = jobs.run_job(jobs.Job("source-post", "mistral", out, cfg.sft, cfg.seed + 1, base_docs, init=base_dir,
                               chat_rows=sets["sft"], text_fraction=cfg.sft_text_fraction))
    key = "source_answer"
else:
    extra = [f for f in facts if f.split == "target_only"]
    cp_docs = knowledge.documents(extra, "target", cfg.text_epochs, cfg.seed + 4) + source_docs[: len(source_docs) // 2]
    tok.save_pretrained(out)
    st = jobs.run_job(jobs.Job("source-cp", "mistral", out, cfg.cp, cfg.seed + 2, cp_docs, init=base_dir))
    key = "answer"
b = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
p = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
bs, ps = b.state_dict(), p.state_dict()
num = sum(float((ps[k] - bs[k]).pow(2).sum()) for k in bs); den = sum(float(bs[k].pow(2).sum()) for k in bs)
groups = {}
for k in bs:
    g = "lm_head" if "lm_head" in k else "embed" if "embed" in k else k.split(".")[2] if ".layers." in k else "other"
    n, d = groups.get(g, (0, 0)); groups[g] = (n + float((ps[k] - bs[k]).pow(2).sum()), d + float(bs[k].pow(2).sum()))
ifs, _ = quality.if_strict(p, tok, sets["eval"], cfg.quality_max_new_tokens, 64, "cpu")
kn = quality.knowledge(p, tok, questions, key, 64, "cpu")
kb = quality.knowledge(b, tok, questions, "source_answer", 64, "cpu")
res = {"spec": spec, "ratio": (num / den) ** 0.5, "groups": {g: round((n / d) ** .5, 4) for g, (n, d) in groups.items()},
       "if": ifs, "know": kn, "base_know": kb, "stats": st}
print("RESULT", json.dumps(res), flush=True)
