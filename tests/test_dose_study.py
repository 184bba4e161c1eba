"""analysis/dose_study.py on the micro world: a reduced study, its outputs, the nesting claim, resume."""

import copy
import csv
import json
import sys
from pathlib import Path
from statistics import NormalDist

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from analysis.dose_report import aggregate, pooled_mde  # noqa: E402
from analysis.dose_study import RECIPE, main  # noqa: E402

SETTINGS = ["train.deepspeed=none", "train.epochs=1", "synthesis.max_new_tokens=8", "evaluate.max_new_tokens=8"]


def _args(zoo, out, sizes="4,8"):
    args = ["--zoo", str(zoo), "--out", str(out), "--sizes", sizes, "--seeds", "0", "--draws", "0",
            "--methods", "codit,direct", "--limit-eval", "8"]
    return args + [x for s in SETTINGS for x in ("--set", s)]


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_reduced_study_writes_every_table_and_a_rerun_skips_finished_runs(micro_zoo, tmp_path, one_thread,
                                                                         monkeypatch):
    out = tmp_path / "dose"
    assert main(_args(micro_zoo, out)) == 0
    result = json.loads((out / "dose.json").read_text())
    assert result["sizes"] == [4, 8] and result["methods"] == ["codit", "direct"] and result["seeds"] == [0]
    assert set(result["machine"]) >= {"platform", "cpu_count", "torch"} and result["wall_seconds"] > 0
    assert "analysis/dose_study.py" in result["command"] and "--sizes 4,8" in result["command"]
    for m in ("codit", "direct"):
        for n in (4, 8):
            point = result["points"][m][str(n)]
            assert point["runs"] == 1 and point["rows"]["mean"] == n
            assert point["if_prompt_strict"]["n"] == 1 and point["if_prompt_strict"]["sd"] is None
            run = json.loads((out / "runs" / m / f"n{n}-draw0-seed0.json").read_text())
            assert run["rows"] == n and run["rows_trained"] == n  # micro rows are short: none dropped
            scores = json.loads(Path(run["scores"]).read_text())
            assert run["metrics"]["if_prompt_strict"] == scores["if"]["prompt_level_strict"]
            assert scores["if"]["prompts"] == 8 and "ppl" not in scores  # the study's suites, --limit-eval
            assert not (out / "models" / f"{m}-n{n}-draw0-seed0").exists()  # removed once scored
    # One run per point: no spread, so no detectable difference can be stated.
    for n in ("4", "8"):
        assert all(v["runs"]["mde"] is None and v["draws"]["mde"] is None for v in result["power"][n].values())
    md = (out / "dose.md").read_text()
    assert "| codit | 8 | 1 | 8 |" in md and "| 8 | IF prompt strict | n/a | n/a | n/a | n/a |" in md
    assert "below the study's design" in md and "## The data itself" in md
    with open(out / "dose.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["row"], r["size"]) for r in table] == [("codit", "4"), ("codit", "8"), ("direct", "4"),
                                                      ("direct", "8"), ("target-base", ""), ("source-post", "")]
    assert (out / "dose.png").stat().st_size > 0
    teacher = json.loads((out / "runs" / "reference" / "source-post.json").read_text())
    assert teacher["metrics"]["if_prompt_strict"] == result["reference"]["source-post"]["metrics"]["if_prompt_strict"]
    mech = json.loads((out / "mechanism.json").read_text())
    assert [d["rows"] for d in mech["methods"]["codit"]["draws"]] == [8]  # the largest set of each draw
    assert mech["methods"]["codit"]["summary"]["student.knowledge_own"]["n"] == 1

    # The sizes nest: size 4 is the first 4 prompts' rows of the size-8 set, and what a size-4 synthesis gives.
    prompt_ids = [r["id"] for r in _rows(micro_zoo / "prompts" / "synthesis.jsonl")]
    big = _rows(out / "data" / "codit-draw0" / "data" / "train.jsonl")
    small = _rows(out / "subsets" / "codit-draw0-n4.jsonl")
    assert [r["id"] for r in big] == prompt_ids[:8] and small == big[:4]
    from distill.recipe.schema import load_recipe, resolve_references, synthesize_config
    from distill.synthesize.run import synthesize

    recipe = resolve_references(load_recipe(RECIPE, SETTINGS), str(micro_zoo))
    alone = copy.deepcopy(recipe)
    alone.prompts.limit, alone.synthesis.seed = 4, 0
    synthesize(synthesize_config(alone, "codit", str(tmp_path / "alone")))
    assert [(r["id"], r["response"]) for r in _rows(tmp_path / "alone" / "data" / "train.jsonl")] == \
        [(r["id"], r["response"]) for r in small]

    # A rerun does no work: no synthesis, training or evaluation, and the same tables.
    before = (out / "dose.csv").read_text()
    for target in ("distill.synthesize.run.synthesize", "distill.train.run.train", "distill.evaluate.run.run_evaluation"):
        monkeypatch.setattr(target, lambda *a, **k: pytest.fail("a finished run was redone"))
    assert main(_args(micro_zoo, out)) == 0
    assert (out / "dose.csv").read_text() == before


def test_sizes_beyond_the_prompt_set_are_refused_in_one_line(micro_zoo, tmp_path, capsys):
    assert main(_args(micro_zoo, tmp_path / "dose", sizes="8,1000")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "24 usable prompts" in err and "--sizes up to 24" in err
    assert not (tmp_path / "dose" / "runs").exists()


def test_the_power_rule_is_computed_from_the_measured_spread():
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.80)
    got = pooled_mde([{"n": 3, "sd": 0.1}, {"n": 3, "sd": 0.2}, {"n": 1, "sd": None}])
    assert got["sd"] == pytest.approx((0.025) ** 0.5) and got["n"] == pytest.approx(3)
    assert got["mde"] == pytest.approx(z * 0.025 ** 0.5 * (2 / 3) ** 0.5)
    assert pooled_mde([{"n": 1, "sd": None}]) == {"sd": None, "n": None, "mde": None}
    # 2 draws x 2 seeds: the run spread and the spread of the per-draw means
    records = [{"method": "codit", "size": 10, "draw": d, "seed": s, "rows": 10,
                "metrics": {"if_prompt_strict": x, "if_prompt_loose": x, "knowledge_own": None,
                            "conflict_source_way": 0.5}}
               for (d, s), x in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [0.1, 0.3, 0.5, 0.7])]
    point = aggregate(records, ["codit"], [10])["codit"][10]
    assert point["runs"] == 4 and point["if_prompt_strict"]["mean"] == pytest.approx(0.4)
    assert point["if_prompt_strict"]["sd"] == pytest.approx((0.2 / 3) ** 0.5)
    assert point["draw_means"]["if_prompt_strict"]["sd"] == pytest.approx(0.4 / 2 ** 0.5)  # means 0.2 and 0.6
    assert point["knowledge_own"]["n"] == 0 and point["conflict_source_way"]["sd"] == 0.0
