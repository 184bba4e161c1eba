#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 need, in priority order, in ONE device call (< 10 min;
# each part has its own time budget and writes its results as it goes).
#
#   wheels first, in the project venv (the GPU image has no deepspeed/datasets/evaluate):
#     .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson pydantic \
#         pydantic-core annotated-types typing-inspection datasets dill multiprocess evaluate
#   then, through the device tool with carry [".whl"]:
#     bash bench/gpu_session.sh            # results under $OUT (or bench/gpu-results)
#
# 1. decoding (issue 4): ours (direct, CoDIT) at batch 1, 32, 128 and growing until the budget,
#    beside HF generate direct and with the contrastive LogitsProcessor at 32 and 128;
# 2. training (issue 5): the plain anchor, the fused loss at batch 8, Trainer + ZeRO-2, ZeRO-3,
#    and the Trainer without DeepSpeed (the budget skips the last ones first);
# 3. the synthesis workload with refills (refill_min 1 vs batch/16: the GPU default's A/B);
# 4. the CUDA-only test (CUDA graphs vs plain kernels vs the eager engine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-results}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PWD
fi
stamp() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu.txt"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, deepspeed, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

stamp decoding fixed
timeout 185 python3 bench/decoding_bench.py --device cuda --batches 1,32,128,max --hf-batches 32,128 \
    --budget-s 160 --json "$OUT/decoding_fixed.json" 2>&1 | tee "$OUT/decoding_fixed.txt" | grep -E "^\||^#|fast engine"
stamp train
timeout 250 python3 bench/train_bench.py --device cuda --configs plain,fast@8,zero2,zero3,trainer --steps 20 \
    --budget-s 240 --json "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train.txt" | grep -E "^\||^  [a-z0-9@-]+: "
stamp mixed
timeout 80 python3 bench/decoding_bench.py --device cuda --workload mixed --batches 128 --rows 256 \
    --mean-length 200 --skip-hf --budget-s 60 --json "$OUT/decoding_mixed.json" 2>&1 \
    | tee "$OUT/decoding_mixed.txt" | grep -E "^\||mixed"
stamp gpu test
timeout 40 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decoding.py 2>&1 | tail -3 | tee "$OUT/pytest_gpu.txt"
stamp done
echo "results in $OUT"
