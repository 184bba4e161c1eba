"""The chunked linear + cross-entropy matches HF's loss and gradients."""

import pytest
import torch

from distill.train.fused import causal_lm_loss, linear_cross_entropy
from tiny import make_model


@pytest.mark.parametrize("tie", [True, False])  # tied: the head's and the embedding's gradients add up
def test_chunked_loss_and_grads_match_hf(tie):
    model = make_model(arch="qwen2", vocab_size=120, tie=tie)
    torch.manual_seed(1)
    ids = torch.randint(4, 120, (2, 24))
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt, not learnt
    ref = model(input_ids=ids, labels=labels, use_cache=False).loss
    # A non-unit upstream gradient (as a loss scale or a weighted sum of losses gives): the backward
    # must multiply by it, not just by 1/num_items.
    (ref * 3.0).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = causal_lm_loss(model, {"input_ids": ids, "labels": labels}, chunk_size=5)
    (loss * 3.0).backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert tie == (model.lm_head.weight is model.model.embed_tokens.weight)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_autocast_runs_the_vocab_matmuls_in_its_dtype():
    # fp32 master weights under bf16 autocast (the Trainer without DeepSpeed): the [tokens x vocab]
    # matmuls must run in bf16 like the rest of the forward, and the gradients reach the fp32 leaves.
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (9,))
    labels[:2] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward()
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    ref16 = torch.nn.functional.cross_entropy((h16 @ w16.t()).float(), labels)
    ref16.backward()
    ref32 = torch.nn.functional.cross_entropy(hidden.detach() @ weight.detach().t(), labels)
    assert loss.dtype == torch.float32
    # bf16 logits carry ~3 significant digits: the fp32 loss is 1e-2 away, the bf16 one 1e-6
    assert abs(loss.item() - ref16.item()) < 1e-4 < abs(loss.item() - ref32.item())
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(hidden.grad, h16.grad.float(), atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(weight.grad, w16.grad.float(), atol=1e-2, rtol=2e-2)


def test_the_forward_makes_no_full_logits():
    # The model's own forward runs (so DDP/DeepSpeed wrappers see it) but asks for one position's logits.
    torch.manual_seed(2)
    model = make_model(arch="qwen2", vocab_size=120)
    shapes = []
    model.lm_head.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    ids = torch.randint(4, 120, (2, 24))
    causal_lm_loss(model, {"input_ids": ids, "labels": ids}).backward()
    assert shapes == [(2, 1, 120)]


def _loss_and_grads(hidden, weight, labels, chunk_size, compiled):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk_size, compiled=compiled)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_chunk_matches_the_eager_one_and_compiles_once(dtype):
    # The GPU default (compiled=None is compiled on CUDA) checked on CPU: same loss and gradients
    # as the eager in-place chunk, for chunks of several row counts (full, last, another batch's),
    # from one compile with a symbolic row count, not one per size and not a fallback to eager.
    from torch._dynamo.utils import counters

    from distill.train.fused import _compiled_chunk_loss_and_grad

    torch._dynamo.reset()
    _compiled_chunk_loss_and_grad.cache_clear()
    graphs = counters["stats"]["unique_graphs"]
    torch.manual_seed(4)
    weight = torch.randn(300, 16).to(dtype)
    for rows in (37, 29):  # chunks of 16, 16, 5 rows, then 16, 13
        hidden = torch.randn(rows, 16).to(dtype)
        labels = torch.randint(0, 300, (rows,))
        labels[:3] = -100
        compiled = _loss_and_grads(hidden, weight, labels, chunk_size=16, compiled=True)
        eager = _loss_and_grads(hidden, weight, labels, chunk_size=16, compiled=False)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-2)
        for got, want in zip(compiled, eager):
            torch.testing.assert_close(got, want, **tol)
    assert not _compiled_chunk_loss_and_grad().failed
    assert counters["stats"]["unique_graphs"] - graphs == 1


@pytest.mark.gpu
def test_packed_rows_train_alike_with_flex_attention_and_sdpa_on_gpu():
    # The `-flex` lever of bench/train_bench.py: transformers turns restarting position ids into a
    # FlexAttention BlockMask instead of SDPA's dense block-diagonal mask. Loss and every gradient
    # must agree (fp32, so the two kernels' rounding is all that differs). No CPU twin: FlexAttention
    # has no backward on CPU.
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
    torch.manual_seed(3)
    ids = torch.randint(4, 120, (2, 160), device="cuda")
    positions = torch.stack([torch.cat([torch.arange(70), torch.arange(90)]),
                             torch.cat([torch.arange(40), torch.arange(100), torch.arange(20)])]).cuda()
    labels = ids.clone()
    labels[positions == 0] = -100  # nothing predicts a document's first token
    results = {}
    for attn in ("sdpa", "flex_attention"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).cuda().train()
        assert model.config._attn_implementation == attn  # no silent fallback to the other kernel
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": labels, "position_ids": positions})
        loss.backward()
        results[attn] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results["flex_attention"][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex_attention"][1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.gpu
def test_the_compiled_chunk_matches_the_eager_one_on_gpu():
    # What --fused-loss runs on a GPU by default (Triton kernels there, C++ on the CPU twin above).
    torch.manual_seed(5)
    hidden = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16) * 0.1
    labels = torch.randint(0, 1000, (300,), device="cuda")
    labels[:40] = -100
    compiled = _loss_and_grads(hidden, weight, labels, chunk_size=128, compiled=None)
    eager = _loss_and_grads(hidden, weight, labels, chunk_size=128, compiled=False)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-2)
