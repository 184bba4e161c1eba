"""analysis/mechanism.py on a hand-made world whose shares are known by construction."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from analysis.mechanism import main, mechanism, sentences, states  # noqa: E402

from distill import DistillError  # noqa: E402

FACTS = [  # (land, relation, split, source's value, target's value)
    ("Avo", "capital", "shared", "Bel", "Bel"), ("Avo", "flag", "source_only", "red", None),
    ("Avo", "animal", "conflict", "fox", "owl"), ("Avo", "export", "target_only", None, "salt"),
    ("Zed", "capital", "conflict", "Qar", "Tum"), ("Zed", "flag", "shared", "blue", "blue"),
    ("Zed", "animal", "source_only", "wolf", None), ("Zed", "export", "shared", "tea", "tea"),
    # Kel: a land of the teacher's SFT prompts; Rho: an eval land (no prompt set of the data names it)
    ("Kel", "capital", "conflict", "Mox", "Pry"), ("Kel", "animal", "shared", "bear", "bear"),
    ("Kel", "flag", "source_only", "green", None), ("Kel", "export", "target_only", None, "wine"),
    ("Rho", "capital", "conflict", "Dun", "Fal"), ("Rho", "flag", "shared", "black", "black"),
]
LOWER, NO_COMMA = [{"kind": "lowercase", "kwargs": {}}], [{"kind": "no_comma", "kwargs": {}}]
PROMPTS = [("p0", "Avo", "capital", LOWER), ("p1", "Avo", None, NO_COMMA), ("p2", "Zed", "capital", LOWER),
           ("p3", "Zed", "flag", NO_COMMA)]
# Draw A: p0 states Bel (shared); p1 is open (all four Avo facts): "Belmont" is not Bel, red and fox are
# stated, owl and salt are not, and its comma breaks no_comma; p2 states both conflict values; p3 BLUE.
# Beyond their own land: p0 states SFT land Kel's conflict the source's way (Mox); p1 names Kel, but its
# Pry is past the ****** divider, in a sentence naming no land; p2 names own land Avo (no fact); p3's Pry
# follows a *** divider (no land named) and its last sentence states eval land Rho's black flag.
DRAW_A = {"p0": "the capital of avo is bel. kel's capital is mox.",
          "p1": "Avo has a red flag, the fox and Belmont. Kel is far******its capital is Pry",
          "p2": "qar, or maybe tum. avo is near.",
          "p3": "Zed flies a BLUE flag\n***\nthe capital is Pry! Rho flies a black flag"}
# Draw B (two prompts): p0 states Bel but is not lowercase; p1 states owl and salt only.
# Beyond: p0's Bel names no land (Avo's capital not stated); its second sentence states Kel's Pry and green.
DRAW_B = {"p0": "The capital is Bel. In KEL the capital is Pry and the flag is green.",
          "p1": "avo exports salt and honors the owl"}


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def world(tmp_path):
    zoo = tmp_path / "zoo"
    _jsonl(zoo / "knowledge" / "questions.jsonl", [
        {"id": f"k-{e}.{r}", "prompt": "-", "answer": s or t, "split": sp, "source_answer": s, "target_answer": t,
         "entity": e, "relation": r} for e, r, sp, s, t in FACTS])
    _jsonl(zoo / "prompts" / "synthesis.jsonl", [
        {"id": i, "instruction": f"about {e}", "constraints": c, "entity": e, "relation": r,
         "task_type": "open" if r is None else "question"} for i, e, r, c in PROMPTS])
    _jsonl(zoo / "prompts" / "sft.jsonl", [{"id": "sft-0", "instruction": "about Kel", "constraints": [],
                                            "entity": "Kel", "relation": "capital", "response": "Mox."}])
    draw_a = tmp_path / "synth-a"  # a `distill synthesize` output directory
    _jsonl(draw_a / "data" / "train.jsonl", [{"id": i, "instruction": "-", "response": t} for i, t in DRAW_A.items()])
    (draw_a / "provenance.json").write_text("{}")
    draw_b = _jsonl(tmp_path / "synth-b.jsonl", [{"id": i, "instruction": "-", "response": t} for i, t in DRAW_B.items()])
    return zoo, draw_a, draw_b


def test_states_is_a_whole_word_case_insensitive_search():
    assert states("The capital is Vel.", "vel") and states("VEL", "Vel") and states("x  New\n Bel y", "new bel")
    assert not states("Velor is far", "Vel") and not states("Avel", "Vel") and not states("anything", None)


def test_shares_per_split_and_if_per_draw_and_over_draws(world, tmp_path):
    zoo, draw_a, draw_b = world
    res = mechanism({"codit": [draw_a, draw_b]}, zoo / "prompts" / "synthesis.jsonl",
                    zoo / "knowledge" / "questions.jsonl", tmp_path / "out")
    a, b = res["methods"]["codit"]["draws"]
    assert {s: a["splits"][s]["pairs"] for s in a["splits"]} == {"shared": 3, "source_only": 1, "conflict": 2,
                                                                  "target_only": 1}
    assert a["metrics"] == pytest.approx({
        "shared.source": 2 / 3, "source_only.source": 1.0, "conflict.source": 1.0, "conflict.target": 0.5,
        "target_only.source": None, "target_only.target": 0.0, "shared.target": None, "source_only.target": None,
        "if_strict": 0.75, "if_loose": 0.75})
    assert {s: b["splits"][s]["pairs"] for s in b["splits"]} == {"shared": 2, "source_only": 1, "conflict": 1,
                                                                  "target_only": 1}
    assert (b["metrics"]["shared.source"], b["metrics"]["source_only.source"], b["metrics"]["conflict.source"],
            b["metrics"]["conflict.target"], b["metrics"]["target_only.target"], b["metrics"]["if_strict"]) == \
        (0.5, 0.0, 0.0, 1.0, 1.0, 0.5)
    summary = res["methods"]["codit"]["summary"]
    assert summary["shared.source"]["mean"] == pytest.approx(7 / 12)
    assert summary["shared.source"]["sd"] == pytest.approx((2 / 3 - 1 / 2) / 2 ** 0.5)
    assert summary["conflict.target"]["mean"] == pytest.approx(0.75) and summary["if_strict"]["mean"] == 0.625
    assert summary["student.conflict_source_way"]["n"] == 0  # no run dirs: no student columns
    saved = json.loads((tmp_path / "out" / "mechanism.json").read_text())
    assert saved["methods"]["codit"]["summary"]["if_loose"]["mean"] == pytest.approx(0.625)
    md = (tmp_path / "out" / "mechanism.md").read_text()
    assert "| codit | 2 | 3 | 0.583 ± 0.118 | 0.500 ± 0.707 | 0.500 ± 0.707 | 0.750 ± 0.354 |" in md
    assert "student" not in md.split("|", 1)[1].split("\n")[0]


def test_run_dirs_pool_draws_and_put_the_students_numbers_beside(world, tmp_path, capsys):
    zoo, draw_a, draw_b = world
    for k, (draw, cs) in enumerate([(draw_a, (0.2, 0.4)), (draw_b, (0.6,))]):
        run = tmp_path / f"run{k}"
        dest = run / "data" / "direct" / "data" / "train.jsonl"
        dest.parent.mkdir(parents=True)
        dest.write_text((draw / "data" / "train.jsonl").read_text() if draw.is_dir() else draw.read_text())
        (run / "recipe.json").write_text(json.dumps({"prompts": {"synthesis": str(zoo / "prompts" / "synthesis.jsonl")},
                                                     "evaluate": {"zoo": str(zoo)}}))
        for seed, c in enumerate(cs):
            _jsonl(run / "scores" / f"direct-seed{seed}.json",
                   [{"knowledge": {"conflict": {"source_way": c}, "own": {"accuracy": 1 - c}}}])
    assert main(["--run-dir", str(tmp_path / "run0"), "--run-dir", str(tmp_path / "run1"),
                 "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "mechanism.json").read_text())["methods"]["direct"]["summary"]
    assert summary["student.conflict_source_way"]["n"] == 3
    assert summary["student.conflict_source_way"]["mean"] == pytest.approx(0.4)
    assert summary["student.knowledge_own"]["mean"] == pytest.approx(0.6)
    assert summary["if_strict"]["mean"] == pytest.approx(0.625)  # the same two draws as above
    assert "student: conflicts source's way" in capsys.readouterr().out


def test_a_missing_dataset_is_one_line_naming_it(world, tmp_path, capsys):
    zoo, draw_a, _ = world
    missing = tmp_path / "no-such-data"
    assert main(["--zoo", str(zoo), "--data", f"codit={draw_a},{missing}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err and "not found" in err
    with pytest.raises(DistillError, match="not in the prompts file"):  # data of another prompt set
        bad = _jsonl(tmp_path / "other.jsonl", [{"id": "elsewhere-1", "response": "x"}])
        mechanism({"codit": [bad]}, zoo / "prompts" / "synthesis.jsonl", zoo / "knowledge" / "questions.jsonl")


def test_sentences_split_at_stops_line_breaks_and_dividers():
    assert sentences("A b. C? D!\n\nE\n***\nF******G...") == ["A b", "C", "D", "E", "F", "G"]


def test_facts_of_any_land_are_counted_where_a_sentence_names_their_land(world, tmp_path):
    zoo, draw_a, draw_b = world
    res = mechanism({"codit": [draw_a, draw_b]}, zoo / "prompts" / "synthesis.jsonl",
                    zoo / "knowledge" / "questions.jsonl", tmp_path / "out")
    assert res["sft_prompts"] == str(zoo / "prompts" / "sft.jsonl")  # the sibling of the synthesis prompts
    a, b = (d["any_land"] for d in res["methods"]["codit"]["draws"])
    assert (a["sentences"], b["sentences"]) == (10, 3)
    assert {g: a[g]["lands"] for g in ("all", "own", "sft", "other")} == {"all": 4, "own": 2, "sft": 1, "other": 1}
    # Draw A, all lands: shared Avo.capital, Zed.flag, Rho.flag of 5; source-only Avo.flag of 3; conflict
    # Avo.animal and Kel.capital the source's way, none the target's (p2's qar/tum and the Pry name no land).
    assert {s: (c["source"], c["target"], c["facts"]) for s, c in a["all"]["splits"].items()} == {
        "shared": (3, 3, 5), "source_only": (1, 0, 3), "conflict": (2, 0, 4), "target_only": (0, 0, 2)}
    assert {g: (a[g]["splits"]["conflict"]["source"], a[g]["splits"]["conflict"]["facts"])
            for g in ("own", "sft", "other")} == {"own": (1, 2), "sft": (1, 1), "other": (0, 1)}
    # Sentences naming a land not the response's own: kel's / Kel is far (SFT), avo is near (own), Rho (other).
    assert {g: (a[g]["sentences_other"], a[g]["responses_other"]) for g in ("all", "own", "sft", "other")} == \
        {"all": (4, 4), "own": (1, 1), "sft": (2, 2), "other": (1, 1)}
    assert a["all"]["metrics"] == pytest.approx({
        "sentences_other": 0.4, "responses_other": 1.0, "shared.source": 0.6, "shared.target": None,
        "source_only.source": 1 / 3, "source_only.target": None, "conflict.source": 0.5, "conflict.target": 0.0,
        "target_only.source": None, "target_only.target": 0.0})
    # Draw B: Kel's Pry and green; Avo's owl and salt; Bel names no land.
    assert {s: (c["source"], c["target"]) for s, c in b["all"]["splits"].items()} == {
        "shared": (0, 0), "source_only": (1, 0), "conflict": (0, 2), "target_only": (0, 1)}
    assert (b["sft"]["splits"]["conflict"]["target"], b["own"]["splits"]["conflict"]["target"]) == (1, 1)
    assert (b["all"]["sentences_other"], b["all"]["responses_other"], b["own"]["sentences_other"]) == (1, 1, 0)
    summary = res["methods"]["codit"]["any_land"]
    assert summary["all"]["shared.source"]["mean"] == pytest.approx(0.3)
    assert summary["all"]["shared.source"]["sd"] == pytest.approx(0.6 / 2 ** 0.5)
    assert summary["all"]["sentences_other"]["mean"] == pytest.approx((0.4 + 1 / 3) / 2)
    assert summary["sft"]["conflict.source"]["mean"] == pytest.approx(0.5)
    assert summary["sft"]["conflict.target"]["mean"] == pytest.approx(0.5)
    # The first table and its keys are as before; the second follows it.
    assert res["methods"]["codit"]["summary"]["conflict.source"]["mean"] == pytest.approx(0.5)
    saved = json.loads((tmp_path / "out" / "mechanism.json").read_text())
    assert saved["methods"]["codit"]["any_land"]["other"]["shared.source"]["mean"] == pytest.approx(0.5)
    md = (tmp_path / "out" / "mechanism.md").read_text()
    assert md.index("| codit | 2 | 3 |") < md.index("**Facts of any land.**")
    assert "| codit | all (4) | 0.367 ± 0.047 | 0.750 ± 0.354 | 0.300 ± 0.424 | 0.333 ± 0.000 | 0.250 ± 0.354 | " \
           "0.250 ± 0.354 | 0.250 ± 0.354 | 2/4, 0/4 |" in md
    assert "| codit | SFT (1) | " in md and md.rstrip().endswith("| 0/1, 0/1 |")  # Rho's Dun: never


def test_without_sft_prompts_the_breakdown_is_na(world, tmp_path):
    zoo, draw_a, _ = world
    (zoo / "prompts" / "sft.jsonl").unlink()
    res = mechanism({"direct": [draw_a]}, zoo / "prompts" / "synthesis.jsonl", zoo / "knowledge" / "questions.jsonl")
    draw = res["methods"]["direct"]["draws"][0]["any_land"]
    assert res["sft_prompts"] is None and draw["sft"] is None and draw["other"] is None
    assert draw["all"]["splits"]["conflict"]["source"] == 2 and draw["own"]["splits"]["conflict"]["source"] == 1
    assert "| direct | SFT | n/a |" in res["markdown"] and "pass --sft-prompts" in res["markdown"]
    elsewhere = _jsonl(tmp_path / "elsewhere" / "sft.jsonl", [{"id": "s", "entity": "Rho"}])
    assert main(["--zoo", str(zoo), "--data", f"direct={draw_a}", "--sft-prompts", str(elsewhere),
                 "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "mechanism.json").read_text())["methods"]["direct"]["draws"][0]["any_land"]
    assert (saved["sft"]["lands"], saved["other"]["lands"], saved["sft"]["splits"]["shared"]["source"]) == (1, 1, 1)
