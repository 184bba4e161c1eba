"""Theory experiments: the JVP term against finite differences, the chunked JVP against the
unchunked one, the per-position metrics, T1-T4 end to end on tiny models (explicit models give
the numbers of the --zoo form), and T2's per-layer alignment arithmetic."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
if str(ROOT) not in sys.path:  # `analysis` is a directory of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from analysis.theory import t1_linearisation, t2_alignment, t3_text_correlation, t4_sweeps  # noqa: E402
from distill.theory.stats import spearman  # noqa: E402
from distill.theory.linearise import chat_vector, logits_and_jvp, measure, position_metrics  # noqa: E402
from analysis.theory.t2_alignment import delta_alignment, group_of, same_prompts  # noqa: E402
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


def test_jvp_runs_where_deepspeed_zero3_replaced_linear(monkeypatch):
    """ZeRO-3 training in the same process (a recipe's train stage) leaves F.linear a custom
    autograd.Function without forward-mode AD; T1 puts the original back while it runs."""
    import types

    import torch.nn.functional as F

    original = F.linear

    class NoJvp(torch.autograd.Function):  # like deepspeed's LinearFunctionForZeroStage3
        @staticmethod
        def forward(x, w, b=None):
            return original(x, w, b)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.partition_parameters", types.SimpleNamespace(
        InsertPostInitMethodToModuleSubClasses=types.SimpleNamespace(linear_bk=original)))
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: NoJvp.apply(x, w, b))
    patched = F.linear
    base = make_model(**SMALL)
    zero = {k: torch.zeros_like(v) for k, v in base.named_parameters()}
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(NotImplementedError):  # what T1 met after a ZeRO-3 stage
        torch.func.jvp(lambda t: base(inputs_embeds=t).logits, (torch.ones(1, 3, 16),), (torch.ones(1, 3, 16),))
    _, jd = logits_and_jvp(base, zero, ids)
    assert jd.abs().max() == 0 and F.linear is patched  # measured, and left as found
    seqs = [([1, 5, 6, 7], 2)]
    assert len(measure(base, make_model(**SMALL, seed=1), seqs, lambdas=(), chunk_tokens=2)["cos"]) == 2
    assert F.linear is patched


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


def _small_pair(zoo: Path, scale: float = 0.02):
    """A world-shaped directory: source-base, source-post = base + scale·(other − base), prompts/eval.jsonl."""
    tok = make_tokenizer(vocab_size=120)
    kw = dict(arch="mistral", vocab_size=len(tok), hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32)
    base = make_model(zoo / "source-base", tokenizer=tok, **kw)
    other = make_model(seed=3, **kw)
    with torch.no_grad():
        for p, q in zip(base.parameters(), other.parameters()):
            p.add_(scale * (q - p))
    base.save_pretrained(zoo / "source-post")
    tok.save_pretrained(zoo / "source-post")
    (zoo / "prompts").mkdir()
    (zoo / "prompts" / "eval.jsonl").write_text("".join(json.dumps({"instruction": t}) + "\n" for t in
                                                         ["answer in json", "the quick brown fox", "write lowercase"]))
    return zoo


def test_t1_run_on_a_small_chat_vector(tmp_path):
    """A post model that is base + a small Δ: the first-order picture must hold (cosine near 1)."""
    zoo = _small_pair(tmp_path / "zoo")
    res = t1_linearisation.run_t1(zoo / "source-base", zoo / "source-post", zoo / "prompts" / "eval.jsonl",
                           tmp_path / "out", limit=3, max_new_tokens=6, batch_size=2, chunk_tokens=4)
    table = {r["key"]: r for r in res["table"]}
    assert table["cos"]["mean"] > 0.95 and table["kl_codit_lin"]["mean"] < 0.05
    for ext in ("md", "csv", "json", "png"):
        assert (tmp_path / "out" / f"t1_linearisation.{ext}").exists()


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_jvp_equals_unchunked(one_thread, tie):
    """Body once + head and metrics in chunks of 3 positions = the whole model's logits and J·Δ at
    once, for every metric and λ point (float64; padded rows of different lengths; tied head)."""
    kw = dict(SMALL, tie=tie)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(4, 64, (n,), generator=g).tolist(), start) for n, start in ((9, 4), (6, 2), (11, 7))]
    results = []
    for chunk in (0, 3):
        base = make_model(**kw).double()
        post = _shifted(base, {k: v - p for (k, v), p in zip(make_model(**kw, seed=1).double().named_parameters(),
                                                              base.parameters())}, 0.3)
        results.append(measure(base, post, seqs, alpha=0.1, batch_size=2, lambdas=(0.25, 0.5), chunk_tokens=chunk))
    whole, chunked = results
    assert list(whole) == list(chunked) and "cos@0.25" in whole
    assert len(whole["cos"]) == sum(len(s) - start for s, start in seqs)
    for key in whole:
        assert torch.allclose(torch.tensor(chunked[key]), torch.tensor(whole[key]), rtol=1e-9, atol=1e-10), key


def test_t1_explicit_models_give_the_zoo_numbers(tmp_path, one_thread):
    zoo = _small_pair(tmp_path / "zoo", scale=0.3)
    elsewhere = tmp_path / "models"  # the same models and prompts outside any world layout
    shutil.copytree(zoo / "source-base", elsewhere / "b")
    shutil.copytree(zoo / "source-post", elsewhere / "p")
    (elsewhere / "prompts.jsonl").write_text("".join(  # chat `messages` rows: the same one-turn prompts
        json.dumps({"messages": [{"role": "user", "content": json.loads(x)["instruction"]}]}) + "\n"
        for x in (zoo / "prompts" / "eval.jsonl").read_text().splitlines()))
    common = ["--max-new-tokens", "5", "--batch-size", "2", "--chunk-tokens", "4", "--lambdas", "0.5"]
    assert t1_linearisation.main(["--zoo", str(zoo), "--out", str(tmp_path / "a"), "--prompts", "2", *common]) == 0
    assert t1_linearisation.main(["--base", str(elsewhere / "b"), "--post", str(elsewhere / "p"), "--prompts",
                           str(elsewhere / "prompts.jsonl"), "--limit", "2", "--out", str(tmp_path / "b"),
                           *common]) == 0
    a, b = (json.loads((tmp_path / d / "t1_linearisation.json").read_text())["rows"] for d in "ab")
    assert a == b and a[0]["positions"] == 10  # two prompts, 5 response tokens each


def test_scripts_say_what_they_need(capsys):
    for module in (t1_linearisation, t2_alignment, t3_text_correlation, t4_sweeps):
        with pytest.raises(SystemExit) as exc:
            module.main([])
        assert exc.value.code == 2
        assert "give --zoo ZOO (a world directory) or the explicit inputs; missing: --base --post" in \
            capsys.readouterr().err


def test_scripts_run_as_files_from_the_checkout():
    """`python analysis/theory/<experiment>.py`, `python analysis/theory tN` and `python -m
    analysis.theory tN` from the repository root: the installed package, no sys.path edits."""
    import subprocess

    runs = [[f"analysis/theory/{m}.py", "--help"] for m in ("t1_linearisation", "t2_alignment",
                                                            "t3_text_correlation", "t4_sweeps")]
    runs += [["analysis/theory", "t2", "--help"], ["-m", "analysis.theory", "t4", "--help"],
             ["analysis/ablation_mask.py", "--help"]]
    for args in runs:
        out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, (args, out.stderr[-2000:])
    assert "give --zoo ZOO" in subprocess.run([sys.executable, "analysis/theory", "t3"], cwd=ROOT,
                                              capture_output=True, text=True).stderr


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


# --- T2-T4 on the micro world: explicit models give the numbers of the --zoo form ---------------

def _perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    w = load_file(str(dst / "model.safetensors"))
    save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in w.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def micro_run(micro_zoo, tmp_path_factory):
    """A recipe-run-shaped directory on the micro world: data/{codit,direct} (made-up responses to
    its synthesis prompts) and models/{codit,direct}-seed{0,1} (perturbed copies of target-base);
    plus `explicit`: copies of the world's models and files outside its layout."""
    run = tmp_path_factory.mktemp("micro-run")
    prompts = [json.loads(x) for x in (micro_zoo / "prompts" / "synthesis.jsonl").read_text().splitlines()][:10]
    for k, method in enumerate(("codit", "direct")):
        (run / "data" / method / "data").mkdir(parents=True)
        (run / "data" / method / "data" / "train.jsonl").write_text("".join(json.dumps(
            {"id": p["id"], "instruction": p["instruction"], "response": f"answer {k}: {p['task'].lower()}",
             "repetitive": i == 3}) + "\n" for i, p in enumerate(prompts)))
        for seed in (0, 1):
            _perturbed_copy(micro_zoo / "target-base", run / "models" / f"{method}-seed{seed}", 10 * k + seed)
    explicit = run / "explicit"
    for name in ("source-base", "source-post", "target-base"):
        shutil.copytree(micro_zoo / name, explicit / name.replace("-", "_"))
    for rel in ("prompts/eval.jsonl", "prompts/synthesis.jsonl", "knowledge/questions.jsonl", "text/heldout.jsonl"):
        shutil.copy(micro_zoo / rel, explicit / rel.replace("/", "_"))
    return run


def _models(run: Path, *names) -> list[str]:
    flags = {"source_base": "--base", "source_post": "--post", "target_base": "--target"}
    return [x for n in names for x in (flags[n], str(run / "explicit" / n))]


def test_t3_explicit_models_give_the_zoo_numbers(micro_zoo, micro_run, tmp_path, one_thread):
    assert t3_text_correlation.main(["--zoo", str(micro_zoo), "--run-dir", str(micro_run), "--out", str(tmp_path / "a"),
                           "--pairs", "12"]) == 0
    m = micro_run / "models"
    assert t3_text_correlation.main([*_models(micro_run, "source_base", "source_post", "target_base"),
                           "--texts", f"codit={micro_run / 'data' / 'codit'}",
                           "--texts", f"direct={micro_run / 'data' / 'direct' / 'data' / 'train.jsonl'}",
                           "--tuned", f"codit={m / 'codit-seed0'},{m / 'codit-seed1'}",
                           "--tuned", f"direct={m / 'direct-seed0'},{m / 'direct-seed1'}",
                           "--out", str(tmp_path / "b"), "--pairs", "12"]) == 0
    a, b = (json.loads((tmp_path / d / "t3_text_correlation.json").read_text()) for d in "ab")
    assert a["rows"] == b["rows"] and a["s_src"] == b["s_src"] and len(a["s_src"]) == 12
    assert [r["tuned target"] for r in a["rows"]][1:5] == ["codit-seed0", "codit-seed1", "direct-seed0", "direct-seed1"]


def test_t3_pairs_file_takes_instructions_or_conversations(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"instruction": "Say hi.", "response": "hi"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Say yo."}, {"role": "assistant", "content": "yo"}]}) + "\n")
    pairs = t3_text_correlation.fixed_pairs(f, n=8)
    assert pairs == [([{"role": "user", "content": "Say hi."}], "hi"), ([{"role": "user", "content": "Say yo."}], "yo")]


def test_t2_explicit_models_give_the_zoo_numbers(micro_zoo, micro_run, tmp_path, one_thread):
    common = ["--epochs", "1", "--limit", "4", "--eval-limit", "4", "--max-new-tokens", "4", "--batch-size", "4"]
    assert t2_alignment.main(["--zoo", str(micro_zoo), "--run-dir", str(micro_run), "--out", str(tmp_path / "a"),
                           *common]) == 0
    assert t2_alignment.main([*_models(micro_run, "source_base", "source_post"),
                           "--prompts", str(micro_run / "explicit" / "prompts_eval.jsonl"),
                           "--codit", str(micro_run / "data" / "codit"), "--direct", str(micro_run / "data" / "direct"),
                           "--out", str(tmp_path / "b"), *common]) == 0
    a, b = (json.loads((tmp_path / d / "t2_alignment.json").read_text()) for d in "ab")
    assert a["rows"] == b["rows"] and a["if"] == b["if"] and set(a["if"]) == {"base", "post", "codit", "direct"}


def test_t4_explicit_models_give_the_zoo_numbers(micro_zoo, micro_run, tmp_path, one_thread):
    common = ["--betas", "1", "--alphas", "", "--limit", "4", "--epochs", "1", "--eval-limit", "4",
              "--max-new-tokens", "4", "--batch-size", "4"]
    assert t4_sweeps.main(["--zoo", str(micro_zoo), "--out", str(tmp_path / "a"), *common]) == 0
    e = micro_run / "explicit"
    assert t4_sweeps.main([*_models(micro_run, "source_base", "source_post", "target_base"),
                           "--prompts", str(e / "prompts_synthesis.jsonl"),
                           "--eval-prompts", str(e / "prompts_eval.jsonl"),
                           "--questions", str(e / "knowledge_questions.jsonl"), "--out", str(tmp_path / "b"),
                           *common]) == 0
    a, b = (json.loads((tmp_path / d / "t4_sweeps.json").read_text())["rows"] for d in "ab")
    assert a == b and len(a) == 1 and a[0]["IF prompt strict"] is not None and a[0]["knowledge own"] is not None
