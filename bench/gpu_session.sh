#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 still need, in priority order, in ONE device call (< 10 min
# on an H100; each part has its own time budget and writes its results as it goes).
#
#   wheels first, in the project venv (the GPU image has no deepspeed/datasets/evaluate):
#     .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson pydantic \
#         pydantic-core annotated-types typing-inspection datasets dill multiprocess evaluate
#   then, through the device tool with carry [".whl"]:
#     bash bench/gpu_session.sh            # results under $OUT (or bench/gpu-results)
#
# 1. decoding: where the CoDIT step's time goes (graph with/without the token choice, kernels);
# 2. decoding: CoDIT vs the LogitsProcessor way at batch 128 (issue 4's headline), then the
#    synthesis workload with refills (refill_min 1 vs batch/16);
# 3. training (the configurations in priority order; the budget skips the last): the anchor beside the Trainer paths after the autocast and DDP fixes, ZeRO-2's
#    bucket suspect, and the fused loss at batch 8 (issue 5's MFU goal).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

timeout 90 python3 bench/profile_decoding.py --batch 128 2>&1 | tee "$OUT/profile_decoding.txt" | grep -E "ms$"
timeout 140 python3 bench/decoding_bench.py --device cuda --batches 128 --hf-batches 128 --budget-s 120 \
    --json "$OUT/decoding_fixed.json" 2>&1 | grep -E "^\||fast engine" | tee "$OUT/decoding_fixed.txt"
timeout 100 python3 bench/decoding_bench.py --device cuda --workload mixed --batches 128 --rows 256 \
    --mean-length 200 --skip-hf --budget-s 85 --json "$OUT/decoding_mixed.json" 2>&1 \
    | grep -E "^\||mixed" | tee "$OUT/decoding_mixed.txt"
timeout 220 python3 bench/train_bench.py --device cuda --configs plain,fast@8,trainer,zero2 --steps 20 \
    --budget-s 210 --json "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train.txt" | grep -E "^\|"
echo "results in $OUT"
