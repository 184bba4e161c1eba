"""The eager decoding backend: any Hugging Face causal LM, one DynamicCache per model.

Rows live left-padded in one cache per model, with a 2-D attention mask and position ids
from it (as `generate` does it). A refilled row is prefilled on its own and merged into the
batch by left padding; columns no row uses any more are trimmed. Slower than
`distill.decoding.fast`, but it runs every architecture and is the reference the fast
backend is tested against.
"""

from __future__ import annotations

import inspect

import torch


class EagerPair:
    """Rows live left-padded in one DynamicCache per model; a refilled row is merged by left padding.

    Works with any HF causal LM; the reference the fast engine is tested against.
    """

    def __init__(self, models, batch: int, pad_token_id: int = 0):
        self.models, self.batch, self.pad = models, batch, pad_token_id
        self.caches = [None] * len(models)
        self.mask: torch.Tensor | None = None  # [batch, columns], 1 where a column holds a real token

    @torch.no_grad()
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> list[torch.Tensor]:
        from transformers import DynamicCache

        dev = next(self.models[0].parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, device=dev)
            mask[i, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = []
        for m, model in enumerate(self.models):
            cache = DynamicCache()  # no config: plain layers we can re-pad (no sliding-window cropping)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{_cache_kwarg(model): cache}, **_last_logits_only(model))
            logits.append(out.logits[:, -1].float())
            self._merge(m, slots, cache)
        self._merge_mask(slots, mask)
        return logits

    def _merge(self, m: int, slots: list[int], new) -> None:
        if self.caches[m] is None:  # the first fill covers every slot in order
            self.caches[m] = new
            return
        for old_layer, new_layer in zip(self.caches[m].layers, new.layers):
            for name in ("keys", "values"):
                old, fresh = _left_pad_pair(getattr(old_layer, name), getattr(new_layer, name))
                old[slots] = fresh
                setattr(old_layer, name, old)

    def _merge_mask(self, slots: list[int], mask: torch.Tensor) -> None:
        if self.mask is None:
            self.mask = mask
            return
        self.mask, mask = _left_pad_pair(self.mask, mask, dim=1)
        self.mask[slots] = mask
        # Drop leading columns no row uses any more, so the cache does not grow without bound.
        first = int(self.mask.any(0).long().argmax())
        if first:
            self.mask = self.mask[:, first:]
            for cache in self.caches:
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def release(self, slots: list[int]) -> None:
        pass  # rows stay in place until refilled; _merge_mask trims columns no row uses

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        positions = self.mask.sum(-1, keepdim=True)  # the new token's position = real tokens so far
        self.mask = torch.cat([self.mask, active.long()[:, None]], dim=1)  # finished rows: masked filler
        return [model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=positions,
                      use_cache=True, **{_cache_kwarg(model): cache}).logits[:, -1].float()
                for model, cache in zip(self.models, self.caches)]


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the cache argument `cache`; earlier 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logits_only(model) -> dict:
    """Ask for the last position's logits only (prompt x vocab floats can be gigabytes)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _left_pad_pair(a: torch.Tensor, b: torch.Tensor, dim: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad the shorter of a and b with zeros along `dim` so both have the same length."""
    def pad(x, length):
        extra = length - x.shape[dim]
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    length = max(a.shape[dim], b.shape[dim])
    return pad(a, length), pad(b, length)
