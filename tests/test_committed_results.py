"""The committed results of the tiny world answer what issue #18 asks of them (read, not rerun:
`analysis/run_tiny.sh` makes them; tests/test_world_record.py ties the world to this code)."""

import csv
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "analysis" / "results"


def _rows(path: Path) -> dict:
    with path.open(newline="") as f:
        return {r["row"]: r for r in csv.DictReader(f)}


def test_the_comparison_has_the_gold_row_and_direct_data_carries_half_the_teachers_gain():
    rows = _rows(RESULTS / "compare" / "comparison.csv")
    gold = rows["target + SFT on the teacher's own SFT data (text-route ceiling)"]
    assert int(gold["n"]) == 3
    base = float(rows["target base (no tuning)"]["if_prompt_strict_mean"])
    teacher = float(rows["source post (teacher, upper bound)"]["if_prompt_strict_mean"])
    direct = float(rows["target + SFT on direct responses"]["if_prompt_strict_mean"])
    assert teacher - base > 0.2  # a gain worth carrying
    assert (direct - base) / (teacher - base) >= 0.5


def test_the_dose_study_is_the_full_design_with_its_command_and_time():
    dose = json.loads((RESULTS / "dose" / "dose.json").read_text())
    sizes = dose["sizes"]
    assert len(sizes) >= 3 and max(sizes) >= 10 * min(sizes)
    assert {"codit", "direct", "direct-masked"} <= set(dose["methods"])
    assert len(dose["seeds"]) >= 3 and len(dose["draws"]) >= 2 and not dose["notes"]
    for m in dose["methods"]:
        for n in sizes:
            point = dose["points"][m][str(n)]
            assert point["runs"] == len(dose["seeds"]) * len(dose["draws"])
            assert point["if_prompt_strict"]["sd"] is not None
    assert len(dose["runs"]) == len(dose["methods"]) * len(sizes) * len(dose["seeds"]) * len(dose["draws"])
    assert dose["command"].startswith("python analysis/dose_study.py") and 0 < dose["work_seconds"] < 90 * 60
    assert all(dose["power"][str(n)]["if_prompt_strict"]["runs"]["mde"] > 0 for n in sizes)
    mech = json.loads((RESULTS / "dose" / "mechanism.json").read_text())
    assert set(mech["methods"]) == set(dose["methods"])
    assert (RESULTS / "dose" / "dose.png").stat().st_size > 0
