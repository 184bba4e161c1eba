#!/usr/bin/env bash
# Reproduce analysis/results/ on the embedded tiny world (2 CPU cores; a GPU is faster).
#   analysis/run_tiny.sh [RUN_DIR] [OUT_DIR]
# 1. the tiny zoo (cached) and the recipe's run: synthesis, SFT over 3 seeds, chat vector, evaluation;
# 2. the comparison table; 3. the theory experiments T1-T4; 4. the mask ablation, over the
# recipe's run and a second run with another synthesis seed; 5. T2 over more seeds and that second draw;
# 6. the dose study (analysis/dose_study.py) with the mechanism count.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${1:-runs/analysis-tiny}
OUT=${2:-analysis/results}
ZOO=$($PY -m distill.cli zoo build --preset tiny | tail -n 1)
echo "zoo: $ZOO"
METHODS="synthesis.methods=[codit, direct, direct-masked]"
$PY -m distill.cli run recipes/tiny.yaml --set run_dir="$RUN" --set "$METHODS"
$PY analysis/compare_transfer.py --run-dir "$RUN" --out "$OUT/compare" --title "Tiny world: transfer of instruction following"
$PY analysis/theory t1 --zoo "$ZOO" --out "$OUT/theory" --prompts 48 --max-new-tokens 64
$PY analysis/theory t3 --zoo "$ZOO" --run-dir "$RUN" --out "$OUT/theory" --pairs 128
$PY analysis/theory t2 --zoo "$ZOO" --run-dir "$RUN" --out "$OUT/theory" --work "$RUN/theory-t2" --epochs 3
$PY analysis/theory t4 --zoo "$ZOO" --out "$OUT/theory" --work "$RUN/theory-t4" \
    --betas 0,0.5,1,1.5 --alphas 0.1 --limit 150 --epochs 8 --eval-limit 100
$PY -m distill.cli run recipes/tiny.yaml --set run_dir="$RUN-synth1" --set synthesis.seed=1 --set "$METHODS"
$PY analysis/ablation_mask.py --run-dir "$RUN" --run-dir "$RUN-synth1" --out "$OUT/ablation_mask"
# T2's spread: two more training seeds on the first draw, three on the second (about 20 s each)
for spec in "$RUN:1" "$RUN:2" "$RUN-synth1:0" "$RUN-synth1:1" "$RUN-synth1:2"; do
    run=${spec%:*}; seed=${spec##*:}
    $PY analysis/theory t2 --zoo "$ZOO" --run-dir "$run" --out "$OUT/theory/t2_seeds/$(basename "$run")-seed$seed" \
        --work "$run/theory-t2-seed$seed" --epochs 3 --seed "$seed"
done
# 6. dose and power (with the mechanism count in the data): 3 sizes x 3 methods x 2 draws x 3 seeds
$PY analysis/dose_study.py --out "$RUN-dose"
mkdir -p "$OUT/dose" && cp "$RUN-dose"/dose.{md,csv,json,png} "$RUN-dose"/mechanism.{md,json} "$OUT/dose/"
