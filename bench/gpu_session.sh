#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 still need, in ONE device call (about 8.5 min; each part has
# its own time budget and writes its results as it goes).
#
#   wheels first, in the project venv (the GPU image has no deepspeed/datasets/evaluate):
#     .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson pydantic \
#         pydantic-core annotated-types typing-inspection datasets dill multiprocess evaluate
#   then, through the device tool with carry [".whl"]:
#     bash bench/gpu_session.sh            # results under $OUT (or bench/gpu-results)
#
# Earlier runs: bench/results/2026-11-26-h200/ and bench/results/2026-11-26-h100/ (BENCHMARKS.md).
# What is still open after them, in this order:
# 1. the GPU tests (CUDA graphs against plain kernels and the eager engine; 40 stop ids,
#    FlexAttention decode, compiled layers, and the "auto" defaults inside the graph);
# 2. decoding (issue 4): the synthesis workload (512 rows, lengths up to 800) with SDPA against
#    FlexAttention decode, where reading only live cache blocks should pay most;
# 3. decoding: the full table with the GPU defaults (compiled layers + FlexAttention): HF at 32 and
#    128, ours at 1, 32, 128 and the largest batch that fits (CoDIT b128 was 5,932 on an H100,
#    before the K/V cache write moved into the compiled layer function);
# 4. training (issue 5): a profile of ZeRO-2 with compiled layers at batch 8 (30.7 % MFU on an
#    H100, against 45.9 % for the hand loop with the same levers): where the gap goes.
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

stamp gpu tests
timeout 80 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decoding.py --tb=short 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -4
stamp mixed
timeout 120 python3 bench/decoding_bench.py --device cuda --workload mixed --batches 128 --rows 512 \
    --mean-length 200 --skip-hf --decode-attention sdpa,flex --refill-mins auto --budget-s 110 \
    --json "$W/decoding_mixed.json" 2>&1 | tee "$OUT/decoding_mixed.txt" | grep -E "^\||mixed"
stamp decoding
timeout 170 python3 bench/decoding_bench.py --device cuda --budget-s 160 --json "$W/decoding.json" 2>&1 \
    | tee "$OUT/decoding.txt" | grep -E "^\||fast engine|compile"
stamp train
timeout 130 python3 bench/train_bench.py --device cuda --configs zero2-compile@8 --steps 15 --budget-s 120 \
    --profile "$W/train_profiles" --json "$W/train_gpu.json" 2>&1 | tee "$OUT/train.txt" \
    | grep -E "^\||^  [a-z0-9@-]+: "
cat "$W"/train_profiles/*.txt > "$OUT/train_profiles.txt" 2>/dev/null
stamp done
tar czf "$OUT/json.tgz" -C "$W" . && echo "results in $OUT"
