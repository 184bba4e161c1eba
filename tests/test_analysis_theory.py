"""Theory experiments: the JVP term against finite differences, the per-position metrics, T1 end
to end on a tiny pair, and T2's per-layer alignment arithmetic."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))

from theory_common import spearman  # noqa: E402
from theory_t1 import chat_vector, logits_and_jvp, position_metrics  # noqa: E402
from theory_t2 import delta_alignment, group_of, same_prompts  # noqa: E402
from tiny import make_model, make_tokenizer  # noqa: E402

SMALL = dict(vocab_size=64, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32)


def _shifted(base, delta, scale):
    m = make_model(**SMALL).double()
    with torch.no_grad():
        for (n, p), (_, q) in zip(m.named_parameters(), base.named_parameters()):
            p.copy_(q + scale * delta[n])
    return m


def test_jvp_agrees_with_finite_differences():
    base = make_model(**SMALL).double()
    post = make_model(**SMALL, seed=1).double()
    delta = {k: 0.1 * v for k, v in chat_vector(base, post).items()}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        logits, jd = logits_and_jvp(base, delta, ids, mask)
        eps = 1e-3  # RoPE tables are float32 in HF, so smaller steps drown in rounding
        fd = (_shifted(base, delta, eps)(input_ids=ids, attention_mask=mask).logits
              - _shifted(base, delta, -eps)(input_ids=ids, attention_mask=mask).logits) / (2 * eps)
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits, plain, atol=1e-6)
    err = (jd - fd)[mask.bool()].abs().max()
    assert err < 1e-3 * jd.abs().max(), f"JVP and finite difference differ by {err}"


def test_jvp_restores_attention_implementation():
    base = make_model(**SMALL)
    before = base.config._attn_implementation
    logits_and_jvp(base, {k: torch.zeros_like(v) for k, v in base.named_parameters()}, torch.tensor([[1, 2, 3]]))
    assert base.config._attn_implementation == before


def test_position_metrics_exact_and_unrelated():
    g = torch.Generator().manual_seed(0)
    lb, j = torch.randn(5, 50, generator=g), torch.randn(5, 50, generator=g)
    m = position_metrics(lb, lb + j, j, alpha=0.01)  # post = base + J·Δ exactly
    assert torch.allclose(m["cos"], torch.ones(5, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(m["spearman"], torch.ones(5, dtype=torch.float64), atol=1e-9)
    assert m["kl_codit_lin"].abs().max() < 1e-9 and m["argmax_agree"].min() == 1
    other = torch.randn(5, 50, generator=g)
    m2 = position_metrics(lb, lb + j, other, alpha=0.01)
    assert m2["cos"].abs().mean() < 0.5 and m2["kl_codit_lin"].mean() > 0.1


def test_t1_run_on_a_small_chat_vector(tmp_path):
    """A post model that is base + a small Δ: the first-order picture must hold (cosine near 1)."""
    import theory_t1

    tok = make_tokenizer(vocab_size=120)
    zoo = tmp_path / "zoo"
    base = make_model(zoo / "source-base", arch="mistral", vocab_size=len(tok), hidden=16, layers=2, heads=2,
                      kv_heads=1, intermediate=32, tokenizer=tok)
    other = make_model(arch="mistral", vocab_size=len(tok), hidden=16, layers=2, heads=2, kv_heads=1,
                       intermediate=32, seed=3)
    with torch.no_grad():
        for p, q in zip(base.parameters(), other.parameters()):
            p.add_(0.02 * (q - p))
    base.save_pretrained(zoo / "source-post")
    tok.save_pretrained(zoo / "source-post")
    (zoo / "prompts").mkdir()
    (zoo / "prompts" / "eval.jsonl").write_text("".join(json.dumps({"instruction": t}) + "\n" for t in
                                                         ["answer in json", "the quick brown fox", "write lowercase"]))
    res = theory_t1.run(zoo, tmp_path / "out", n_prompts=3, max_new_tokens=6, batch_size=2)
    table = {r["key"]: r for r in res["table"]}
    assert table["cos"]["mean"] > 0.95 and table["kl_codit_lin"]["mean"] < 0.05
    for ext in ("md", "csv", "json", "png"):
        assert (tmp_path / "out" / f"t1_linearisation.{ext}").exists()


def test_delta_alignment_per_layer(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.w", "model.layers.1.mlp.w", "model.embed_tokens.weight"]
    base = {n: torch.randn(4, 3, generator=g) for n in names}
    delta = {n: torch.randn(4, 3, generator=g) for n in names}
    dirs = {}
    for name, t in (("base", base), ("post", {n: base[n] + delta[n] for n in names}),
                    ("tuned", {"model.layers.0.mlp.w": base[names[0]] + 0.5 * delta[names[0]],
                               "model.layers.1.mlp.w": base[names[1]] - 2 * delta[names[1]],
                               "model.embed_tokens.weight": base[names[2]]})):
        d = tmp_path / name
        d.mkdir()
        save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"))
        dirs[name] = d
    a = delta_alignment(dirs["base"], dirs["post"], dirs["tuned"])
    assert a["layer 00"]["cos"] == pytest.approx(1.0) and a["layer 00"]["norm_ratio"] == pytest.approx(0.5)
    assert a["layer 01"]["cos"] == pytest.approx(-1.0) and a["layer 01"]["norm_ratio"] == pytest.approx(2.0)
    assert a["embeddings"]["norm_ratio"] == 0.0
    assert group_of("model.norm.weight") == "other (final norm)"


def test_spearman_handles_ties():
    assert spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_t2_trains_every_dataset_on_the_prompts_all_of_them_kept(tmp_path):
    sets = {}
    for name, repetitive in (("codit", {"b"}), ("direct", {"c"}), ("direct-masked", set())):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "instruction": f"q {i}", "response": f"{name} answer {i}",
                                            "repetitive": i in repetitive}) + "\n" for i in "abcd"))
        sets[name] = path
    paths, stats = same_prompts(sets, tmp_path / "out", limit=None)
    assert list(paths) == ["codit", "direct", "direct-masked"] and stats["prompts"] == 2
    for name, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["id"] for r in rows] == ["a", "d"] and rows[0]["response"] == f"{name} answer a"
