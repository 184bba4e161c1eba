"""The repetition rules (distill.synthesize.repetition): the public CoDIT rule, ours, and where they act:
rows and card of `distill synthesize`, and the drop/keep policy of `distill train`."""

import collections
import json
import random

import pytest

from distill import DistillError
from distill.train import data as td
from distill.cli import main
from distill.synthesize.repetition import (PUBLIC_TOP_NGRAM_FRACTION, ngram_repetition, public_measures, public_repetition,
                                public_violations, repetition_fraction, repetition_rule)
from distill.synthesize.run import SynthesizeConfig, synthesize
from test_synthesize import cfg, rows, zoo  # noqa: F401 - the tiny models and prompts of the synthesize tests

U = [chr(0x4E00 + i) for i in range(2000)]  # distinct characters, none of them 'a'..'d' or whitespace


def pad(text, length, start=1000):
    """`text` followed by distinct characters up to `length` (they repeat nothing)."""
    return text + "".join(U[start:start + length - len(text)])


def repeated(gram, times, length):
    """`gram` `times` times, each followed by a distinct character, padded to `length`."""
    return pad("".join(gram + U[i] for i in range(times)), length)


# ----------------------------------------------------------------------------- the public rule, by hand


def test_2gram_branch_at_and_just_below_its_threshold():
    # 101 characters = 100 2-grams; "ab" 16 times: 16 / 100 = 0.16, flagged (>=); 15 times: 0.15, not
    at = repeated("ab", 16, 101)
    v = public_repetition(at)
    assert len(at) == 101 and v.measures["top_2gram_character_fraction"] == 0.16
    assert v.repetitive and v.reasons == ("top_2gram_character_fraction",) and v.score == 1.0
    below = repeated("ab", 15, 101)
    v = public_repetition(below)
    assert v.measures["top_2gram_character_fraction"] == 0.15 and not v.repetitive and v.reasons == ()
    assert v.score == 0.9375  # 0.15 / 0.16, the nearest branch; the 3-gram share is 1/99, 100-gram count 1
    assert v.measures["top_3gram_character_fraction"] == 1 / 99 and v.measures["top_100gram_character_frequency"] == 1


def test_3gram_and_4gram_branches_at_and_just_below_their_thresholds():
    # 102 characters = 100 3-grams; "abc" 18 times: 0.18 -> the 3-gram branch fires, 17 times: 0.17 -> not.
    # Its 2-grams "ab", "bc" repeat as often (18/101 = 0.178 >= 0.16), so the text is flagged either way:
    # a repeated 3-gram always brings its 2-gram along (see public_violations).
    at, below = repeated("abc", 18, 102), repeated("abc", 17, 102)
    assert public_measures(at)["top_3gram_character_fraction"] == 0.18
    assert public_measures(below)["top_3gram_character_fraction"] == 0.17
    assert "top_3gram_character_fraction" in public_repetition(at).reasons
    assert public_repetition(below).reasons == ("top_2gram_character_fraction",)
    # 103 characters = 100 4-grams; "abcd" 20 times: 0.20 -> fires, 19 times: 0.19 -> not
    at, below = repeated("abcd", 20, 103), repeated("abcd", 19, 103)
    assert public_measures(at)["top_4gram_character_fraction"] == 0.2
    assert public_measures(below)["top_4gram_character_fraction"] == 0.19
    assert "top_4gram_character_fraction" in public_repetition(at).reasons
    assert "top_4gram_character_fraction" not in public_repetition(below).reasons
    # Each comparison on its own, as apply_v2: at the threshold counts, just below does not.
    quiet = {"top_2gram_character_fraction": 0.0, "top_3gram_character_fraction": 0.0,
             "top_4gram_character_fraction": 0.0, "top_100gram_character_frequency": 9}
    assert public_violations(quiet) == []
    for n, t in PUBLIC_TOP_NGRAM_FRACTION.items():
        key = f"top_{n}gram_character_fraction"
        assert public_violations(quiet | {key: t}) == [key]
        assert public_violations(quiet | {key: t - 1e-9}) == []
    assert public_violations(quiet | {"top_100gram_character_frequency": 10}) == ["top_100gram_character_frequency"]


def test_100gram_branch_counts_character_100grams_ten_times():
    block = "".join(U[:100])  # 100 distinct characters: every 2-gram share stays tiny
    ten = block * 10  # 1000 characters; the 100-gram `block` starts at 0, 100, ..., 900: 10 times
    v = public_repetition(ten)
    assert v.measures["top_100gram_character_frequency"] == 10
    assert v.measures["top_2gram_character_fraction"] == 10 / 999
    assert v.repetitive and v.reasons == ("top_100gram_character_frequency",) and v.score == 1.0
    nine = ten[:-1]  # the tenth copy lacks its last character: 9 times, not flagged
    v = public_repetition(nine)
    assert v.measures["top_100gram_character_frequency"] == 9 and not v.repetitive and v.score == 0.9
    # characters, not words: ten copies of a 100-character sentence with spaces in it count alike
    sentence = pad("one two ", 100)
    assert public_measures(sentence * 10)["top_100gram_character_frequency"] == 10


def test_texts_under_100_characters_are_never_flagged_and_whitespace_counts_as_characters():
    assert not public_repetition("ab" * 49).repetitive  # 98 characters of pure loop
    assert public_repetition("ab" * 49).score == 0.0
    assert public_repetition("ab" * 50).repetitive  # 100: judged
    # the length test strips, the measures do not
    assert not public_repetition("   " + "ab" * 49 + "   ").repetitive
    assert not public_repetition("").repetitive and public_measures("") == {
        "top_2gram_character_fraction": 0.0, "top_3gram_character_fraction": 0.0,
        "top_4gram_character_fraction": 0.0, "top_100gram_character_frequency": 0}
    # distinct characters each followed by two spaces: the 2-gram "  " is 34 of 101 2-grams (stripped: 100
    # characters); a rule that ignored whitespace would see no repetition at all
    spaced = "".join(u + "  " for u in U[:34])
    v = public_repetition(spaced)
    assert v.measures["top_2gram_character_fraction"] == 34 / 101 and v.repetitive
    # overlapping n-grams: a share of n-gram positions, not count * n / len
    assert public_measures("a" * 100)["top_2gram_character_fraction"] == 1.0


# Reference: src/repetition_detector.py of github.com/Tatsuya736482/contrastive_decoding_public
# (Apache-2.0), the functions check_repetition needs, verbatim but for formatting.
def _ref_ngram(s, n):
    return [s[i: i + n] for i in range(len(s) - n + 1)]


def _ref_duplicate_fraction(text):
    r = {}
    for n in range(2, 5):
        C = collections.Counter(_ref_ngram(text, n))
        top_ngram, top_freq = ("", 0) if not C else C.most_common(1)[0]
        total_freq = sum(f for _, f in C.items())
        r[f"top_{n}gram_character_fraction"] = top_freq / total_freq if 0 < total_freq else 0.0
    C = collections.Counter(_ref_ngram(text, 100))
    top_ngram, top_freq = ("", 0) if not C else C.most_common(1)[0]
    r["top_100gram_character_frequency"] = top_freq
    return r


def _ref_check_repetition(text):
    if len(text.strip()) < 100:
        return False
    Q = _ref_duplicate_fraction(text)
    return (Q["top_2gram_character_fraction"] >= 0.16 or Q["top_3gram_character_fraction"] >= 0.18
            or Q["top_4gram_character_fraction"] >= 0.20 or Q["top_100gram_character_frequency"] >= 10)


def test_public_rule_equals_the_public_code_on_random_texts():
    rng = random.Random(0)
    flagged = 0
    for i in range(600):
        alphabet = rng.choice(["ab ", "abcdefgh \n", "abcdefghijklmnopqrstuvwxyz  .,\n", "".join(U[:300])])
        n = rng.randrange(0, 400)
        if i % 3 == 0:  # loops: a random unit repeated, with noise around it
            unit = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120)))
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 50))) + unit * rng.randrange(1, 15)
        else:
            text = "".join(rng.choice(alphabet) for _ in range(n))
        v = public_repetition(text)
        assert v.measures == _ref_duplicate_fraction(text), text
        assert v.repetitive == _ref_check_repetition(text), text
        assert v.repetitive == (v.score >= 1.0), text
        flagged += v.repetitive
    assert 50 < flagged < 550  # both sides exercised


# ----------------------------------------------------------------------------- ours, and the interface


def test_ngram_rule_unchanged():
    assert repetition_fraction("abc") == 0.0
    prose = "The river city sits below the hills; its market sells fish, bread and copper pots to travellers."
    assert repetition_fraction(prose) < 0.05
    assert repetition_fraction("I will answer. " + "the answer is yes and " * 20) > 0.8
    # "abcabc", n = 3: the second "abc" (characters 3..5) was seen before: 3 / 6
    assert repetition_fraction("abcabc", 3) == 0.5
    assert not ngram_repetition("abcabc", 3, 0.5).repetitive  # "more than" the threshold
    v = ngram_repetition("abcabc", 3, 0.49)
    assert v.repetitive and v.score == 0.5 and v.rule == "ngram"
    from distill.synthesize.records import repetition_fraction as old_import

    assert old_import is repetition_fraction


def test_rule_by_name():
    assert repetition_rule().name == "public" and repetition_rule()("ab" * 50).repetitive
    assert repetition_rule("ngram", 3, 0.49)("abcabc") == ngram_repetition("abcabc", 3, 0.49)
    for bad in (dict(name="nope"), dict(name="ngram", threshold=2.0), dict(name="ngram", ngram=0)):
        with pytest.raises(DistillError):
            repetition_rule(**bad)
    with pytest.raises(DistillError, match="repetition rule must be one of public, ngram"):
        SynthesizeConfig(expert="e", prompts="p", out="o", method="direct", repetition_rule="nope")
    assert SynthesizeConfig(expert="e", prompts="p", out="o", method="direct").max_new_tokens == 4096


# ----------------------------------------------------------------------------- synthesize


def test_synthesis_writes_the_public_rule_by_default(zoo, tmp_path):  # noqa: F811
    out = tmp_path / "public"
    synthesize(cfg(zoo, out, max_new_tokens=60))  # long enough for 100+ characters
    data = rows(out)
    assert any(len(r["response"].strip()) >= 100 for r in data)
    for r in data:
        v = public_repetition(r["response"])
        assert (r["repetition_rule"], r["repetition"], r["repetitive"]) == ("public", v.score, v.repetitive), r
    flagged = sum(r["repetitive"] for r in data)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["settings"]["repetition_rule"] == "public"
    assert prov["counts"]["repetitive"] == flagged and prov["counts"]["repetition_rule"] == "public"
    card = (out / "README.md").read_text()
    assert f"Repetition filter: {flagged} of {len(data)} rows flagged by the `public` rule" in card
    assert "`distill train`\ndrops them by default (`--repetitive keep`" in card


def test_synthesis_with_the_ngram_rule(zoo, tmp_path):  # noqa: F811
    out = tmp_path / "ngram"
    assert main(["synthesize", "--expert", str(zoo / "post"), "--amateur", str(zoo / "base"), "--prompts",
                 str(zoo / "prompts.jsonl"), "--out", str(out), "--max-new-tokens", "10", "--batch-size", "3",
                 "--no-progress", "--repetition-rule", "ngram", "--repetition-ngram", "3",
                 "--repetition-threshold", "0.1"]) == 0
    data = rows(out)
    for r in data:
        rep = repetition_fraction(r["response"], 3)
        assert (r["repetition_rule"], r["repetition"], r["repetitive"]) == ("ngram", round(rep, 4), rep > 0.1), r
    flagged = sum(r["repetitive"] for r in data)
    assert 0 < flagged < len(data)
    card = (out / "README.md").read_text()
    assert f"Repetition filter: {flagged} of {len(data)} rows flagged by the `ngram` rule" in card
    assert "more than 10% of a response's characters lie inside a repeated 3-character n-gram" in card
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["synthesize", "--expert", "e", "--prompts", "p", "--out", "o", "--repetition-rule", "words"])


# ----------------------------------------------------------------------------- train policy


def _data(tmp_path):
    rows = [{"instruction": f"q{i}", "response": f"a{i}", "repetitive": i in (1, 3), "repetition_rule": "public"}
            for i in range(5)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_policy_drop_or_keep_is_counted(tmp_path):
    data = _data(tmp_path)
    stats = td.DataStats()
    assert len(td.read_chats(data, "drop", stats)) == 3
    assert (stats.repetitive_policy, stats.repetition_rule, stats.flagged_repetitive, stats.dropped_repetitive,
            stats.kept_repetitive) == ("drop", "public", 2, 2, 0)
    stats = td.DataStats()
    assert len(td.read_chats(data, "keep", stats)) == 5
    assert (stats.repetitive_policy, stats.flagged_repetitive, stats.dropped_repetitive,
            stats.kept_repetitive) == ("keep", 2, 0, 2)
    # the older bool argument still works
    assert len(td.read_chats(data, keep_repetitive=True, stats=td.DataStats())) == 5
    assert len(td.read_chats(data, False, td.DataStats())) == 3
    with pytest.raises(DistillError, match="repetitive must be drop or keep"):
        td.read_chats(data, "filter", td.DataStats())


def test_train_config_cli_and_recipe_carry_the_policy(tmp_path, monkeypatch):
    import argparse

    from distill.recipe.schema import load_recipe
    from distill.train.cli import add_cli
    from distill.train.run import TrainConfig, validate

    assert TrainConfig(model="", data="", out="").repetitive == "drop"
    assert TrainConfig(model="", data="", out="", keep_repetitive=True).repetitive == "keep"
    with pytest.raises(DistillError, match="repetitive must be drop or keep"):
        validate(TrainConfig(model="", data="", out="", repetitive="some"))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    base = ["train", "--model", "m", "--data", "d", "--out", "o"]
    assert parser.parse_args(base).repetitive == "drop"
    assert parser.parse_args(base + ["--repetitive", "keep"]).repetitive == "keep"
    assert parser.parse_args(base + ["--keep-repetitive"]).keep_repetitive
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--repetitive", "some"])
    # the recipe: a field of train, checked when the recipe loads, passed to the train command
    from pathlib import Path

    import distill.recipe.pipeline as recipe_mod

    monkeypatch.setenv("DISTILL_PROMPTS", str(tmp_path / "prompts.jsonl"))
    path = Path(__file__).parent.parent / "recipes" / "mistral-to-qwen.yaml"
    assert load_recipe(path).train.repetitive == "drop" and load_recipe(path).synthesis.max_new_tokens == 4096
    with pytest.raises(DistillError, match="train: repetitive must be drop or keep"):
        load_recipe(path, ["train.repetitive=some"])
    recipe = load_recipe(path, ["train.repetitive=keep", f"run_dir={tmp_path / 'run'}"])
    pipeline = recipe_mod.Pipeline(recipe, path)
    pipeline.state.done["synthesize-codit"] = {"key": "k", "outputs": {"data": str(tmp_path / "data")}}
    seen = []
    monkeypatch.setattr(recipe_mod.Pipeline, "_launch_train", lambda self, args, n: seen.append(args))
    pipeline.stage_train("codit", 0)
    assert seen[0].repetitive == "keep"


def test_trained_model_summary_counts_the_flagged_rows(tmp_path):
    from distill.train.run import TrainConfig, train
    from tiny import make_model, make_tokenizer

    tok = make_tokenizer(chat_template=None)
    make_model(tmp_path / "target", arch="qwen2", vocab_size=len(tok), tokenizer=tok, hidden=32, layers=2)
    data = _data(tmp_path)
    for policy, dropped, kept in (("drop", 2, 0), ("keep", 0, 2)):
        out = tmp_path / f"m-{policy}"
        train(TrainConfig(model=str(tmp_path / "target"), data=str(data), out=str(out), deepspeed=None, max_steps=1,
                          batch_size=2, max_length=32, eval_fraction=0.0, repetitive=policy))
        summary = json.loads((out / "train_summary.json").read_text())["data"]
        assert (summary["repetitive_policy"], summary["repetition_rule"], summary["flagged_repetitive"],
                summary["dropped_repetitive"], summary["kept_repetitive"]) == (policy, "public", 2, dropped, kept)
        assert json.loads((out / "train_config.json").read_text())["repetitive"] == policy


def test_card_counts_flagged_rows_per_rule_even_when_a_resume_mixed_rules():
    from distill.synthesize.records import _flagged_by_rule, _repetition_paragraph

    rows = [{"repetitive": True}, {"repetitive": False},  # written before rows named their rule: ngram
            {"repetitive": True, "repetition_rule": "public"}, {"repetitive": False, "repetition_rule": "public"},
            {"repetitive": False, "repetition_rule": "public"}]
    by_rule = _flagged_by_rule(rows)
    assert by_rule == {"ngram": {"rows": 2, "repetitive": 1}, "public": {"rows": 3, "repetitive": 1}}
    text = _repetition_paragraph({"repetition_ngram": 20, "repetition_threshold": 0.3},
                                 {"rows": 5, "repetitive": 2, "repetitive_by_rule": by_rule})
    assert "1 of 2 rows flagged by the `ngram` rule" in text and "1 of 3 rows flagged by the `public` rule" in text
    assert "rerun with --overwrite" in text
    one = _repetition_paragraph({}, {"rows": 3, "repetitive": 1, "repetitive_by_rule": {"public": by_rule["public"]}})
    assert one.startswith("Repetition filter: 1 of 3 rows flagged by the `public` rule") and "--overwrite" not in one
