import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from distill import DistillError
from distill.chat_vector import core as cv
from distill.io.checkpoints import Checkpoint
from distill.chat_vector.stats import stats
from distill.cli import main
from tiny import make_model, make_tokenizer


def _finetune(model, path, seed, scale=0.01, tok=None, resize=None):
    """A 'post-trained' model: the same weights plus a small update, as training produces."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if resize:
            model.resize_token_embeddings(resize)
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return model


def _state(path):
    return {n: t for n, t in Checkpoint.open(path, require_config=False).iter_tensors()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    tok = make_tokenizer()
    make_model(root / "base", tokenizer=tok)
    make_model(root / "base-sharded", max_shard_size="20KB", tokenizer=tok)
    _finetune(make_model(), root / "post", seed=1, tok=tok)
    _finetune(make_model(), root / "cp", seed=2, tok=tok)
    cv.extract(root / "base", root / "post", root / "cv", dtype="float32")
    return root


def test_round_trip_reproduces_post_bit_for_bit_and_loads(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    out = cv.apply(zoo / "base", [(zoo / "cv", 1.0)], tmp_path / "merged")
    got, want = _state(out), _state(zoo / "post")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    meta = json.loads((zoo / "cv" / "chat_vector.json").read_text())
    assert meta["dtype"] == "float32" and meta["architectures"] == ["MistralForCausalLM"]
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    post = AutoModelForCausalLM.from_pretrained(zoo / "post", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, post(ids).logits)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


def test_bfloat16_vector_is_close(zoo, tmp_path):
    vec = cv.extract(zoo / "base", zoo / "post", tmp_path / "cv16", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in _state(vec).values())
    got, want, base = (_state(cv.apply(zoo / "base", [(vec, 1.0)], tmp_path / "m")), _state(zoo / "post"),
                       _state(zoo / "base"))
    for name in want:  # bfloat16 keeps 8 significant bits of Δ: the error is relative to Δ, not θ
        err = (got[name] - want[name]).abs()
        assert (err <= (want[name] - base[name]).abs() * 2**-8 + 1e-7).all(), name
        assert err.max() > 0  # really rounded


def _bfloat16_copies(zoo, dest, names=("base", "post", "cp")):
    for name in names:
        model = make_model(None)
        model.load_state_dict(_state(zoo / name))
        model.to(torch.bfloat16).save_pretrained(dest / name)


def test_bfloat16_models_match_the_float32_route_exactly(zoo, tmp_path):
    # bf16 in and out takes torch's direct bf16 kernels; they must round exactly like float32 + one cast
    _bfloat16_copies(zoo, tmp_path)
    vec = cv.extract(tmp_path / "base", tmp_path / "post", tmp_path / "v")
    cv.apply(tmp_path / "cp", [(vec, 0.5)], tmp_path / "m")
    base, post, cp, delta, got = (_state(tmp_path / n) for n in ("base", "post", "cp", "v", "m"))
    for n in base:
        assert delta[n].dtype == torch.bfloat16 and got[n].dtype == torch.bfloat16
        assert torch.equal(delta[n], (post[n].float() - base[n].float()).bfloat16()), n
        assert torch.equal(got[n], (cp[n].float() + 0.5 * delta[n].float()).bfloat16()), n


def test_several_bfloat16_vectors_round_once(zoo, tmp_path):
    # Two bf16 addends accumulate in float32 and round once; rounding after each would drift.
    # Power-of-two scales keep the float32 reference exact.
    _bfloat16_copies(zoo, tmp_path)
    v1 = cv.extract(tmp_path / "base", tmp_path / "post", tmp_path / "v1")
    v2 = cv.extract(tmp_path / "base", tmp_path / "cp", tmp_path / "v2")
    out = cv.apply(tmp_path / "cp", [(v1, 0.5), (v2, -0.25)], tmp_path / "m")
    cp, d1, d2, got = _state(tmp_path / "cp"), _state(v1), _state(v2), _state(out)
    for n in cp:
        assert d1[n].dtype == d2[n].dtype == got[n].dtype == torch.bfloat16, n
        want = (cp[n].float() + 0.5 * d1[n].float() - 0.25 * d2[n].float()).bfloat16()
        assert torch.equal(got[n], want), n


def test_mixed_dtypes_store_the_vector_in_float32(zoo, tmp_path):
    # base and post of different dtypes (dtype=None): neither one's dtype holds Δ exactly, float32 does
    _bfloat16_copies(zoo, tmp_path, names=("base", "post"))
    for i, (base, post) in enumerate(((zoo / "base", tmp_path / "post"), (tmp_path / "base", zoo / "post"))):
        vec = cv.extract(base, post, tmp_path / f"v{i}")
        assert json.loads((vec / "chat_vector.json").read_text())["dtype"] == "float32"
        b, p, delta = _state(base), _state(post), _state(vec)
        assert b[next(iter(b))].dtype != p[next(iter(p))].dtype
        for n in b:
            assert delta[n].dtype == torch.float32 and torch.equal(delta[n], p[n].float() - b[n].float()), n


def _with_int_buffer(src, dest, values):
    """`src`'s checkpoint plus an integer buffer (as BERT-style position_ids are saved)."""
    from safetensors.torch import save_file

    dest.mkdir()
    shutil.copy(src / "config.json", dest / "config.json")
    save_file({**_state(src), "model.position_ids": values}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_integer_tensors_are_not_weights(zoo, tmp_path):
    ids = torch.arange(16)
    base = _with_int_buffer(zoo / "base", tmp_path / "base", ids)
    post = _with_int_buffer(zoo / "post", tmp_path / "post", ids + 1)
    target = _with_int_buffer(zoo / "cp", tmp_path / "t", ids * 2)
    vec = cv.extract(base, post, tmp_path / "v")
    assert "model.position_ids" not in _state(vec)  # nothing to subtract
    # the target's buffer needs no Δ: copied as it is, every weight moved
    got, want = _state(cv.apply(target, [(vec, 1.0)], tmp_path / "m")), _state(target)
    assert got.keys() == want.keys() and torch.equal(got["model.position_ids"], ids * 2)
    assert got["model.position_ids"].dtype == torch.int64
    delta = _state(vec)
    for n in delta:
        assert torch.equal(got[n], want[n] + delta[n]), n


def test_sharded_and_unsharded_inputs_give_identical_vectors(zoo, tmp_path):
    vec = cv.extract(zoo / "base-sharded", zoo / "post", tmp_path / "v", dtype="float32")
    a, b = _state(vec), _state(zoo / "cv")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_several_vectors_with_negative_and_fractional_scales(zoo, tmp_path):
    v2 = cv.extract(zoo / "base", zoo / "cp", tmp_path / "v2", dtype="float32")
    out = cv.apply(zoo / "cp", [(zoo / "cv", 0.5), (v2, -0.25)], tmp_path / "m", max_shard_size="30KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    base, post, cp, got = (_state(zoo / "base"), _state(zoo / "post"), _state(zoo / "cp"), _state(out))
    for n in base:
        want = cp[n] + 0.5 * (post[n] - base[n]) - 0.25 * (cp[n] - base[n])
        torch.testing.assert_close(got[n], want, atol=1e-6, rtol=1e-6)


def test_vocab_rows_differ_shared_rows_only_and_skip_embeddings(tmp_path, caplog, monkeypatch):
    # tiny row chunks, so that chunks straddle the end of the shared vocabulary (row 200)
    monkeypatch.setattr("distill.io.streaming.CHUNK_ELEMENTS", 7 * 32)
    make_model(tmp_path / "base", vocab_size=200)
    _finetune(make_model(vocab_size=200), tmp_path / "post", seed=3, resize=208)  # added chat tokens
    with caplog.at_level(logging.INFO, logger="distill.chat_vector.core"):
        vec = cv.extract(tmp_path / "base", tmp_path / "post", tmp_path / "v")
    assert "shared rows" in caplog.text
    assert _state(vec)["model.embed_tokens.weight"].shape == (200, 32)
    target = make_model(tmp_path / "t", vocab_size=216, seed=5)
    out = _state(cv.apply(tmp_path / "t", [(vec, 1.0)], tmp_path / "m"))
    delta, emb = _state(vec)["model.embed_tokens.weight"], target.model.embed_tokens.weight.detach()
    torch.testing.assert_close(out["model.embed_tokens.weight"][:200], emb[:200] + delta)
    assert torch.equal(out["model.embed_tokens.weight"][200:], emb[200:])
    skipped = _state(cv.apply(tmp_path / "t", [(vec, 1.0)], tmp_path / "s", skip_embeddings=True))
    assert torch.equal(skipped["model.embed_tokens.weight"], emb)
    assert torch.equal(skipped["lm_head.weight"], target.lm_head.weight.detach())
    assert not torch.equal(skipped["model.norm.weight"], target.model.norm.weight.detach())
    # stats over chunks against the 216-row target as "base": shared rows only, sums exact
    s = stats(vec, base=tmp_path / "t", other=vec)
    row = next(r for r in s["per_tensor"] if r["name"] == "model.embed_tokens.weight")
    assert row["norm"] == pytest.approx(delta.norm().item(), rel=1e-5)
    assert row["base_norm"] == pytest.approx(emb[:200].norm().item(), rel=1e-5)
    assert row["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_tied_vector_moves_an_untied_head_too(tmp_path):
    make_model(tmp_path / "base", tie=True)
    _finetune(make_model(tie=True), tmp_path / "post", seed=4)
    vec = cv.extract(tmp_path / "base", tmp_path / "post", tmp_path / "v")
    assert "lm_head.weight" not in _state(vec)
    target = make_model(tmp_path / "t", seed=6)  # untied
    out = _state(cv.apply(tmp_path / "t", [(vec, 1.0)], tmp_path / "m"))
    delta = _state(vec)["model.embed_tokens.weight"]
    torch.testing.assert_close(out["lm_head.weight"], target.lm_head.weight.detach() + delta)


def test_tied_target_takes_the_embedding_delta_only(zoo, tmp_path, caplog):
    # The vector comes from untied models (separate lm_head Δ); a tied target has one matrix for both.
    # Policy: one matrix, one Δ - the embedding's; the head's Δ is left out, with a warning.
    target = make_model(tmp_path / "t", tie=True, seed=6)
    delta = _state(zoo / "cv")
    assert "lm_head.weight" in delta and "lm_head.weight" not in _state(tmp_path / "t")
    with caplog.at_level(logging.WARNING, logger="distill.chat_vector.core"):
        out = _state(cv.apply(tmp_path / "t", [(zoo / "cv", 1.0)], tmp_path / "m"))
    assert "ties lm_head" in caplog.text
    assert "lm_head.weight" not in out  # still tied
    emb = "model.embed_tokens.weight"
    assert torch.equal(out[emb], target.model.embed_tokens.weight.detach() + delta[emb])
    want = {n: p.detach() for n, p in target.named_parameters()}
    assert all(torch.equal(out[n], want[n] + delta[n]) for n in out), "every other tensor moves by its own Δ"


def test_qwen2_round_trip_and_architecture_mismatch(zoo, tmp_path):
    make_model(tmp_path / "qb", arch="qwen2")
    _finetune(make_model(arch="qwen2"), tmp_path / "qp", seed=7)
    vec = cv.extract(tmp_path / "qb", tmp_path / "qp", tmp_path / "qv")
    got, want = _state(cv.apply(tmp_path / "qb", [(vec, 1.0)], tmp_path / "qm")), _state(tmp_path / "qp")
    assert any(n.endswith("q_proj.bias") for n in got)
    assert all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(DistillError, match="architectures differ.*Qwen2ForCausalLM.*MistralForCausalLM"):
        cv.apply(tmp_path / "qb", [(zoo / "cv", 1.0)], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_tensor_name_and_shape_mismatches_are_listed(zoo, tmp_path):
    make_model(tmp_path / "deep", layers=3)
    with pytest.raises(DistillError, match=r"tensor names differ.*only in post .*layers\.2\.mlp"):
        cv.extract(zoo / "base", tmp_path / "deep", tmp_path / "v")
    make_model(tmp_path / "wide", intermediate=48)
    with pytest.raises(DistillError, match=r"mlp\.down_proj\.weight has shape \[32, 64\] in base but \[32, 48\]"):
        cv.extract(zoo / "base", tmp_path / "wide", tmp_path / "v")
    with pytest.raises(DistillError, match="tensor names differ between target and vector"):
        cv.apply(tmp_path / "deep", [(zoo / "cv", 1.0)], tmp_path / "m")
    with pytest.raises(DistillError, match="not a chat vector directory"):
        cv.apply(zoo / "base", [(zoo / "post", 1.0)], tmp_path / "m")
    with pytest.raises(DistillError, match="already exists"):
        cv.extract(zoo / "base", zoo / "post", zoo / "cv")
    assert not (tmp_path / "v").exists() and not (tmp_path / "m").exists()


def test_stats_norms_relative_norms_and_cosine(zoo, tmp_path):
    neg = cv.apply(zoo / "base", [(zoo / "cv", -1.0)], tmp_path / "neg")  # base − Δ
    anti = cv.extract(zoo / "base", neg, tmp_path / "anti", dtype="float32")  # −Δ
    result = stats(zoo / "cv", base=zoo / "base", other=anti)
    delta, base = _state(zoo / "cv"), _state(zoo / "base")
    want = torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values())).item()
    assert result["total"]["norm"] == pytest.approx(want, rel=1e-5)
    want_rel = want / torch.sqrt(sum((t.double() ** 2).sum() for t in base.values())).item()
    assert result["total"]["relative_norm"] == pytest.approx(want_rel, rel=1e-5)
    assert result["total"]["cosine"] == pytest.approx(-1.0, abs=1e-5)
    groups = [r["group"] for r in result["per_layer"]]
    assert groups == ["embeddings", "layer 0", "layer 1", "other", "lm_head"]
    row = next(r for r in result["per_tensor"] if r["name"] == "model.layers.1.mlp.up_proj.weight")
    assert row["norm"] == pytest.approx(delta[row["name"]].norm().item(), rel=1e-5)


def test_cli_extract_apply_stats(zoo, tmp_path, capsys):
    v, m = tmp_path / "v", tmp_path / "m"
    assert main(["chat-vector", "extract", "--base", str(zoo / "base"), "--post", str(zoo / "post"),
                 "--out", str(v), "--dtype", "float32", "--no-progress"]) == 0
    assert main(["chat-vector", "apply", "--target", str(zoo / "cp"), "--vector", str(v), "--scale", "-0.5",
                 "--out", str(m), "--no-progress"]) == 0
    cp, post, base, got = _state(zoo / "cp"), _state(zoo / "post"), _state(zoo / "base"), _state(m)
    n = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(got[n], cp[n] - 0.5 * (post[n] - base[n]))
    js, cs = tmp_path / "s.json", tmp_path / "s.csv"
    assert main(["chat-vector", "stats", str(v), "--base", str(zoo / "base"), "--compare", str(zoo / "cv"),
                 "--json", str(js), "--csv", str(cs), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| layer 1 |" in printed and "‖Δ‖/‖θ_base‖" in printed
    assert json.loads(js.read_text())["total"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert cs.read_text().splitlines()[0].startswith("name,group,numel,norm")
    # bad input: exit status 2 and a message naming the fix
    assert main(["chat-vector", "apply", "--target", str(zoo / "cp"), "--vector", str(v), "--vector", str(v),
                 "--scale", "1", "--out", str(tmp_path / "x")]) == 2
    assert "one --scale per" in capsys.readouterr().err
    assert main(["chat-vector", "extract", "--base", str(zoo / "base"), "--post", str(zoo / "post"),
                 "--out", str(v)]) == 2
    assert "--overwrite" in capsys.readouterr().err


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from pathlib import Path
    from distill.io.checkpoints import ShardedWriter
    from distill.chat_vector import core as cv
    root, n_tensors, numel = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    def model(name, n, numel, seed):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"model_type": "mistral"}))
        plan = [(f"model.layers.{i}.w", (numel,), torch.float32) for i in range(n)]
        with ShardedWriter(root / name, plan, max_shard_size=numel * 4 * 2) as w:  # 2 tensors a shard
            for i, (t, *_ ) in enumerate(plan):
                w.write(t, torch.full((numel,), float(seed + i)))

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    for name, seed in (("tb", 0), ("tp", 1)):  # warm up every code path on a tiny model first
        model(name, 2, 16, seed)
    cv.apply(root / "tb", [(cv.extract(root / "tb", root / "tp", root / "tv", progress=False), 1.0)],
             root / "tm", progress=False)
    for name, seed in (("b", 0), ("p", 1)):
        model(name, n_tensors, numel, seed)
    before = peak_mb()
    cv.extract(root / "b", root / "p", root / "v", progress=False)
    cv.apply(root / "b", [(root / "v", 2.0)], root / "m", progress=False)
    print(json.dumps({"growth_mb": peak_mb() - before}))
""")


def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    n_tensors, numel = 48, 1_000_000  # 4 MB tensors, 192 MB per model, 24 shards
    tensor_mb, model_mb = numel * 4 / 2**20, n_tensors * numel * 4 / 2**20
    # A fixed mmap threshold makes glibc hand every freed tensor back to the OS at once, so peak RSS
    # shows what was alive together rather than what malloc's per-thread arenas kept cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(n_tensors), str(numel)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]
    bound = 6 * tensor_mb + 16  # a few tensors plus allocator slack
    assert growth < bound < model_mb / 4, f"peak RSS grew by {growth:.0f} MB over a {model_mb:.0f} MB model"
    # and the result is right: p + 2·(p − b) with p − b = 1 everywhere
    assert torch.equal(Checkpoint.open(tmp_path / "m").get("model.layers.4.w"), torch.full((numel,), 6.0))
