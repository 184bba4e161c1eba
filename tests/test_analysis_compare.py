"""The comparison table on fixture run directories: expected rows, columns, spreads and verdicts."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill import DistillError
from distill.recipe.compare import COLUMNS, ROW_LABELS, collect_run_dir, compare, verdict

RUN = Path(__file__).parent / "fixtures" / "run_dirs" / "recipe"


def test_rows_columns_and_spread_from_a_recipe_run_dir(tmp_path):
    runs = collect_run_dir(RUN)
    # every row but the three the fixture run has no scores for, in ROW_LABELS' order
    assert list(runs) == [label for key, label in ROW_LABELS.items()
                          if key not in ("direct-masked", "best-of-n", "gold-sft")]
    assert len(runs[ROW_LABELS["codit"]]) == 3
    result = compare(runs, tmp_path, figure=False)
    codit = result["rows"][ROW_LABELS["codit"]]["if_prompt_strict"]
    assert codit["n"] == 3 and codit["mean"] == pytest.approx(0.42) and codit["std"] == pytest.approx(0.02)
    with open(result["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["row"] for r in table] == list(runs)
    assert set(table[0]) == {"row", "n"} | {f"{k}_{s}" for k, *_ in COLUMNS for s in ("mean", "std")}
    md = Path(result["md"]).read_text()
    for _, header, _, _ in COLUMNS:
        assert header in md
    assert "0.420 ± 0.020" in md
    # CoDIT vs direct: IF +0.12 is beyond the spread; own-fact knowledge (−0.01 vs std 0.02) is not.
    by = {(p["a"], p["b"], p["column"]): p["verdict"] for p in result["pairs"]}
    key = (ROW_LABELS["codit"], ROW_LABELS["direct"])
    assert result["pairs"][0]["a"] == ROW_LABELS["codit"]  # the headline pair comes first, CoDIT as a
    assert by[key + ("IF prompt strict",)] == "better"
    assert by[key + ("knowledge (own facts)",)] == "no difference"
    # lower perplexity is better, a conflict share has no better direction
    assert by[key + ("held-out ppl",)] == by[key + ("bits/byte",)] == "worse"
    assert by[key + ("conflicts: source's answer",)] == "lower"


def test_verdict_rules():
    a = {"mean": 0.5, "std": 0.1}
    assert verdict(a, {"mean": 0.45, "std": 0.05}, True)[1] == "no difference"
    assert verdict(a, {"mean": 0.2, "std": 0.05}, True)[1] == "better"
    assert verdict(a, {"mean": 0.2, "std": 0.05}, False)[1] == "worse"
    assert verdict({"mean": 1.0, "std": None}, {"mean": 2.0, "std": None}, True)[1] == "n=1"
    assert verdict({"mean": 1.0, "std": None}, {"mean": 0.5, "std": 0.1}, True)[1] == "better"  # one side has a spread
    # the spread of a difference adds in quadrature: sqrt(0.03² + 0.04²) = 0.05 < 0.06 (a plain sum, 0.07, would not)
    assert verdict({"mean": 0.56, "std": 0.03}, {"mean": 0.5, "std": 0.04}, True)[1] == "better"


def test_missing_and_nan_values_do_not_count():
    from distill.recipe.compare import mean_std as _stats

    assert _stats([0.5, float("nan"), None, 0.7]) == pytest.approx({"n": 2, "mean": 0.6, "std": 0.1414},
                                                                   rel=1e-3)
    assert _stats([]) == {"n": 0, "mean": None, "std": None}


def test_missing_scores_is_a_clear_error(tmp_path):
    with pytest.raises(DistillError, match="no scores at"):
        compare({"x": [str(tmp_path / "nope")]}, tmp_path)


def test_command_line_writes_table_and_figure(tmp_path):
    script = Path(__file__).parents[1] / "analysis" / "compare_transfer.py"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "scores.json").write_text(json.dumps({"if": {"prompt_level_strict": 0.5}}))
    out = subprocess.run([sys.executable, str(script), "--run-dir", str(RUN), "--row", f"extra={model_dir}",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o" / "comparison.png").stat().st_size > 1000
    assert "| extra | 1 | 0.500 |" in (tmp_path / "o" / "comparison.md").read_text()


def test_pooled_run_dirs_count_a_shared_untuned_row_once(tmp_path):
    """Two run directories share the untuned rows' models (each has its own copy, scored with
    its own wall time); each trained its own seeds."""
    script = Path(__file__).parents[1] / "analysis" / "compare_transfer.py"
    runs = [tmp_path / "first", tmp_path / "other"]
    for i, run in enumerate(runs):
        shutil.copytree(RUN, run)
        for scored in (run / "scores").glob("*.json"):
            scores = json.loads(scored.read_text())
            scores.update(model=str(run / "models" / scored.stem), seconds=3.0 + i)
            if i and scored.stem.startswith("codit-seed"):
                scores["if"]["prompt_level_strict"] += 0.1
            scored.write_text(json.dumps(scores))
    out = subprocess.run([sys.executable, str(script), "--run-dir", str(runs[0]), "--run-dir", str(runs[1]),
                          "--out", str(tmp_path / "o"), "--no-figure"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "o" / "comparison.csv") as f:
        n = {r["row"]: int(r["n"]) for r in csv.DictReader(f)}
    assert n[ROW_LABELS["target-base"]] == 1 and n[ROW_LABELS["weight-arithmetic"]] == 1
    assert n[ROW_LABELS["codit"]] == 6  # three seeds from each run
    assert n[ROW_LABELS["direct"]] == 3  # identical scores: the same three models' measurements


def test_mask_ablation_pools_run_dirs_and_scores_the_training_data(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))
    from ablation_mask import data_table, load_run, pooled_comparison

    with pytest.raises(DistillError, match=r"recipe.json not found"):
        load_run(RUN)

    runs = []
    for synth_seed, masked_if in ((0, 0.50), (1, 0.54)):
        run = tmp_path / f"run{synth_seed}"
        shutil.copytree(RUN, run)
        for scored in (run / "scores").glob("*-seed*.json"):  # each synthesis draw trains other models
            scores = json.loads(scored.read_text())
            scores["if"]["prompt_level_strict"] += 0.01 * synth_seed
            scored.write_text(json.dumps(scores))
        for seed in range(3):
            scores = json.loads((run / "scores" / f"direct-seed{seed}.json").read_text())
            scores["if"]["prompt_level_strict"] = masked_if
            (run / "scores" / f"direct-masked-seed{seed}.json").write_text(json.dumps(scores))
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"id": "p0", "instruction": "Shout.", "constraints": [
            {"kind": "uppercase", "kwargs": {}}]}) + "\n" + json.dumps({"id": "p1", "instruction": "Whisper.",
                                                                    "constraints": [{"kind": "lowercase", "kwargs": {}}]}) + "\n")
        (run / "data" / "direct-masked" / "data").mkdir(parents=True)
        (run / "data" / "direct-masked" / "data" / "train.jsonl").write_text(
            json.dumps({"id": "p0", "response": "YES SIR"}) + "\n" + json.dumps({"id": "p1", "response": "Nope"}) + "\n")
        runs.append((run, {"prompts": {"synthesis": str(prompts)}, "synthesis": {"seed": synth_seed}}))

    (runs[0][0] / "recipe.json").write_text("{}")
    shutil.move(runs[0][0] / "scores", tmp_path / "aside")
    with pytest.raises(DistillError, match=r"has no direct-masked row; run the recipe again with it"):
        load_run(runs[0][0])
    shutil.move(tmp_path / "aside", runs[0][0] / "scores")
    assert load_run(runs[0][0]) == {}
    result = pooled_comparison([r for r, _ in runs], tmp_path / "out")
    masked = result["rows"][ROW_LABELS["direct-masked"]]["if_prompt_strict"]
    assert masked["n"] == 6 and masked["mean"] == pytest.approx(0.52)  # both run dirs pooled
    assert result["rows"][ROW_LABELS["codit"]]["if_prompt_strict"]["n"] == 6
    assert result["rows"][ROW_LABELS["target-base"]]["if_prompt_strict"]["n"] == 1  # untuned: counted once
    assert (ROW_LABELS["direct-masked"], ROW_LABELS["direct"]) in {(p["a"], p["b"]) for p in result["pairs"]}
    table = data_table(runs)
    # one of two responses keeps its constraint ("YES SIR" is uppercase, "Nope" is not lowercase)
    assert table.count("| 0.500 | 0.500 |") == 2 and "| 0 | 2 |" in table and "| 1 | 2 |" in table


def _perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    w = load_file(str(dst / "model.safetensors"))
    save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in w.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_models_evaluated_here_explicit_or_from_the_zoo(micro_zoo, tmp_path, one_thread):
    """--target/--post/--tuned with the evaluation files named give the table of the --zoo form."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from analysis.compare_transfer import main

    tuned = [_perturbed_copy(micro_zoo / "target-base", tmp_path / "tuned" / f"codit-{s}", s) for s in (0, 1)]
    elsewhere = tmp_path / "explicit"
    for name in ("target-base", "source-post"):
        shutil.copytree(micro_zoo / name, elsewhere / name)
    common = ["--tuned", "codit=" + ",".join(map(str, tuned)), "--limit", "4", "--max-new-tokens", "4",
              "--no-figure", "--device", "cpu"]
    assert main(["--zoo", str(micro_zoo), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["--target", str(elsewhere / "target-base"), "--post", str(elsewhere / "source-post"),
                 "--prompts", str(micro_zoo / "prompts" / "eval.jsonl"),
                 "--questions", str(micro_zoo / "knowledge" / "questions.jsonl"),
                 "--heldout", str(micro_zoo / "text" / "heldout.jsonl"), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = ((tmp_path / d / "comparison.csv").read_text() for d in "ab")
    assert a == b
    with open(tmp_path / "a" / "comparison.csv") as f:
        table = {r["row"]: r for r in csv.DictReader(f)}
    assert list(table) == [ROW_LABELS["target-base"], ROW_LABELS["codit"], ROW_LABELS["source-post"]]
    assert table[ROW_LABELS["codit"]]["n"] == "2" and table[ROW_LABELS["codit"]]["bits_per_byte_mean"]
    assert sorted(p.name for p in (tmp_path / "a" / "scores").glob("*.json")) == [
        "codit-seed0.json", "codit-seed1.json", "source-post.json", "target-base.json"]


def test_models_without_evaluation_data_is_a_clear_error(tmp_path, capsys):
    script = Path(__file__).parents[1] / "analysis" / "compare_transfer.py"
    out = subprocess.run([sys.executable, str(script), "--target", str(tmp_path), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "models need evaluation data: --zoo ZOO, or --prompts" in out.stderr
    out = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "nothing to compare: give --run-dir RUN" in out.stderr
