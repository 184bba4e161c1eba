"""Speed levers for SFT: a linear + cross-entropy that never holds the full [tokens x vocab]
logits, the Trainer that uses it, and regional compilation of the decoder layers.

With a 150k vocabulary the logits of 8k tokens take 2.5 GB in bf16 (5 GB as fp32 for the
loss) plus the same again for their gradient. Here the lm_head matmul, the log-softmax and its
gradient run chunk by chunk inside the forward (the Liger-kernel recipe in plain torch): the
backward only scales the stored gradients, so peak extra memory is one chunk of logits.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

from distill.decoding.compiled import CompiledOrEager

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _chunk_lse_and_loss(x, labels):
    """Per-row logsumexp of fp32 logits x, and the sum of CE over the rows."""
    lse = torch.logsumexp(x, dim=-1)
    return lse, (lse - x.gather(1, labels[:, None]).squeeze(1)).sum()


def chunk_loss_and_grad(logits, labels):
    """One chunk: the sum of CE over its rows and d(sum)/d(logits) = softmax - onehot, in the
    logits' dtype. Written for Inductor, which fuses it into one pass over the chunk (the one-hot
    as a `where`, not a scatter, so no fp32 copy of the chunk is ever written)."""
    x = logits.float()
    lse, loss = _chunk_lse_and_loss(x, labels)
    p = torch.exp(x - lse[:, None])
    hit = torch.arange(x.shape[1], device=x.device) == labels[:, None]
    return loss, torch.where(hit, p - 1, p).to(logits.dtype)


def _chunk_loss_and_grad_inplace(logits, labels):
    # The same maths eagerly and in place: every op is a pass over an fp32 chunk anyway, and in
    # place it holds two such chunks fewer than `chunk_loss_and_grad` would.
    x = logits.float()
    lse, loss = _chunk_lse_and_loss(x, labels)
    grad = x.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_chunk_loss_and_grad():
    # dynamic: a chunk's row count changes from batch to batch (the last chunk, the prompt tokens)
    return CompiledOrEager(chunk_loss_and_grad, "the fused loss's chunk", dynamic=True)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, num_items, chunk_size, compiled):
        # hidden [N, d] (already shifted), weight [V, d], labels [N]; loss = sum(CE) / num_items
        loss_and_grad = _compiled_chunk_loss_and_grad() if compiled else _chunk_loss_and_grad_inplace
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Only rows with a label: prompt tokens (assistant-only loss) cost no vocab matmuls at all.
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        for start in range(0, rows.shape[0], chunk_size):
            idx = rows[start: start + chunk_size]
            h, y = hidden[idx], labels[idx]
            loss, grad = loss_and_grad(h @ weight.t(), y)
            total += loss
            grad_hidden[idx] = grad @ weight
            if grad_weight is not None:
                # add_ promotes the product to fp32 as it reads it: no fp32 copy of a [V, d] product
                grad_weight.add_(grad.t() @ h)
        scale = 1.0 / num_items
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.scale, ctx.has_wgrad = scale, grad_weight is not None
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        factor = grad_out * ctx.scale
        gh = grad_hidden * factor.to(grad_hidden.dtype)
        gw = (grad_weight * factor).to(grad_hidden.dtype) if ctx.has_wgrad else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, num_items=None, chunk_size: int = 2048,
                         compiled: bool | None = None):
    """sum(CE(hidden @ weight.T, labels)) / num_items (default: count of labels != -100).

    compiled: each chunk's softmax and gradient as torch.compile'd kernels instead of about ten
    eager passes over fp32 copies of the chunk; default: on CUDA, where those passes took about a
    tenth of a training step (BENCHMARKS.md)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if num_items is None:
        num_items = (labels != IGNORE_INDEX).sum()
    num_items = float(num_items.item() if torch.is_tensor(num_items) else num_items)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # Autocast runs the matmuls inside in its dtype, but the Function's buffers are made like
        # its inputs (grad_hidden like hidden): cast the inputs so that everything is in one dtype
        # (fp32 master weights, as the Trainer without DeepSpeed keeps them, would mix the two).
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if compiled is None:
        compiled = hidden.is_cuda
    return _LinearCrossEntropy.apply(hidden, weight, labels, max(num_items, 1.0), chunk_size, compiled)


def causal_lm_loss(model, inputs: dict, num_items_in_batch=None, chunk_size: int = 2048, inner=None):
    """The loss HF's *ForCausalLM computes (labels shifted by one), without full logits.

    `model` is the model as the Trainer holds it, wrapper included: calling the DDP or DeepSpeed
    wrapper is what synchronises gradients across ranks (calling the inner module directly left
    each rank with its own gradients). `inner` is the unwrapped *ForCausalLM (default: `model`);
    its `.model` yields the hidden states through a forward hook and its `.lm_head` needs a plain
    weight, so not under ZeRO-3, where the weight is partitioned. The forward asks for the last
    position's logits only, so the full [tokens x vocab] logits are never made."""
    inner = model if inner is None else inner
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if "logits_to_keep" in inspect.signature(type(inner).forward).parameters:  # the class's, not a wrapper's
        kwargs["logits_to_keep"] = 1
    captured = []
    handle = inner.model.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        model(**kwargs, use_cache=False)
    finally:
        handle.remove()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return linear_cross_entropy(captured[-1], inner.lm_head.weight, shifted, num_items_in_batch, chunk_size)


def compile_layers(model, zero3: bool) -> None:
    """Regional compilation: every decoder layer has the same code, so one compile serves all
    and start-up stays short (compiling the whole model takes minutes and breaks on the loss)."""
    if zero3:  # ZeRO-3's per-module gather hooks would break every graph
        log.warning("--compile-layers is skipped under ZeRO-3")
        return
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        log.warning("--compile-layers: %s has no model.layers; not compiled", type(model).__name__)
        return
    for layer in layers:
        layer.compile()


def fused_loss_trainer():
    from transformers import Trainer

    class FusedLossTrainer(Trainer):
        """Trainer whose training loss never materialises [tokens x vocab] logits."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:  # evaluation wants logits anyway
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # The linear + cross-entropy runs after the forward, outside accelerate's autocast
            # (which wraps model.forward only): re-enter it, so that under the Trainer's fp32 master
            # weights its [tokens x vocab] matmuls run in bf16 too.
            with self.accelerator.autocast():
                loss = causal_lm_loss(model, inputs, num_items_in_batch, inner=self.accelerator.unwrap_model(model))
            # Same scaling as Trainer.compute_loss: num_items_in_batch counts tokens on all ranks.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss

    return FusedLossTrainer
