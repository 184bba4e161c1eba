#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 still need. The session's device budget (15 min, each start
# included) fits one full call and maybe a short second one, so:
#   bash bench/gpu_session.sh main     # under 10 min (one call, timeout_s 600): what the goals need
#   bash bench/gpu_session.sh extra    # about 7 min, if the budget still allows a start
# Each part has its own time budgets and writes its results as it goes.
#
#   wheels first, in the project venv (the GPU image has no deepspeed/datasets/evaluate):
#     .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson pydantic \
#         pydantic-core annotated-types typing-inspection datasets dill multiprocess evaluate
#   then, through the device tool with carry [".whl"], one part per call.
#   Results land under $OUT (or bench/gpu-results).
#
# Earlier runs: bench/results/2026-11-26-h200/ and bench/results/2026-11-26-h100/ (BENCHMARKS.md).
# main:
# 1. the GPU tests (CUDA graphs against plain kernels and the eager engine; 40 stop ids,
#    FlexAttention decode, compiled layers, the "auto" defaults inside the graph; packed training
#    with FlexAttention against SDPA);
# 2. decoding (issue 4): the full table with the GPU defaults (compiled layers + FlexAttention): HF
#    at 32 and 128, ours at 1, 32, 128 and the largest batch that fits (CoDIT b128 was 5,932 on an
#    H100, before the K/V cache write moved into the compiled layer function);
# 3. training (issue 5), batch 8, each with a profile of two steps: compiled ZeRO-2 with every
#    lever (FlexAttention for the packed rows; DeepSpeed's single-GPU trims: overlap_comm off,
#    since with it on ZeRO-2 synchronises the device after every backward, and the bf16 overflow
#    check off: ~680 small reductions and a host read-back per step), first with 4 batches
#    accumulated per optimizer step (so the step's fixed cost is paid once per 64k tokens), then
#    without; compiled ZeRO-2 as shipped (30.7 % MFU on an H100); and the issue's anchor (`plain`,
#    batch 4), which the goal wants in the same run. Last, only if the budget is left (so, if the
#    FlexAttention lines failed fast): every lever but FlexAttention, at 8x4.
#    Each row has its timed steps' seconds, and a note when torch.compile compiled while timed or
#    one step took > 3x the median; each worker's whole output, with TORCH_LOGS=recompiles (a
#    few lines per recompile, with the guard that failed), is in json-main.tgz as worker-CONFIG.log.
# extra:
# 4. decoding: the synthesis workload (512 rows, lengths up to 800) with SDPA against FlexAttention
#    decode, where reading only live cache blocks should pay most;
# 5. training: the hand loop on packed rows with FlexAttention and with SDPA, so that the gap to
#    the hand loop (45.9 %) splits into DeepSpeed + Trainer against attention over packed rows;
#    then the levers of 3 one at a time (FlexAttention; the DeepSpeed trims).
set -uo pipefail
PART=${1:-main}
case "$PART" in main|extra) ;; *) echo "usage: bash bench/gpu_session.sh main|extra" >&2; exit 2 ;; esac
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

if [ "$PART" = main ]; then
stamp gpu tests
timeout 70 python3 -m pytest -p no:cacheprovider -m gpu tests/test_decoding.py tests/test_train_fused.py \
    --tb=short 2>&1 | tee "$OUT/gpu_tests.txt" | tail -4
stamp decoding
timeout 170 python3 bench/decoding_bench.py --device cuda --budget-s 160 --json "$W/decoding.json" 2>&1 \
    | tee "$OUT/decoding.txt" | grep -E "^\||fast engine|compile"
stamp train
TORCH_LOGS=recompiles timeout 330 python3 bench/train_bench.py --device cuda --steps 12 --budget-s 320 \
    --configs zero2-compile-flex-nooverlap-nocheck@8x4,zero2-compile-flex-nooverlap-nocheck@8,zero2-compile@8,plain,zero2-compile-nooverlap-nocheck@8x4 \
    --profile "$W/train_profiles" --json "$W/train_gpu.json" 2>&1 | tee "$OUT/train.txt" \
    | grep -E "^\||^  [a-z0-9@-]+: "
for f in "$W"/train_profiles/*.txt; do [ -f "$f" ] && { echo "== $(basename "$f")"; cat "$f"; }; done \
    > "$OUT/train_profiles.txt"
else  # extra
stamp mixed
timeout 110 python3 bench/decoding_bench.py --device cuda --workload mixed --batches 128 --rows 512 \
    --mean-length 200 --skip-hf --decode-attention sdpa,flex --refill-mins auto --budget-s 100 \
    --json "$W/decoding_mixed.json" 2>&1 | tee "$OUT/decoding_mixed.txt" | grep -E "^\||mixed"
stamp train
TORCH_LOGS=recompiles timeout 270 python3 bench/train_bench.py --device cuda --steps 12 --budget-s 260 \
    --configs fast-packed-flex@8,fast-packed@8,zero2-compile-flex@8,zero2-compile-nooverlap-nocheck@8 \
    --json "$W/train_gpu_extra.json" 2>&1 | tee "$OUT/train_extra.txt" | grep -E "^\||^  [a-z0-9@-]+: "
fi
stamp done
tar czf "$OUT/json-$PART.tgz" -C "$W" . && echo "results in $OUT"
