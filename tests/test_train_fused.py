"""The chunked linear + cross-entropy matches HF's loss and gradients."""

import torch

from distill.train_fused import causal_lm_loss
from tiny import make_model


def test_chunked_loss_and_grads_match_hf():
    model = make_model(arch="qwen2", vocab_size=120, tie=True)
    ids = torch.randint(4, 120, (2, 24))
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt, not learnt
    ref = model(input_ids=ids, labels=labels, use_cache=False).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = causal_lm_loss(model, {"input_ids": ids, "labels": labels}, chunk_size=5)
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
