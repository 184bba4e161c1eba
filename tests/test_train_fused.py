"""The chunked linear + cross-entropy matches HF's loss and gradients."""

import pytest
import torch

from distill.train_fused import causal_lm_loss, linear_cross_entropy
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
