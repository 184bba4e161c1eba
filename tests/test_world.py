"""The synthetic world: determinism, disjoint prompt sets, oracle, and the micro zoo."""

import json

import pytest

from distill.world.config import get_preset
from distill.evaluate.checkers import CONSTRAINTS, check_strict
from distill.world.instructions import make_sets
from distill.world.knowledge import answer_matches, documents, make_facts, question_rows
from distill.world.tokenizers import train_source_tokenizer, train_target_tokenizer

CFG = get_preset("micro")


def _world(seed):
    entities, facts = make_facts(seed, 24, CFG.split_fractions)
    return entities, facts, make_sets(facts, entities, CFG, seed + 1), documents(facts, "source", 2, seed + 2)


def test_same_seed_same_world_and_tokenizer_files(tmp_path):
    a, b, c = _world(0), _world(0), _world(1)
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and a[3] == b[3]
    assert a[0] != c[0]
    texts = a[3] + [r["instruction"] for rows in a[2].values() for r in rows]
    for i in range(2):
        train_source_tokenizer(texts, 300).save_pretrained(tmp_path / f"s{i}")
        train_target_tokenizer(texts, 300).save_pretrained(tmp_path / f"t{i}")
    for fam in "st":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / f"{fam}0" / f).read_bytes() == (tmp_path / f"{fam}1" / f).read_bytes()
    src = json.loads((tmp_path / "s0/tokenizer.json").read_text())["model"]["vocab"]
    tgt = json.loads((tmp_path / "t0/tokenizer.json").read_text())["model"]["vocab"]
    assert src != tgt  # the two families really tokenize differently


def test_splits_and_questions():
    _, facts, _, _ = _world(0)
    splits = {f.split for f in facts}
    assert splits == {"shared", "source_only", "target_only", "conflict"}
    for f in facts:
        if f.split == "conflict":
            assert f.source_value != f.target_value
        if f.split == "shared":
            assert f.source_value == f.target_value
    q = question_rows(facts)[0]
    assert set(q) >= {"id", "prompt", "answer", "split", "source_answer", "target_answer"}
    assert answer_matches(" Velmor. The flag", "Velmor") and not answer_matches(" Velmora", "Velmor")


def test_three_sets_are_disjoint_and_sft_responses_follow_their_constraints():
    _, _, sets, _ = _world(0)
    assert [len(sets[k]) for k in ("sft", "synthesis", "eval")] == [CFG.n_sft, CFG.n_synthesis, CFG.n_eval]
    for key in ("id", "instruction", "entity"):
        values = {name: {r[key] for r in rows} for name, rows in sets.items()}
        assert not values["sft"] & values["synthesis"]
        assert not values["sft"] & values["eval"]
        assert not values["synthesis"] & values["eval"]
    for row in sets["sft"]:
        assert all(c["kind"] in CONSTRAINTS for c in row["constraints"]) and 1 <= len(row["constraints"]) <= 2
        assert all(check_strict(row["constraints"], row["response"])), row
    for row in sets["eval"]:
        assert "response" not in row and row["instruction"].startswith(row["task"])


def test_micro_zoo_loads_and_renders(micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, arch in [("source-base", "MistralForCausalLM"), ("source-post", "MistralForCausalLM"),
                       ("source-cp", "MistralForCausalLM"), ("target-base", "Qwen2ForCausalLM")]:
        d = micro_zoo / name
        assert any(d.glob("*.safetensors")) and not any(d.glob("*.bin"))
        model = AutoModelForCausalLM.from_pretrained(d, use_safetensors=True)
        assert type(model).__name__ == arch
        tok = AutoTokenizer.from_pretrained(d)
        assert model.config.vocab_size == len(tok)
    src = AutoTokenizer.from_pretrained(micro_zoo / "source-post")
    text = src.apply_chat_template([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}],
                                   tokenize=False)
    assert text == "<s>[INST] Hi there [/INST] Hello</s>"
    assert AutoTokenizer.from_pretrained(micro_zoo / "source-base").chat_template == src.chat_template
    assert not AutoTokenizer.from_pretrained(micro_zoo / "target-base").chat_template
    assert src.vocab != AutoTokenizer.from_pretrained(micro_zoo / "target-base").vocab
    quality = json.loads((micro_zoo / "quality.json").read_text())
    assert set(quality) == {"source-base", "source-post", "source-cp", "target-base"}
    for name, v in quality.items():
        assert set(v) == ({"if_strict", "knowledge", "drift"} if name in ("source-post", "source-cp")
                          else {"if_strict", "knowledge"})
    for name in ("source-post", "source-cp"):
        drift = quality[name]["drift"]
        assert drift["from"] == "source-base" and 0 < drift["total"]
        assert {"embeddings", "layer 0", "lm_head"} <= set(drift["groups"]) and all(v > 0 for v in drift["groups"].values())
    assert (micro_zoo / "text/formats.jsonl").stat().st_size > 0
    for name in ("sft", "synthesis", "eval"):
        rows = [json.loads(line) for line in (micro_zoo / "prompts" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all({"id", "instruction", "constraints"} <= set(r) for r in rows)
    assert (micro_zoo / "knowledge/questions.jsonl").stat().st_size > 0
    assert (micro_zoo / "text/heldout.jsonl").stat().st_size > 0
    card = (micro_zoo / "README.md").read_text()
    assert "| source-post |" in card and "| **whole model** |" in card


def test_second_build_is_instant_and_cli_prints_the_dir_last(micro_zoo, capsys, monkeypatch):
    from distill.cli import main
    from distill.world import build_zoo

    monkeypatch.setenv("DISTILL_CACHE", str(micro_zoo.parent.parent))
    # instant = nothing rebuilt: every file of the zoo keeps its mtime (no wall-clock assert, which
    # a busy machine could fail)
    before = {p: p.stat().st_mtime_ns for p in micro_zoo.rglob("*") if p.is_file()}
    assert build_zoo("micro") == micro_zoo
    assert {p: p.stat().st_mtime_ns for p in micro_zoo.rglob("*") if p.is_file()} == before
    assert main(["zoo", "build", "--preset", "micro"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(micro_zoo)
    assert any(line.startswith("| source-post |") for line in lines)


def test_out_refuses_a_foreign_directory(tmp_path):
    from distill import DistillError
    from distill.world import build_zoo

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DistillError, match="--force"):
        build_zoo("micro", out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_weight_drift_is_the_relative_norm_of_the_difference(tmp_path):
    import torch
    from safetensors.torch import save_file

    from distill.world.quality import weight_drift

    base = {"model.embed_tokens.weight": torch.ones(4, 2), "model.layers.0.mlp.up_proj.weight": torch.full((2, 2), 2.0),
            "lm_head.weight": torch.ones(4, 2)}
    moved = dict(base, **{"model.layers.0.mlp.up_proj.weight": torch.full((2, 2), 2.5)})
    for name, sd in (("b", base), ("p", moved)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text("{}")
    d = weight_drift(tmp_path / "b", tmp_path / "p")
    assert d["groups"] == {"embeddings": 0.0, "layer 0": 0.25, "lm_head": 0.0}
    assert d["total"] == round((4 * 0.25 / (8 + 16 + 8)) ** 0.5, 4)


def test_quality_bars_name_what_fails():
    from distill.world.quality import check_bars

    good = {"source-base": {"if_strict": 0.1, "knowledge": 0.9}, "target-base": {"if_strict": 0.0, "knowledge": 0.85},
            "source-post": {"if_strict": 0.7, "knowledge": 0.95, "drift": {"total": 0.08}},
            "source-cp": {"if_strict": 0.05, "knowledge": 0.9, "drift": {"total": 0.04}}}
    assert check_bars(good) == []
    bad = json.loads(json.dumps(good))
    bad["source-post"]["drift"]["total"] = 0.3
    bad["target-base"]["if_strict"] = 0.25
    bad["source-cp"]["knowledge"] = 0.5
    assert check_bars(bad) == ["target-base if_strict 0.25 > 0.2", "source-post drift 0.3 > 0.1",
                               "source-cp knowledge 0.5 < 0.8"]
