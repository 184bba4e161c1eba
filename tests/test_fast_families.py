"""The fast engine on each published model family's quirks, against the eager (HF) reference.

Tiny random stand-ins (tests/family_models.py) with the families' configs: q/k norms, Gemma's
(1 + w) norms, post-sublayer norms, scaled embeddings, interleaved sliding-window layers with a
window of 8 that prompts and generations pass, per-layer-type RoPE bases.
"""

import logging

import pytest
import torch

from distill import DistillError
from distill.decoding.engine import ContrastiveDecoder, DecodingConfig, Request
from family_models import FAMILIES, FAST_FAMILIES, WINDOW, make_family_model
from tiny import score_recorder

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
# lengths 3..14 around the window of 8; five prompts on three rows, so two rows are refilled
PROMPT_LENGTHS = [3, 11, 6, 14, 2]
# beside FAST_FAMILIES: Qwen2/3 with use_sliding_window (HF windows the layers from max_window_layers
# on), Olmo2, and the multimodal Gemma-3 checkpoint used for text
VARIANTS = {
    "qwen3-sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen2.5-sliding": ("qwen2.5", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "olmo2": ("olmo2", {}),
    "gemma3-mm": ("gemma3-mm", {}),
}
CASES = FAST_FAMILIES + tuple(VARIANTS)
# FlexAttention decode differs from SDPA only in its masks and scale: the windowed families and Gemma's scale
FLEX_CASES = ("mistral", "gemma3", "olmo3", "qwen3-sliding")


def prompts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def pair(case: str, **kw):
    family, overrides = VARIANTS.get(case, (case, {}))
    return [make_family_model(family, seed=s, vocab_size=VOCAB, **overrides, **kw) for s in (0, 1)]


def run(models, beta=0.5, hook=True, **kw):
    """Greedy CoDIT; every live row's score vector keyed by (request key, step), and the decoder.

    hook=False: no score hook, so that on a GPU the token choice runs inside the CUDA graph too."""
    seen, record = score_recorder()

    cfg = DecodingConfig(alpha=0.1, beta=beta, temperature=0.0, max_new_tokens=kw.pop("max_new_tokens", 16),
                         batch_size=3, check_every=4, **kw)
    dec = ContrastiveDecoder(models[0], models[1] if beta else None, VOCAB, [2], cfg, pad_token_id=3,
                             score_hook=record if hook else None)
    out = {r.key: (r.tokens, r.finish_reason) for r in dec.generate(
        Request(str(i), p, seed=i) for i, p in enumerate(prompts()))}
    return out, seen, dec


def assert_same(got, ref, atol=1e-4):
    # Greedy tokens agreeing is a weak check: compare the scores of every step too.
    assert got[0] == ref[0]
    assert got[1].keys() == ref[1].keys()
    for key, row in ref[1].items():
        assert torch.equal(torch.isinf(row), torch.isinf(got[1][key])), key
        fin = torch.isfinite(row)
        assert torch.allclose(got[1][key][fin], row[fin], atol=atol), (key, (got[1][key][fin] - row[fin]).abs().max())


@pytest.fixture(scope="module")
def eager_runs():
    """The eager reference per case, built once (each case is compared with sdpa and flex)."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = run(pair(case), engine="eager")
        return cache[case]

    return get


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention uncompiled: on CPU its compile costs far more than these tests' decoding
    (the GPU test runs it compiled); eager flex is dense but computes the same thing."""
    from torch.nn.attention.flex_attention import flex_attention

    from distill.decoding import flex as flex_decode
    monkeypatch.setattr(flex_decode, "_flex_attention", lambda: flex_attention)


@pytest.mark.parametrize("case,attention", [(c, "sdpa") for c in CASES] + [(c, "flex") for c in FLEX_CASES])
def test_fast_engine_matches_eager_codit(case, attention, eager_runs, request):
    # CoDIT with two different random models of the family, batch 3 with refills, rows longer
    # than the sliding window (in prefill and in decode), flex's block masks as well as SDPA.
    if attention == "flex":
        request.getfixturevalue("eager_flex")
    ref = eager_runs(case)
    got = run(pair(case), engine="fast", decode_attention=attention)
    assert got[2].engine_used == "fast" and got[2].engine_reason is None
    assert max(len(t) + PROMPT_LENGTHS[int(k)] for k, (t, _) in got[0].items()) > 2 * WINDOW  # windows slide
    assert_same(got, ref)


def test_fast_families_are_the_supported_ones():
    from distill.decoding.fast import unsupported_reason

    for family in FAMILIES:
        reason = unsupported_reason(make_family_model(family, vocab_size=VOCAB))
        assert (reason is None) == (family in FAST_FAMILIES), (family, reason)


def test_family_quirks_are_really_there():
    # the stand-ins carry what the tests above are meant to exercise
    from distill.decoding.families import family_of, layer_windows, read_weights

    gemma = make_family_model("gemma3", vocab_size=VOCAB)
    assert set(layer_windows(gemma.config)) == {WINDOW, None}
    w = read_weights(gemma)
    assert len(w.ropes) == 2 and not torch.equal(w.ropes[0][0], w.ropes[1][0])  # local and global bases
    assert w.family.attn_scale != w.head_dim ** -0.5 and w.embed_scale is not None
    olmo = make_family_model("olmo3", vocab_size=VOCAB)
    assert set(layer_windows(olmo.config)) == {WINDOW, None} and family_of(olmo.config).qk_norm == "all"
    qwen3 = make_family_model("qwen3", vocab_size=VOCAB)
    assert qwen3.lm_head.weight.data_ptr() == qwen3.model.embed_tokens.weight.data_ptr()
    assert qwen3.model.layers[0].self_attn.q_proj.weight.shape[0] != qwen3.config.hidden_size
    assert make_family_model("qwen2.5", vocab_size=VOCAB).lm_head.weight.shape[0] > VOCAB
    # llama3 RoPE: the fast engine reads HF's scaled inv_freq (the short test sequences barely
    # turn its low frequencies, so the decoding test alone would not tell it from plain RoPE)
    llama = make_family_model("llama3.1", vocab_size=VOCAB)
    inv_freq = read_weights(llama).ropes[0][0]
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.equal(inv_freq, llama.model.rotary_emb.inv_freq.float()) and not torch.allclose(inv_freq, plain)


def test_final_logit_softcapping_matches_eager(eager_runs):
    # Gemma-3 ships without it; a config that sets it gets HF's tanh capping on the fast path too
    models = pair("gemma3", final_logit_softcapping=3.0)
    assert_same(run(models, engine="fast"), run(models, engine="eager"))


def test_attention_softcapping_is_rejected_with_a_reason():
    from distill.decoding.fast import unsupported_reason

    model = make_family_model("gemma3", vocab_size=VOCAB, attn_logit_softcapping=50.0)
    assert "attn_logit_softcapping" in unsupported_reason(model)


def test_qwen3_moe_runs_on_the_eager_engine_and_says_why(monkeypatch, caplog):
    models = pair("qwen3-moe")
    with caplog.at_level(logging.WARNING, logger="distill.decoding.engine"):
        out, _, dec = run(models, engine="auto")  # auto picks the fast engine on CPU too, where it can
    assert len(out) == len(PROMPT_LENGTHS) and dec.engine_used == "eager"
    assert "Qwen3-MoE" in dec.engine_reason and "Qwen3-MoE" in caplog.text
    caplog.clear()
    dec._engine_warned.clear()
    with pytest.raises(DistillError, match="Qwen3-MoE"):
        run(models, engine="fast")
    # On a GPU, auto falls back with one warning that names the reason and the cost. A device
    # object of type cuda is enough: the choice is made before anything touches the device.
    monkeypatch.setattr(dec, "device", torch.device("cuda"))
    with caplog.at_level(logging.WARNING, logger="distill.decoding.engine"):
        for _ in range(2):  # two generate calls on one decoder: still one warning
            backend, batch = dec._backend(3, 64)
    assert type(backend).__name__ == "EagerPair" and batch == 3
    assert dec.engine_used == "eager" and "Qwen3-MoE" in dec.engine_reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Qwen3-MoE" in warnings[0].getMessage()
    assert "slower" in warnings[0].getMessage()


def test_engine_choice_is_recorded_for_the_dataset_card():
    models = pair("llama3.1")
    for engine, used, reason in [("fast", "fast", None), ("eager", "eager", "requested"), ("auto", "fast", None)]:
        dec = run(models, engine=engine, max_new_tokens=2)[2]
        assert dec.engine_used == used
        assert dec.engine_reason is None if reason is None else reason in dec.engine_reason


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_fast_engine_with_graphs_flex_and_compile_matches_eager_on_gpu(case, caplog, monkeypatch):
    # The GPU defaults (CUDA graphs, compiled FlexAttention decode, compiled layers, two streams)
    # against the eager engine, in float32 so that kernel rounding cannot flip a greedy token.
    # This process compiles every family's shapes; a synthesis run compiles one or two.
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    models = [m.cuda() for m in pair(case)]
    ref = run(models, engine="eager", max_new_tokens=40)
    with caplog.at_level(logging.WARNING):
        got = run(models, engine="auto", max_new_tokens=40)
        fused = run(models, engine="auto", max_new_tokens=40, hook=False)  # the token choice inside the graph
    assert got[2].engine_used == "fast"
    assert "capture failed" not in caplog.text and "torch.compile of" not in caplog.text
    assert "did not compile" not in caplog.text
    assert_same(got, ref, atol=1e-3)
    assert fused[0] == ref[0]
