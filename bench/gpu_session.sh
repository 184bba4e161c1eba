#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 still need, in TWO device calls (each part has its own time
# budget and writes its results as it goes):
#   bash bench/gpu_session.sh decoding    # about 6 min: parts 1-3 below
#   bash bench/gpu_session.sh training    # about 6 min: part 4
#
#   wheels first, in the project venv (the GPU image has no deepspeed/datasets/evaluate):
#     .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson pydantic \
#         pydantic-core annotated-types typing-inspection datasets dill multiprocess evaluate
#   then, through the device tool with carry [".whl"], one part per call.
#   Results land under $OUT (or bench/gpu-results).
#
# Earlier runs: bench/results/2026-11-26-h200/ and bench/results/2026-11-26-h100/ (BENCHMARKS.md).
# What is still open after them, in this order:
# 1. the GPU tests (CUDA graphs against plain kernels and the eager engine; 40 stop ids,
#    FlexAttention decode, compiled layers, the "auto" defaults inside the graph; packed training
#    with FlexAttention against SDPA);
# 2. decoding (issue 4): the synthesis workload (512 rows, lengths up to 800) with SDPA against
#    FlexAttention decode, where reading only live cache blocks should pay most;
# 3. decoding: the full table with the GPU defaults (compiled layers + FlexAttention): HF at 32 and
#    128, ours at 1, 32, 128 and the largest batch that fits (CoDIT b128 was 5,932 on an H100,
#    before the K/V cache write moved into the compiled layer function);
# 4. training (issue 5), batch 8, each with a profile of two steps: ZeRO-2 with compiled layers
#    (30.7 % MFU on an H100), the same with FlexAttention for the packed rows, the same with
#    DeepSpeed's single-GPU trims (overlap_comm off: with it on, ZeRO-2 synchronises the device
#    after every backward; bf16 overflow check off: ~680 small reductions and a host read-back
#    per step),
#    and the hand loop on packed rows with SDPA and with FlexAttention, so that the gap to the hand
#    loop (45.9 %) splits into DeepSpeed + Trainer against attention over packed rows.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-results}
export PYTHONUNBUFFERED=1
W=/tmp/gpu-session  # JSON results; tarred into $OUT at the end (the tool returns <= 8 files)
mkdir -p "$OUT" "$W"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PWD
fi
stamp() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu.txt"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, deepspeed, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

PART=${1:-decoding}
if [ "$PART" = decoding ]; then
stamp gpu tests
timeout 100 python3 -m pytest -p no:cacheprovider -m gpu tests/test_decoding.py tests/test_train_fused.py \
    --tb=short 2>&1 | tee "$OUT/gpu_tests.txt" | tail -4
stamp mixed
timeout 110 python3 bench/decoding_bench.py --device cuda --workload mixed --batches 128 --rows 512 \
    --mean-length 200 --skip-hf --decode-attention sdpa,flex --refill-mins auto --budget-s 100 \
    --json "$W/decoding_mixed.json" 2>&1 | tee "$OUT/decoding_mixed.txt" | grep -E "^\||mixed"
stamp decoding
timeout 170 python3 bench/decoding_bench.py --device cuda --budget-s 160 --json "$W/decoding.json" 2>&1 \
    | tee "$OUT/decoding.txt" | grep -E "^\||fast engine|compile"
elif [ "$PART" = training ]; then
stamp train
timeout 330 python3 bench/train_bench.py --device cuda --steps 15 --budget-s 320 \
    --configs zero2-compile@8,zero2-compile-flex@8,zero2-compile-nooverlap-nocheck@8,fast-packed@8,fast-packed-flex@8 \
    --profile "$W/train_profiles" --json "$W/train_gpu.json" 2>&1 | tee "$OUT/train.txt" \
    | grep -E "^\||^  [a-z0-9@-]+: "
cat "$W"/train_profiles/*.txt > "$OUT/train_profiles.txt" 2>/dev/null
else
    echo "usage: bash bench/gpu_session.sh decoding|training" >&2; exit 2
fi
stamp done
tar czf "$OUT/json-$PART.tgz" -C "$W" . && echo "results in $OUT"
