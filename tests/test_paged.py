"""The fast engine's paged KV cache (distill.decoding.paged): the same tokens and scores as the static
cache and the eager reference, with rows of very different lengths, refills, block exhaustion and
preemption forced by a small block budget; and every block free at the end."""

import pytest
import torch

from distill import DistillError
from distill.decoding.engine import ContrastiveDecoder, DecodingConfig, Request
from distill.decoding.paged import BlockTable
from tiny import make_model, make_tokenizer, score_recorder

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the quick brown fox", "answer", "write the response in lowercase letters and end with the word",
         "the capital", "please repeat the request", "the lazy dog"]
STOPS = [2, 5, 7, 11, 13, 17]  # several stop ids: sampled rows end at very different lengths


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    ids = [tok(t).input_ids for t in TEXTS]
    return ids + [p[::-1] for p in ids]  # 12 prompts of 1 to 11 tokens


@pytest.fixture(scope="module")
def pairs():
    return {arch: (make_model(arch=arch, seed=0), make_model(arch=arch, seed=1)) for arch in ("llama", "mistral", "qwen2")}


def run(models, vocab, prompts, stops=(2,), hook=True, **kw):
    """Tokens, finish reasons and every live row's scores by (key, step), and the decoder.

    hook=False: no score hook, so that on a GPU the token choice runs inside the CUDA graph too."""
    seen, record = score_recorder()

    dec = ContrastiveDecoder(*models, vocab, stops, DecodingConfig(**kw), pad_token_id=3,
                             score_hook=record if hook else None)
    out = {r.key: (r.tokens, r.finish_reason, r.extra.get("token_logprobs")) for r in dec.generate(
        [Request(str(i), p, seed=100 + i) for i, p in enumerate(prompts)])}
    return out, seen, dec


def assert_same(got, ref, atol=1e-4):
    assert {k: v[:2] for k, v in got[0].items()} == {k: v[:2] for k, v in ref[0].items()}  # tokens, finish reason
    assert got[1].keys() == ref[1].keys()
    for key, row in ref[1].items():
        assert torch.equal(torch.isinf(row), torch.isinf(got[1][key])), key
        fin = torch.isfinite(row)
        assert torch.allclose(got[1][key][fin], row[fin], atol=atol), (key, (got[1][key][fin] - row[fin]).abs().max())


def assert_no_leaks(dec):
    blocks = dec.backend.blocks
    assert blocks.used_blocks == 0 and blocks.free_blocks == blocks.num_blocks - 1
    assert not blocks.live()
    if not blocks.fixed:  # (a fixed pool's table never changes)
        assert sorted(blocks.free) == list(range(1, blocks.num_blocks))
        assert bool((blocks.table == 0).all()) and bool((blocks.owner == -1).all())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_paged_equals_static_equals_eager_under_a_small_block_budget(pairs, tok, prompts, arch, temperature):
    models = pairs[arch]
    kw = dict(temperature=temperature, max_new_tokens=40, batch_size=4, check_every=3)
    stops = STOPS if temperature else (2,)
    eager = run(models, len(tok), prompts, stops, engine="eager", **kw)
    static = run(models, len(tok), prompts, stops, engine="fast", kv_cache="static", **kw)
    roomy = run(models, len(tok), prompts, stops, engine="fast", kv_block_size=8, **kw)
    # 8 usable blocks of 8 tokens: one row at full length (prompt + 40 = 6-7 blocks), so rows wait
    # for blocks, and growing rows preempt the longest
    tight = run(models, len(tok), prompts, stops, engine="fast", kv_block_size=8, kv_blocks=9, **kw)
    for got in (static, roomy, tight):
        assert_same(got, eager)
    lengths = sorted(len(t) for t, _, _ in eager[0].values())
    if temperature:
        assert lengths[0] < 15 and lengths[-1] == 40  # very different lengths
    assert roomy[2].preemptions == 0 and tight[2].preemptions > 0
    assert roomy[2].deferred == 0 and tight[2].deferred > 0  # admission waited for blocks, too
    assert roomy[2].peak_rows == 4
    # roomy: 4 slots x 8 blocks (51 columns, aligned to 64) + scratch, laid out as the static cache
    assert tight[2].kv_blocks == 9 and roomy[2].kv_blocks == 4 * 8 + 1
    assert roomy[2].backend.blocks.fixed and not tight[2].backend.blocks.fixed
    assert_no_leaks(roomy[2])
    assert_no_leaks(tight[2])


def test_preempted_rows_keep_their_token_logprobs(pairs, tok, prompts):
    kw = dict(temperature=1.0, max_new_tokens=40, batch_size=4, check_every=3, engine="fast", kv_block_size=8,
              token_logprobs=True)
    ref = run(pairs["mistral"], len(tok), prompts, STOPS, **kw)
    tight = run(pairs["mistral"], len(tok), prompts, STOPS, kv_blocks=9, **kw)
    assert tight[2].preemptions > 0
    assert ref[0].keys() == tight[0].keys()
    for k, (tokens, reason, lps) in ref[0].items():
        assert tight[0][k][:2] == (tokens, reason) and len(lps) == len(tokens)
        assert torch.allclose(torch.tensor(tight[0][k][2]), torch.tensor(lps), atol=1e-5)


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention uncompiled: its eager reference evaluates the mask over every column of the pool,
    so it also proves that a row never sees another row's blocks."""
    from torch.nn.attention.flex_attention import flex_attention

    from distill.decoding import flex as flex_decode
    monkeypatch.setattr(flex_decode, "_flex_attention", lambda: flex_attention)


@pytest.mark.parametrize("window", [None, 6])
def test_paged_flex_attention_equals_eager_with_preemption(tok, prompts, eager_flex, window):
    models = []
    for seed in (0, 1):
        m = make_model(seed=seed)
        m.config.sliding_window = window  # shorter than the rows: the window slides over block edges
        models.append(m)
    kw = dict(temperature=1.0, max_new_tokens=30, batch_size=3, check_every=4)
    eager = run(models, len(tok), prompts, STOPS, engine="eager", **kw)
    flex = run(models, len(tok), prompts, STOPS, engine="fast", decode_attention="flex", kv_block_size=8,
               kv_blocks=8, **kw)
    assert_same(flex, eager)
    assert flex[2].preemptions > 0
    assert_no_leaks(flex[2])


def test_block_table_admits_grows_preempts_the_longest_and_frees():
    t = BlockTable(rows=3, num_blocks=7, block_size=4, columns_per_row=20, device="cpu")  # 6 usable, 5 per row
    assert t.admit(0, 5, lookahead=2) and t.owned[0] == [1, 2]  # 5 columns: 2 blocks (lowest ids first)
    assert t.admit(1, 3, lookahead=2) and t.free_blocks == 3
    assert not t.admit(2, 14, lookahead=2)  # 4 blocks: not free; nothing taken
    assert t.free_blocks == 3 and t.owned[2] == []
    assert t.table[0, :2].tolist() == [1, 2] and t.owner[1].item() == 0 and t.logical[2].item() == 1
    # row 0 at 8 + 4 columns wants 3 blocks (has 2), row 1 at 7 + 4 wants 3 (has 1): the 3 free ones
    assert t.reserve(4, {0: 8, 1: 7}) == [] and t.free_blocks == 0
    # at 16 and 15 (+ 4) both want 5 blocks: 4 more, none free, so the longer one (row 0) goes
    assert t.reserve(4, {0: 16, 1: 15}) == [0]
    assert t.owned[0] == [] and len(t.owned[1]) == 5 and t.free_blocks == 1
    assert (t.table[0] == 0).all() and (t.owner == -1).sum().item() == 2  # scratch + the free one
    t.release(1)
    assert t.free_blocks == 6 and t.used_blocks == 0
    with pytest.raises(DistillError, match="cannot hold one row of 20 tokens"):
        BlockTable(rows=2, num_blocks=5, block_size=4, columns_per_row=20, device="cpu")


def test_batch_size_auto_and_the_cache_settings(pairs, tok, prompts, monkeypatch):
    models = pairs["mistral"]
    dec = ContrastiveDecoder(*models, len(tok), [2], DecodingConfig(max_new_tokens=4, engine="fast"))
    list(dec.generate([Request(str(i), p, i) for i, p in enumerate(prompts * 3)]))
    assert dec.batch == 32 and dec.config.batch_size == "auto"  # auto on CPU: 32 slots, room for all
    for bad, msg in [(dict(batch_size="many"), "batch_size must be a number of rows or auto"),
                     (dict(kv_cache="ring"), "kv_cache must be paged or static"),
                     (dict(kv_blocks=1), "kv_blocks must be >= 2"), (dict(kv_block_size=0), "kv_block_size")]:
        with pytest.raises(DistillError, match=msg):
            DecodingConfig(**bad).validate()
    # on a GPU, auto takes AUTO_ROWS slots and the blocks free memory holds (here: stubbed)
    from distill.decoding import engine, paged

    monkeypatch.setattr(paged, "blocks_that_fit", lambda models, block, rows: 50)
    dec = ContrastiveDecoder(*models, len(tok), [2], DecodingConfig(max_new_tokens=100, kv_block_size=16))
    levers = dict(decode_attention="sdpa")
    _, rows = dec._paged(1000, 110, gpu=True, levers=levers)
    assert rows == engine.AUTO_ROWS and dec.kv_blocks == 50
    _, rows = dec._paged(5, 110, gpu=True, levers=levers)  # 5 slots at full length (128 columns) need fewer
    assert rows == 5 and dec.kv_blocks == 5 * 8 + 1
    monkeypatch.setattr(paged, "blocks_that_fit", lambda models, block, rows: 5)
    with pytest.raises(DistillError, match="no room in GPU memory for the KV cache of one row of 110 tokens"):
        dec._paged(10, 110, gpu=True, levers=levers)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_paged_cuda_graphs_equal_plain_kernels_and_eager_on_gpu(tok, prompts, caplog, attention):
    # float32, head_dim 16 (FlexAttention's GPU kernels need >= 16); a budget that preempts
    e, a = (make_model(seed=s, hidden=64).cuda() for s in (0, 1))
    kw = dict(temperature=1.0, max_new_tokens=40, batch_size=4, check_every=3, decode_attention=attention,
              kv_block_size=16, kv_blocks=6)
    with caplog.at_level("WARNING"):
        graphs = run((e, a), len(tok), prompts, STOPS, engine="fast", cuda_graphs=True, hook=False, **kw)
    assert "capture failed" not in caplog.text and "torch.compile of" not in caplog.text
    assert graphs[2].preemptions > 0
    assert_no_leaks(graphs[2])
    plain = run((e, a), len(tok), prompts, STOPS, engine="fast", cuda_graphs=False, **kw)
    eager = run((e, a), len(tok), prompts, STOPS, engine="eager", temperature=1.0, max_new_tokens=40, batch_size=4,
                check_every=3)
    tokens = {k: v[:2] for k, v in graphs[0].items()}
    assert tokens == {k: v[:2] for k, v in plain[0].items()} == {k: v[:2] for k, v in eager[0].items()}
    assert_same(plain, eager)


def test_a_request_cap_ends_its_row_early_and_changes_nothing_before(pairs, tok, prompts):
    models = pairs["mistral"]
    cfg = DecodingConfig(temperature=1.0, max_new_tokens=30, batch_size=3, check_every=4, engine="fast")
    dec = ContrastiveDecoder(*models, len(tok), [2], cfg)
    full = {r.key: r for r in dec.generate([Request(str(i), p, 100 + i) for i, p in enumerate(prompts)])}
    capped = {r.key: r for r in dec.generate([Request(str(i), p, 100 + i, max_new_tokens=5 + i)
                                              for i, p in enumerate(prompts)])}
    for i in range(len(prompts)):
        k, cap = str(i), 5 + i
        assert capped[k].tokens == full[k].tokens[:cap]
        assert capped[k].finish_reason == ("length" if len(full[k].tokens) > cap else full[k].finish_reason)
    assert dec.steps > 0 and dec.row_steps > 0 and dec.kv_token_steps > dec.row_steps  # rows hold > 1 token


def test_the_synthesize_command_line_takes_batch_size_auto_or_a_number():
    from distill.cli import build_parser
    from distill.config import from_args
    from distill.synthesize.config import SynthesizeConfig

    base = ["synthesize", "--expert", "E", "--prompts", "P", "--out", "O", "--method", "direct"]
    for given, want in ((["--batch-size", "auto"], "auto"), (["--batch-size", "64"], 64), ([], "auto")):
        argv = base + given + ["--kv-blocks", "9"]
        cfg = from_args(SynthesizeConfig, build_parser(argv).parse_args(argv))
        assert cfg.batch_size == want and cfg.kv_blocks == 9 and cfg.kv_cache == "paged"
    with pytest.raises(DistillError, match="batch_size must be a number of rows or auto, got 'lots'"):
        from_args(SynthesizeConfig, build_parser(base).parse_args(base + ["--batch-size", "lots"]))
