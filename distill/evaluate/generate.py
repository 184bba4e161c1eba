"""Model-side helpers of evaluation: batched greedy generation and teacher-forced log-likelihoods.

Shared by `distill.evaluate.run` and the theory scripts under analysis/. Plain Hugging Face
`generate` with left padding; sequences are sorted by length so a batch wastes little padding.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from distill.io.models import stop_token_ids

log = logging.getLogger(__name__)


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """Defaults: CUDA when present; the dtype by `distill.io.models.torch_dtype` (None / auto:
    bfloat16 on CUDA, float32 on CPU)."""
    from distill.io.models import torch_dtype

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch_dtype(dtype, device)


def render_prompt(tokenizer, instruction: str) -> tuple[str, bool]:
    """The model's own chat template with a generation prompt: (text, True); without one (instruction + newline, False)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                             add_generation_prompt=True, tokenize=False)
        return text, True
    return instruction + "\n", False


def encode_prompts(tokenizer, texts: Sequence[str], templated: bool) -> list[list[int]]:
    # A rendered chat template already holds its BOS; adding special tokens again would double it.
    return [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompt_ids: Sequence[list[int]], max_new_tokens: int, batch_size: int,
                    desc: str = "generating", order: Sequence[int] | None = None) -> list[dict]:
    """Greedy continuations: [{"text", "tokens", "finish_reason": "stop" | "length"}] in input order.

    `order` is the order in which the prompts are cut into batches (default: longest first, so
    a batch wastes little padding); a caller whose results were measured with other batches
    passes its own, since the batch a prompt shares can move a near-tie greedy token.
    """
    stops = stop_token_ids(tokenizer, model)
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    if order is None:
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    else:
        order = list(order)
        if sorted(order) != list(range(len(prompt_ids))):
            raise ValueError(f"order must be a permutation of range({len(prompt_ids)})")
    results: list[dict | None] = [None] * len(prompt_ids)
    n_batches = (len(order) + batch_size - 1) // batch_size
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: the generated tokens line up at the right
            seq = prompt_ids[i]
            ids[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[r, width - len(seq):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
        for r, i in enumerate(idx):
            new = out[r, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            body = new if cut is None else new[:cut]
            results[i] = {"text": tokenizer.decode(body, skip_special_tokens=True), "tokens": len(body),
                          "finish_reason": "length" if cut is None else "stop"}
        log.info("%s: batch %d/%d", desc, b + 1, n_batches)
    return results  # type: ignore[return-value]


@torch.inference_mode()
def sum_logprobs(model, sequences: Sequence[list[int]], starts: Sequence[int], batch_size: int,
                 pad_id: int = 0, order: Sequence[int] | None = None) -> list[tuple[float, int]]:
    """For each sequence, (sum of log p(token | prefix) over positions >= start, count of those tokens).

    Teacher-forced, right padding; start >= 1 (the first token has no prediction). `order`: the
    order in which sequences are cut into batches, as `generate_greedy`'s (default: longest first).
    """
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    if order is None:
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    elif sorted(order) != list(range(len(sequences))):
        raise ValueError(f"order must be a permutation of range({len(sequences)})")
    order = list(order)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            mask[r, :len(sequences[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        pos = torch.arange(1, width, device=device)[None, :]
        for r, i in enumerate(idx):
            keep = (pos[0] >= max(starts[i], 1)) & mask[r, 1:].bool()
            out[i] = (float(lp[r][keep].sum()), int(keep.sum()))
    return out


def response_logprobs(model, tokenizer, instructions: Sequence[str], responses: Sequence[str],
                      batch_size: int = 16) -> list[tuple[float, int]]:
    """log p(response | chat-templated instruction) under `model`, with its own tokenizer and template.

    The response is tokenized after the rendered prompt as one string, so the tokens are the
    ones the model would have produced; the prompt's token count marks where the response starts.
    """
    seqs, starts = [], []
    for instruction, response in zip(instructions, responses):
        prompt, templated = render_prompt(tokenizer, instruction)
        p_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
        full = tokenizer(prompt + response, add_special_tokens=not templated)["input_ids"]
        seqs.append(full)
        starts.append(len(p_ids))
    return sum_logprobs(model, seqs, starts, batch_size, _pad_id(tokenizer))
