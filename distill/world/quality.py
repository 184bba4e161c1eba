"""The zoo card's quality table: strict prompt-level instruction following on the eval
prompts and knowledge of the model's own facts, both with greedy decoding."""

from __future__ import annotations

from distill.evaluate.checkers import check_strict
from distill.evaluate.generate import generate_greedy
from distill.evaluate.metrics import answer_matches

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
