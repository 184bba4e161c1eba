#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 still need, in ONE device call (about 6 min; each part has
# its own time budget and writes its results as it goes).
#
#   wheels first, in the project venv (the GPU image has no deepspeed/datasets/evaluate):
#     .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson pydantic \
#         pydantic-core annotated-types typing-inspection datasets dill multiprocess evaluate
#   then, through the device tool with carry [".whl"]:
#     bash bench/gpu_session.sh            # results under $OUT (or bench/gpu-results)
#
# Earlier runs: bench/results/2026-11-26-h200/ and bench/results/2026-11-26-h100/ (BENCHMARKS.md).
# 1. the GPU tests (CUDA graphs against plain kernels and the eager engine; 40 stop ids,
#    FlexAttention decode and compiled layers inside the graph);
# 2. decoding (issue 4): CoDIT against the LogitsProcessor way at batch 128, ours with the
#    default compiled layers, SDPA and FlexAttention decode;
# 3. training (issue 5): ZeRO-2 with the regional compile at batch 8, with HF's "auto" reduce
#    bucket and with a 5e8 one.
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
timeout 70 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decoding.py --tb=short 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -4
stamp decoding b128
timeout 110 python3 bench/decoding_bench.py --device cuda --batches 128 --hf-batches 128 --hf-methods contrast \
    --decode-attention sdpa,flex --budget-s 100 --json "$W/decoding.json" 2>&1 | tee "$OUT/decoding.txt" \
    | grep -E "^\||fast engine|compile"
stamp train
timeout 200 python3 bench/train_bench.py --device cuda --configs zero2-compile@8,zero2-compile-bucket@8 --steps 15 \
    --budget-s 190 --json "$W/train_gpu.json" 2>&1 | tee "$OUT/train.txt" | grep -E "^\||^  [a-z0-9@-]+: "
stamp done
tar czf "$OUT/json.tgz" -C "$W" . && echo "results in $OUT"
