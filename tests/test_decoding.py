"""The contrastive step and the two decoding engines, on tiny random models (CPU, float32)."""

import math

import pytest
import torch

from distill import DistillError
from distill.decoding.engine import ContrastiveDecoder, DecodingConfig, Request
from distill.decoding.step import (contrastive_scores, next_token, plausibility_mask, row_uniform, select_next,
                                   top_p_filter)
from tiny import make_model, make_tokenizer, score_recorder

TEXTS = ["the quick brown fox", "answer", "write the response in lowercase letters and end with the word",
         "the capital", "please repeat the request", "the lazy dog"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()  # ~168 tokens, while the models have 200 rows: a padded vocabulary
    return tok, make_model(seed=0), make_model(seed=1), [tok(t).input_ids for t in TEXTS]


def run(expert, amateur, vocab, prompts, hook=None, stop_ids=(2,), **kw):
    dec = ContrastiveDecoder(expert, amateur, vocab, stop_ids, DecodingConfig(**kw), pad_token_id=3, score_hook=hook)
    return {r.key: (r.tokens, r.finish_reason) for r in dec.generate(
        [Request(str(i), p, seed=100 + i) for i, p in enumerate(prompts)])}


def run_with_scores(expert, amateur, vocab, prompts, **kw):
    """run(), plus every live row's score vector keyed by (request key, step)."""
    seen, hook = score_recorder()

    return run(expert, amateur, vocab, prompts, hook, **kw), seen


def assert_same_scores(got, ref, atol=1e-4):
    # Greedy tokens agreeing is a weak check (a wrong attention width or RoPE scale can shift
    # scores by a few hundredths without changing an argmax); compare the scores themselves.
    assert got.keys() == ref.keys()
    for key, row in ref.items():
        assert torch.equal(torch.isinf(row), torch.isinf(got[key])), key
        fin = torch.isfinite(row)
        assert torch.allclose(got[key][fin], row[fin], atol=atol), (key, (got[key][fin] - row[fin]).abs().max())


# --- the step -----------------------------------------------------------------------------------

def test_alpha_bounds_and_argmax_survives():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 5
    lp = torch.log_softmax(logits, -1)
    assert plausibility_mask(lp, 0.0).all()
    only = plausibility_mask(lp, 1.0)
    assert (only.sum(-1) == 1).all() and only[torch.arange(64), lp.argmax(-1)].all()
    for alpha in (0.01, 0.3, 0.99):
        keep = plausibility_mask(lp, alpha)
        assert keep[torch.arange(64), lp.argmax(-1)].all()
        p = lp.exp()
        assert torch.equal(keep, p >= alpha * p.max(-1, keepdim=True).values - 1e-7) or \
            (keep ^ (p >= alpha * p.max(-1, keepdim=True).values)).sum() <= 1  # float boundary only


def test_scores_formula_and_no_nan():
    torch.manual_seed(1)
    e, a = torch.randn(8, 30), torch.randn(8, 30)
    s = contrastive_scores(e, a, alpha=0.1, beta=0.5)
    lp_e, lp_a = torch.log_softmax(e, -1), torch.log_softmax(a, -1)
    keep = lp_e.exp() >= 0.1 * lp_e.exp().max(-1, keepdim=True).values
    assert torch.allclose(s[keep], (lp_e - 0.5 * lp_a)[keep], atol=1e-6)
    assert torch.isneginf(s[~keep]).all()
    # extreme, bf16 and -inf logits: never NaN, and a finite best candidate per row
    e = (torch.randn(8, 30) * 1e4).bfloat16()
    a = torch.randn(8, 30) * 1e4
    a[:, :5] = float("-inf")
    for beta in (0.0, 1.0, 5.0):
        s = contrastive_scores(e, a, 0.01, beta)
        assert not s.isnan().any() and torch.isfinite(s.max(-1).values).all()
        tok = select_next(s, 1.0, 0.9, torch.arange(8), torch.zeros(8, dtype=torch.long))
        assert torch.isfinite(s[torch.arange(8), tok]).all()


def test_padded_rows_never_chosen_and_top_p():
    logits = torch.zeros(4, 12)
    logits[:, 10:] = 1e3  # padding rows beyond a real vocabulary of 10
    cfg = DecodingConfig(alpha=0.0, beta=0.0)
    tok, scores = next_token(logits, None, cfg, torch.arange(4), torch.zeros(4, dtype=torch.long), vocab_size=10)
    assert scores.shape[-1] == 10 and (tok < 10).all()
    peaked = torch.tensor([[5.0, 1.0, 0.0, 0.0]] * 4)
    cfg = DecodingConfig(alpha=0.0, beta=0.0, top_p=0.5)
    for step in range(20):
        tok, _ = next_token(peaked, None, cfg, torch.arange(4), torch.full((4,), step), vocab_size=4)
        assert (tok == 0).all()  # the top token holds > 0.5 of the mass: nothing else survives


def test_top_p_keeps_exactly_the_nucleus():
    # Probabilities in a shuffled vocabulary order, so a filter that forgets to map the sorted
    # order back, or keeps one token too few or too many, keeps the wrong ids.
    probs = torch.tensor([0.04, 0.30, 0.12, 0.25, 0.20, 0.09])  # sorted: ids 1, 3, 4, 2, 5, 0
    lp = probs.log().expand(2, 6).clone()
    lp[1] = lp[1, [5, 2, 0, 4, 1, 3]]  # a second row, permuted again: sorted ids 4, 5, 3, 1, 0, 2
    for top_p, keep in [(0.2, [[1], [4]]), (0.5, [[1, 3], [4, 5]]), (0.8, [[1, 2, 3, 4], [1, 3, 4, 5]]),
                        (0.9, [[1, 2, 3, 4, 5], [0, 1, 3, 4, 5]]), (1.0, [list(range(6))] * 2)]:
        out = top_p_filter(lp, top_p)
        for row in range(2):
            kept = torch.isfinite(out[row]).nonzero().flatten().tolist()
            assert kept == keep[row], (top_p, row, kept)
            assert torch.equal(out[row, kept], lp[row, kept])  # survivors keep their log-probs


def _reference_sample(scores: torch.Tensor, temperature: float, top_p: float, u: float) -> int:
    """select_next by hand, in float64: softmax(scores / T), then the top-p nucleus of those
    probabilities, then the first token whose CDF (in vocabulary order) exceeds u * total."""
    probs = torch.softmax(scores.double() / temperature, dim=-1)
    order = probs.argsort(descending=True, stable=True)
    size = int((probs[order].cumsum(0) < top_p).sum()) + 1  # smallest prefix whose mass reaches top_p
    kept = torch.zeros_like(probs)
    kept[order[:size]] = probs[order[:size]]
    cdf = kept.cumsum(0)
    return int((cdf <= u * cdf[-1]).sum())


@pytest.mark.parametrize("temperature,top_p", [(0.5, 1.0), (2.0, 1.0), (0.5, 0.8), (2.0, 0.8), (1.0, 0.6)])
def test_temperature_and_top_p_sampling_matches_a_hand_reference(temperature, top_p):
    # Temperature divides the scores and top-p then filters the tempered distribution; random
    # scores (vocabulary order != sorted order, a few masked tokens) and many (seed, step) draws.
    torch.manual_seed(5)
    scores = torch.randn(6, 24) * 0.8
    scores[:, [3, 17]] = float("-inf")  # plausibility-masked tokens
    seeds = torch.arange(6).repeat_interleave(40) + 20
    steps = torch.arange(40).repeat(6)
    rows = scores.repeat_interleave(40, dim=0)
    tok = select_next(rows, temperature, top_p, seeds, steps)
    u = row_uniform(seeds, steps)
    expected = [_reference_sample(rows[i], temperature, top_p, float(u[i])) for i in range(len(rows))]
    assert tok.tolist() == expected
    for r in range(6):  # a real draw: several tokens of each row's nucleus come up
        assert len(set(tok[r * 40:(r + 1) * 40].tolist())) >= 3


def test_counter_randomness_is_reproducible_and_samples_the_distribution():
    seeds, steps = torch.tensor([7, 7, 8, 7]), torch.tensor([3, 3, 3, 4])
    u = row_uniform(seeds, steps)
    assert u[0] == u[1] and u[0] != u[2] and u[0] != u[3] and ((u > 0) & (u < 1)).all()
    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])  # token 2 has no mass: never drawn
    n = 4000
    tok = select_next(probs.log().expand(n, 5), 1.0, 1.0, torch.full((n,), 11), torch.arange(n))
    freq = torch.bincount(tok, minlength=5).float() / n
    assert freq[2] == 0 and torch.allclose(freq, probs, atol=0.03), freq


# --- the engines --------------------------------------------------------------------------------

def test_expert_and_amateur_on_different_devices_is_a_clear_error(setup):
    tok, expert, _, _ = setup
    amateur = make_model(seed=1).to("meta")  # any device other than the expert's
    with pytest.raises(DistillError, match="must be on one device"):
        ContrastiveDecoder(expert, amateur, len(tok), [2])


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_direct_greedy_equals_hf_generate(setup, engine):
    tok, expert, _, prompts = setup
    vocab, new = len(tok), 12
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), 3)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, mixed lengths
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ref = expert.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          suppress_tokens=list(range(vocab, 200)), pad_token_id=3, eos_token_id=2)[:, width:]
    ours = run(expert, None, vocab, prompts, alpha=0.0, beta=0.0, temperature=0.0, max_new_tokens=new,
               batch_size=4, engine=engine, check_every=3)  # batch < prompts: rows get refilled
    for i in range(len(prompts)):
        tokens, reason = ours[str(i)]
        expected = ref[i].tolist()
        if 2 in expected:
            expected = expected[:expected.index(2) + 1]
        assert tokens == expected, (i, tokens, expected)
        assert reason == ("stop" if tokens[-1] == 2 else "length")


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_cached_scores_equal_full_recompute(setup, engine):
    tok, expert, amateur, prompts = setup
    vocab, seen = len(tok), []

    def hook(keys, steps, active, scores):
        for k, s, a, row in zip(keys, steps, active, scores):
            if a:
                seen.append((k, s, row.clone()))

    out = run(expert, amateur, vocab, prompts[:4], hook, alpha=0.05, beta=0.7, max_new_tokens=6, batch_size=2,
              engine=engine)
    assert len(seen) == sum(len(t) for t, _ in out.values())
    with torch.no_grad():
        for key, step, row in seen:
            seq = torch.tensor([prompts[int(key)] + out[key][0][:step]])
            ref = contrastive_scores(expert(seq).logits[0, -1, :vocab], amateur(seq).logits[0, -1, :vocab], 0.05, 0.7)
            assert torch.equal(torch.isinf(ref), torch.isinf(row))
            fin = torch.isfinite(ref)
            assert torch.allclose(ref[fin], row[fin], atol=1e-4), (key, step)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_and_fast_engine_match_batch_one(setup, temperature):
    tok, expert, amateur, prompts = setup
    base = run(expert, amateur, len(tok), prompts, temperature=temperature, max_new_tokens=10, batch_size=1,
               engine="eager")
    assert len(base) == len(prompts)
    for engine, batch in [("eager", 4), ("fast", 4), ("fast", 1)]:
        assert run(expert, amateur, len(tok), prompts, temperature=temperature, max_new_tokens=10,
                   batch_size=batch, engine=engine, check_every=4) == base, (engine, batch)


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_refills_wait_for_refill_min_free_slots_and_change_no_output(setup, engine):
    tok, expert, amateur, prompts = setup
    prompts = prompts + [p[::-1] for p in prompts]  # 12 prompts through 4 slots
    kw = dict(temperature=1.0, max_new_tokens=12, batch_size=4, engine=engine, check_every=2)
    stops = [2, 5, 7, 11, 13]  # several stop ids, so rows finish at different checks
    outputs, admitted = {}, {}
    for refill_min in (1, 3):
        dec = ContrastiveDecoder(expert, amateur, len(tok), stops, DecodingConfig(refill_min=refill_min, **kw))
        sizes, admit = [], dec._admit
        def counted(backend, slots, free, queue, admit=admit, sizes=sizes):
            left = admit(backend, slots, free, queue)
            sizes.append(len(free) - len(left))  # rows admitted by this call
            return left

        dec._admit = counted
        outputs[refill_min] = {r.key: r.tokens for r in dec.generate(
            [Request(str(i), p, seed=100 + i) for i, p in enumerate(prompts)])}
        admitted[refill_min] = sizes
    assert outputs[1] == outputs[3] and len(outputs[1]) == 12
    assert sum(admitted[3]) == sum(admitted[1]) == 12
    assert admitted[3][0] == 4 and all(n >= 3 for n in admitted[3][1:-1])  # the last may take what is left
    assert min(admitted[1][1:]) < 3  # the test's workload does refill single rows when allowed to


def test_alpha_one_is_greedy_and_stop_tokens(setup):
    tok, expert, amateur, prompts = setup
    greedy = run(expert, None, len(tok), prompts[:3], alpha=0.0, beta=0.0, temperature=0.0, max_new_tokens=8)
    # alpha = 1 leaves only the expert's argmax, whatever beta and the sampling noise say
    assert run(expert, amateur, len(tok), prompts[:3], alpha=1.0, beta=3.0, max_new_tokens=8) == greedy
    first = greedy["0"][0][2]  # make the third token a stop token: row 0 ends there
    dec = ContrastiveDecoder(expert, None, len(tok), [first],
                             DecodingConfig(alpha=0.0, beta=0.0, temperature=0.0, max_new_tokens=8))
    (res,) = dec.generate([Request("0", prompts[0], 0)])
    assert res.finish_reason == "stop" and res.tokens == greedy["0"][0][:greedy["0"][0].index(first) + 1]
    assert math.isclose(dec.tokens_generated, len(res.tokens))


@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_finish_reason_matches_the_last_token(setup, engine):
    # Finished rows keep stepping (filler tokens) until the next host check. With half the
    # vocabulary as stop ids and check_every >> max_new_tokens, filler steps of a row that
    # ended by length draw a stop id almost surely; that must not relabel it "stop".
    tok, expert, _, prompts = setup
    stops = set(range(0, len(tok), 2))
    new = 2
    dec = ContrastiveDecoder(expert, None, len(tok), stops, DecodingConfig(
        alpha=0.0, beta=0.0, temperature=1.0, max_new_tokens=new, batch_size=4, check_every=16, engine=engine))
    results = list(dec.generate([Request(str(i), p, seed=i) for i, p in enumerate(prompts * 3)]))
    assert len(results) == 18
    for r in results:
        assert 1 <= len(r.tokens) <= new and all(t not in stops for t in r.tokens[:-1]), r
        assert (r.finish_reason == "stop") == (r.tokens[-1] in stops), r
        assert (r.finish_reason == "length") == (len(r.tokens) == new and r.tokens[-1] not in stops), r
    assert {r.finish_reason for r in results} == {"stop", "length"}  # both kinds occur


def test_qwen2_bias_fast_matches_eager():
    tok = make_tokenizer()
    e, a = make_model(arch="qwen2", seed=3), make_model(arch="qwen2", seed=4)
    with torch.no_grad():  # random q/k/v biases, so the fast path must really apply them
        for m in (e, a):
            for layer in m.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    prompts = [tok(t).input_ids for t in TEXTS[:3]]
    kw = dict(temperature=0.0, max_new_tokens=8, batch_size=2)
    fast_out, fast_scores = run_with_scores(e, a, len(tok), prompts, engine="fast", **kw)
    eager_out, eager_scores = run_with_scores(e, a, len(tok), prompts, engine="eager", **kw)
    assert fast_out == eager_out
    assert_same_scores(fast_scores, eager_scores)


def test_yarn_rope_attention_scaling_fast_matches_eager():
    # YaRN scales cos and sin by attention_scaling != 1; the fast path must apply it to both.
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tokenizer()
    models = []
    for seed in (5, 6):
        cfg = LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
                          bos_token_id=1, eos_token_id=2, pad_token_id=3)
        torch.manual_seed(seed)
        models.append(AutoModelForCausalLM.from_config(cfg).eval())
    assert models[0].model.rotary_emb.attention_scaling > 1.1
    prompts = [tok(t).input_ids for t in TEXTS[:3]]
    kw = dict(temperature=0.0, max_new_tokens=8, batch_size=2)
    fast_out, fast_scores = run_with_scores(*models, len(tok), prompts, engine="fast", **kw)
    eager_out, eager_scores = run_with_scores(*models, len(tok), prompts, engine="eager", **kw)
    assert fast_out == eager_out
    assert_same_scores(fast_scores, eager_scores)


@pytest.mark.gpu
@pytest.mark.parametrize("n_stops, attention, compiled, concurrent",
                         [(1, "sdpa", False, False), (40, "sdpa", False, False), (1, "flex", False, False),
                          (1, "sdpa", True, False), (1, "auto", None, False),
                          (1, "auto", None, None)])  # auto / None: the defaults (on a GPU: flex, compiled, two streams)
def test_cuda_graph_step_matches_plain_kernels_on_gpu(setup, caplog, n_stops, attention, compiled, concurrent):
    tok, _, _, prompts = setup
    # float32: no bf16 rounding noise. head_dim 16: FlexAttention's GPU kernels need >= 16 (the
    # shared tiny models have 8, and a failed compile would only fall back to eager flex).
    e, a = (make_model(seed=s, hidden=64).cuda() for s in (0, 1))
    # 40 stop ids: torch.isin switches to a sorting path there that cannot be captured. flex builds
    # its block mask inside the graph; compiled layers run Inductor kernels inside it.
    kw = dict(temperature=0.0, max_new_tokens=12, batch_size=4, engine="fast", check_every=4,
              stop_ids=list(range(2, 2 + n_stops)), decode_attention=attention, compile_layers=compiled,
              concurrent_models=concurrent)
    with caplog.at_level("WARNING"):
        graphs = run(e, a, len(tok), prompts, cuda_graphs=True, **kw)
    assert "capture failed" not in caplog.text and "torch.compile of" not in caplog.text
    assert graphs == run(e, a, len(tok), prompts, cuda_graphs=False, **kw)
    assert graphs == run(e, a, len(tok), prompts, **(kw | {"engine": "eager"}))


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])  # qwen2: the q/k/v bias path
def test_compiled_layer_functions_give_the_plain_fast_engine_scores(setup, arch):
    tok, *_ = setup
    models = [make_model(arch=arch, seed=s) for s in (0, 1)]
    prompts = [tok(t).input_ids for t in TEXTS[:3]]
    kw = dict(temperature=0.0, max_new_tokens=6, batch_size=2, engine="fast")
    plain, plain_scores = run_with_scores(*models, len(tok), prompts, **kw)
    compiled, compiled_scores = run_with_scores(*models, len(tok), prompts, compile_layers=True, **kw)
    assert compiled == plain
    assert_same_scores(compiled_scores, plain_scores)
    from distill.decoding import fast as fast_decoder, layers as decode_layers  # and the flag did reach the layers (else the above proves nothing)

    pair = fast_decoder.FastPair(models, 2, 32, compile_layers=True)
    assert pair.lms[0].decode_attention_in is not decode_layers.decode_attention_in
    assert not any(f.failed for f in decode_layers.compiled_layer_functions())  # no silent fallback
    assert fast_decoder.FastPair(models, 2, 32).lms[0].decode_attention_in is decode_layers.decode_attention_in


def test_flex_decode_attention_gives_the_sdpa_scores(setup):
    # Rows of very different lengths (prompts of 1 to 11 tokens, 150 new ones, refills) cross
    # the 128-column block edge at different steps: a block count one short, or a mask_mod
    # that shows a column too many, changes the scores.
    tok, expert, amateur, prompts = setup
    kw = dict(temperature=0.0, max_new_tokens=150, batch_size=3, check_every=5, engine="fast")
    ref, ref_scores = run_with_scores(expert, amateur, len(tok), prompts, **kw)
    got, scores = run_with_scores(expert, amateur, len(tok), prompts, decode_attention="flex", **kw)
    assert got == ref
    assert_same_scores(scores, ref_scores)
    assert max(len(ref[str(i)][0]) + len(p) for i, p in enumerate(prompts)) > 128


def test_a_failed_compile_falls_back_to_the_eager_function(caplog):
    from distill.decoding.compiled import CompiledOrEager

    def double(x):
        torch._dynamo.graph_break()  # fullgraph=True cannot compile this
        return x * 2

    fn = CompiledOrEager(double, "a test function")
    with caplog.at_level("WARNING", logger="distill.decoding.compiled"):
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
    assert fn.failed and "torch.compile of a test function failed" in caplog.text
    from distill.decoding.compiled import fell_back_to_eager

    assert "a test function" in fell_back_to_eager()  # what the benchmarks report against a line
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))  # and stays eager, without raising


def test_flex_decode_attention_honours_a_sliding_window(setup):
    tok, *_ = setup
    models = []
    for seed in (0, 1):
        m = make_model(seed=seed)
        m.config.sliding_window = 20  # shorter than the rows, so the window masks columns
        models.append(m)
    prompts = [tok(t).input_ids for t in TEXTS[:3]]
    kw = dict(temperature=0.0, max_new_tokens=150, batch_size=2, engine="fast")  # rows past one 128-column block
    ref, ref_scores = run_with_scores(*models, len(tok), prompts, **(kw | {"engine": "eager"}))
    got, scores = run_with_scores(*models, len(tok), prompts, decode_attention="flex", **kw)
    assert got == ref
    assert_same_scores(scores, ref_scores)


def test_fast_attention_width_buckets(setup, monkeypatch):
    import distill.decoding.fast as fast

    tok, expert, amateur, prompts = setup
    kw = dict(temperature=0.0, max_new_tokens=20, batch_size=2, check_every=3)
    ref, ref_scores = run_with_scores(expert, amateur, len(tok), prompts, engine="eager", **kw)
    # widths 8, 16, 24, ... as rows grow and are refilled; prompts of 1 to 11 tokens plus 20 new
    # ones cross several bucket edges, where a width one column short hides the newest token
    monkeypatch.setattr(fast, "ATTENTION_BUCKET", 8)
    got, scores = run_with_scores(expert, amateur, len(tok), prompts, engine="fast", **kw)
    assert got == ref
    assert_same_scores(scores, ref_scores)


def test_fast_prefill_in_chunks_equals_one_pass(setup):
    from distill.decoding.fast import FastPair

    tok, expert, amateur, prompts = setup
    whole, chunked = FastPair([expert, amateur], 6, 64), FastPair([expert, amateur], 6, 64)
    a = whole.prefill(list(range(6)), prompts)
    b = chunked.prefill(list(range(6)), prompts, max_tokens=20)  # one or two rows per chunk
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
    assert torch.equal(whole.lengths, chunked.lengths)
    for row, p in enumerate(prompts):  # the real columns; padding columns hold junk by design
        for x, y in zip(whole.lms[1].v_cache, chunked.lms[1].v_cache):
            assert torch.allclose(x[row, :, :len(p)], y[row, :, :len(p)], atol=1e-5)


def test_model_still_saves_and_reloads_after_the_fast_engine_fused_its_weights(tmp_path):
    # FastLM re-points q/k/v and gate/up at views of one fused tensor; save_pretrained must not
    # mistake the shared storage for tied weights and drop any of them.
    from transformers import AutoModelForCausalLM

    from distill.decoding.fast import FastLM

    model = make_model(arch="mistral", vocab_size=120)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FastLM(model)
    model.save_pretrained(tmp_path)
    after = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, atol=0, rtol=0, msg=name)


def test_sliding_window_with_left_padding_and_refills_matches_a_no_cache_reference(setup):
    # Mistral's sliding window, shorter than the sequences here: padded, refilled rows must still
    # see exactly the last `window` real tokens, as an unpadded model without a cache does.
    tok, _, _, prompts = setup
    model = make_model(seed=4)
    model.config.sliding_window = 5
    vocab, new = len(tok), 12
    expected = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            seq, out = list(p), []
            while len(out) < new and (not out or out[-1] != 2):
                out.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1, :vocab].argmax()))
                seq.append(out[-1])
            expected[str(i)] = out
    for engine, batch in [("eager", 4), ("fast", 4), ("fast", 1)]:
        got = run(model, None, vocab, prompts, alpha=0.0, beta=0.0, temperature=0.0, max_new_tokens=new,
                  batch_size=batch, engine=engine, check_every=3)
        assert {k: tokens for k, (tokens, _) in got.items()} == expected, (engine, batch)


def test_defaults_on_cpu_are_sdpa_and_plain_layers(setup):
    # "auto" picks FlexAttention, compiled layers and a second stream on a GPU only: the tiny models on CPU run faster without
    from distill.decoding import layers as decode_layers
    assert DecodingConfig().levers_on(gpu=False) == ("sdpa", False, False)
    assert DecodingConfig().levers_on(gpu=True) == ("flex", True, True)
    tok, expert, amateur, _ = setup
    dec = ContrastiveDecoder(expert, amateur, len(tok), [2], DecodingConfig(engine="fast"), pad_token_id=3)
    pair, _ = dec._backend(2, 40)
    assert pair.flex is None and pair.lms[0].decode_attention_in is decode_layers.decode_attention_in
    assert pair.side_streams == []  # the second CUDA stream is GPU-only: on CPU even asking for it changes nothing
    dec = ContrastiveDecoder(expert, amateur, len(tok), [2], DecodingConfig(engine="fast", concurrent_models=True),
                             pad_token_id=3)
    assert dec._backend(2, 40)[0].side_streams == []


@pytest.mark.parametrize("fallback", [True, False])
def test_flex_that_does_not_compile_falls_back_to_sdpa_only_when_chosen_by_auto(setup, monkeypatch, caplog, fallback):
    from torch.nn.attention.flex_attention import flex_attention

    from distill.decoding import fast as fast_decoder

    from distill.decoding import flex as flex_decode
    from distill.decoding.compiled import CompiledOrEager

    def flex_with_graph_break(*args, **kwargs):
        torch._dynamo.graph_break()  # fullgraph=True cannot compile this: as Triton without a GPU kernel for it
        return flex_attention(*args, **kwargs)

    broken = CompiledOrEager(flex_with_graph_break, "a flex that does not compile")
    monkeypatch.setattr(flex_decode, "_flex_attention", lambda: broken)
    tok, expert, amateur, prompts = setup
    pair = fast_decoder.FastPair([expert, amateur], 2, 40, decode_attention="flex", flex_fallback=fallback)
    with caplog.at_level("WARNING"):
        pair.prepare()
    sdpa = fast_decoder.FastPair([expert, amateur], 2, 40)
    for p in (pair, sdpa):
        p.prefill([0, 1], prompts[:2])
    tokens, active = torch.tensor([5, 6]), torch.tensor([True, True])
    for got, ref in zip(pair.decode(tokens, active), sdpa.decode(tokens, active)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert broken.failed
    if fallback:  # found out in prepare(), before any row was live
        assert pair.flex is None and pair.bucket == fast_decoder.ATTENTION_BUCKET
        assert "using SDPA decode attention instead" in caplog.text
    else:  # asked for flex by name: it stays (eager flex, correct and slow), as the compile warning says
        assert pair.flex is not None and "using SDPA" not in caplog.text


@pytest.mark.parametrize("window", [None, 20, 300])
def test_flex_decode_block_mask_lists_exactly_the_visible_blocks(window):
    # Row b sees columns max(0, length - window + 1) .. length: the mask must list every block
    # that holds one of them (or the scores change) and no other (or the row reads needless cache).
    from distill.decoding.flex import BLOCK, FlexDecodeAttention

    lengths = torch.tensor([0, 5, 127, 128, 147, 148, 300, 511])
    flex = FlexDecodeAttention(lengths, 512, window)
    counts = flex.block_mask.kv_num_blocks[:, 0, 0].tolist()
    listed = flex.block_mask.kv_indices[:, 0, 0, :].tolist()
    for b, length in enumerate(lengths.tolist()):
        first = max(0, length - window + 1) if window else 0
        want = sorted({col // BLOCK for col in range(first, length + 1)})
        assert listed[b][:counts[b]] == want, (length, window)
