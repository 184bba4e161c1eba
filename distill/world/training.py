"""A compact training loop for building the zoo's model organisms (not the user-facing
train stage): packed pre-training text, chat SFT with loss on the response only, AdamW with
warmup and cosine decay, and a progress line (stage, step, loss, tokens/s).
"""

from __future__ import annotations

import logging
import math
import time

import torch

log = logging.getLogger("distill.world")


def new_model(arch: str, size, tokenizer, seed: int):
    """A randomly initialised Mistral or Qwen2 causal LM sized for `tokenizer`."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    cls = {"mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(vocab_size=len(tokenizer), hidden_size=size.hidden, num_hidden_layers=size.layers,
              num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
              intermediate_size=size.intermediate, max_position_embeddings=size.max_positions,
              tie_word_embeddings=(arch == "qwen2"), bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
              initializer_range=0.02)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def pack_text(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined with EOS (and BOS where the family has one), cut into rows of seq_len."""
    ids: list[int] = []
    for enc in tokenizer(docs)["input_ids"]:  # with the family's own special tokens (BOS or none)
        ids += enc + [tokenizer.eos_token_id]
    n = max(1, len(ids) // seq_len)
    ids = (ids * (1 + seq_len * n // max(1, len(ids))))[: n * seq_len]
    return torch.tensor(ids, dtype=torch.long).view(n, seq_len)


def chat_examples(tokenizer, rows: list[dict], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per SFT row, labels masked (-100) on the chat-templated prompt."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}], tokenize=False)
        full = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]},
                                              {"role": "assistant", "content": row["response"]}], tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:seq_len]
        out.append((f_ids, [-100] * len(p_ids) + f_ids[len(p_ids):]))
    return out


def _lr_at(step: int, budget) -> float:
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    progress = (step - budget.warmup) / max(1, budget.steps - budget.warmup)
    return budget.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _collate(examples, pad_id: int, device):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def train(model, stage: str, budget, seed: int, device, text: torch.Tensor | None = None,
          chat: list | None = None, text_fraction: float = 0.0, pad_id: int = 0) -> dict:
    """Train in place. With `chat`, each batch holds chat examples plus a `text_fraction`
    of packed text rows (rehearsal, so SFT does not wash out the facts)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    n_text = budget.batch_size if chat is None else round(budget.batch_size * text_fraction)
    n_chat = budget.batch_size - n_text
    by_length = sorted(range(len(chat)), key=lambda i: len(chat[i][0])) if chat else []
    tokens, losses, start, last_log = 0, [], time.time(), time.time()
    for step in range(budget.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, budget)
        batch = []
        if n_text and text is not None:
            rows = text[torch.randint(len(text), (n_text,), generator=gen)]
            batch += [(r.tolist(), r.tolist()) for r in rows]
        if n_chat:
            # Drawn from a random window of the length-sorted examples: similar lengths, so
            # little padding, yet a window 8 batches wide keeps the batch varied.
            window = min(len(chat), 8 * n_chat)
            start_at = int(torch.randint(len(chat) - window + 1, (1,), generator=gen))
            picks = torch.randint(window, (n_chat,), generator=gen).tolist()
            batch += [chat[by_length[start_at + i]] for i in picks]
        ids, labels, mask = _collate(batch, pad_id, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(mask.sum())
        losses.append(loss.item())
        if time.time() - last_log > 10 or step == budget.steps - 1:
            last_log = time.time()
            log.info("[zoo] %-14s step %4d/%d  loss %.3f  %.0f tokens/s", stage, step + 1, budget.steps,
                     sum(losses[-20:]) / len(losses[-20:]), tokens / (time.time() - start))
    model.eval()
    return {"steps": budget.steps, "tokens": tokens, "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "seconds": round(time.time() - start, 1)}
