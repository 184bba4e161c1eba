"""The zoo card's quality table: strict prompt-level instruction following on the eval
prompts and knowledge of the model's own facts, both with greedy decoding."""

from __future__ import annotations

from distill.evaluate.checkers import check_strict
from distill.evaluate.generate import generate_greedy
from distill.evaluate.metrics import answer_matches

# What the world must give for its analyses to mean anything (issue #18): a teacher that follows
# instructions and a base that does not, every model knowing its own facts, and post-training
# (and continued pre-training) that is a small step from the base, as real ones are.
BARS = {"post_if_strict_min": 0.6, "base_if_strict_max": 0.2, "knowledge_min": 0.8, "drift_max": 0.10}


def check_bars(table: dict, bars: dict = BARS) -> list[str]:
    """The bars a quality table misses, one phrase each (empty: all hold)."""
    failed = []
    if table["source-post"]["if_strict"] < bars["post_if_strict_min"]:
        failed.append(f"source-post if_strict {table['source-post']['if_strict']} < {bars['post_if_strict_min']}")
    for name in ("source-base", "source-cp", "target-base"):
        if table[name]["if_strict"] > bars["base_if_strict_max"]:
            failed.append(f"{name} if_strict {table[name]['if_strict']} > {bars['base_if_strict_max']}")
    for name, q in table.items():
        if q["knowledge"] < bars["knowledge_min"]:
            failed.append(f"{name} knowledge {q['knowledge']} < {bars['knowledge_min']}")
        if "drift" in q and q["drift"]["total"] > bars["drift_max"]:
            failed.append(f"{name} drift {q['drift']['total']} > {bars['drift_max']}")
    return failed


# How a model without a chat template is prompted (the train stage gives the target ChatML).
CHATML = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device=None,
           add_special_tokens: bool = False) -> list[str]:
    """Greedy completions by `distill.evaluate.generate.generate_greedy` (on the model's own
    device; `device` is kept for callers); chat prompts already hold their special tokens,
    plain text gets the tokenizer's own (BOS where the family has one). Batched shortest
    prompt (in characters) first, as the zoo's quality table always was."""
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    gens = generate_greedy(model, tokenizer, ids, max_new_tokens, batch_size, desc="zoo quality", order=order)
    return [g["text"] for g in gens]


def chat_prompt(tokenizer, instruction: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return CHATML.format(instruction=instruction)


def if_strict(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int, device):
    prompts = [chat_prompt(tokenizer, r["instruction"]) for r in rows]
    responses = greedy(model, tokenizer, prompts, max_new_tokens, batch_size, device)
    passed = [all(check_strict(r["constraints"], resp)) for r, resp in zip(rows, responses)]
    return sum(passed) / max(1, len(rows)), responses


def knowledge(model, tokenizer, questions: list[dict], answer_key: str, batch_size: int, device):
    """Fraction of cloze prompts whose greedy completion starts with the model's own answer."""
    rows = [q for q in questions if q.get(answer_key)]
    completions = greedy(model, tokenizer, [q["prompt"] for q in rows], 6, batch_size, device,
                         add_special_tokens=True)
    return sum(answer_matches(c, q[answer_key]) for q, c in zip(rows, completions)) / max(1, len(rows))


def weight_drift(base_dir, other_dir) -> dict:
    """‖θ_other − θ_base‖ / ‖θ_base‖ over the whole model and per group (embeddings, each layer,
    other, lm_head; `distill.chat_vector.stats.group_of`), streamed one tensor at a time."""
    from distill.chat_vector.stats import _group_key, group_of
    from distill.io.checkpoints import Checkpoint

    base, other = Checkpoint.open(base_dir, what="base model"), Checkpoint.open(other_dir, what="model")
    sums: dict[str, list[float]] = {}
    for name in base.ordered():
        b, o = base.get(name).float(), other.get(name).float()
        acc = sums.setdefault(group_of(name), [0.0, 0.0])
        acc[0] += float((o - b).pow(2).sum())
        acc[1] += float(b.pow(2).sum())
    total = [sum(a[0] for a in sums.values()), sum(a[1] for a in sums.values())]
    ratio = lambda a: round((a[0] / a[1]) ** 0.5, 4) if a[1] > 0 else None  # noqa: E731
    return {"total": ratio(total), "groups": {g: ratio(sums[g]) for g in sorted(sums, key=_group_key)}}
