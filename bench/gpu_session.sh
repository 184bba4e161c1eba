#!/usr/bin/env bash
# The GPU measurements issues 4 and 5 still need, in priority order, in ONE device call (< 10 min;
# each part has its own time budget and writes its results as it goes).
#
#   wheels first, in the project venv (the GPU image has no deepspeed/datasets/evaluate):
#     .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 hjson pydantic \
#         pydantic-core annotated-types typing-inspection datasets dill multiprocess evaluate
#   then, through the device tool with carry [".whl"]:
#     bash bench/gpu_session.sh            # results under $OUT (or bench/gpu-results)
#
# Last run: 2026-11-26 on an H200 (bench/results/2026-11-26-h200/, read in BENCHMARKS.md). What is
# still open after it:
# 1. decoding (issue 4): where the step's ~10 ms of non-bandwidth time goes (profile: graph with
#    and without the token choice, with compiled layers, kernels per step, top kernels);
# 2. decoding: CoDIT vs the LogitsProcessor way at batch 128, ours with SDPA and with FlexAttention
#    decode, then ours with --compile-layers (the two opt-in levers, off by default until measured);
# 3. the synthesis workload (512 rows, responses up to 800 tokens): SDPA against FlexAttention
#    decode, where reading only live cache blocks should matter most;
# 4. training (issue 5): profiles of one Trainer step without DeepSpeed and with ZeRO-2 (GPU busy
#    against wall time, top kernels), and ZeRO-2 with the regional compile at batch 8;
# 5. the GPU tests: CUDA graphs against plain kernels and the eager engine, also with 40 stop ids,
#    FlexAttention decode and compiled layers inside the graph.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-results}
export PYTHONUNBUFFERED=1
W=/tmp/gpu-session  # JSON and per-config profiles; tarred into $OUT at the end (the tool returns <= 8 files)
mkdir -p "$OUT" "$W"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
    export PYTHONPATH=/tmp/site:$PWD
fi
stamp() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu.txt"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, deepspeed, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

stamp profile decoding
timeout 80 python3 bench/profile_decoding.py --batch 128 --compile-layers 2>&1 | tee "$OUT/profile_decoding.txt" \
    | grep -E "ms$|kernels per step"
stamp decoding b128
timeout 100 python3 bench/decoding_bench.py --device cuda --batches 128 --hf-batches 128 --decode-attention sdpa,flex \
    --budget-s 85 --json "$W/decoding_fixed.json" 2>&1 | tee "$OUT/decoding.txt" | grep -E "^\||fast engine"
timeout 60 python3 bench/decoding_bench.py --device cuda --batches 128 --skip-hf --compile-layers --budget-s 45 \
    --json "$W/decoding_compiled.json" 2>&1 | tee -a "$OUT/decoding.txt" | grep -E "^\||fast engine"
stamp mixed
timeout 80 python3 bench/decoding_bench.py --device cuda --workload mixed --batches 128 --rows 512 \
    --mean-length 200 --skip-hf --decode-attention sdpa,flex --refill-mins auto --budget-s 60 \
    --json "$W/decoding_mixed.json" 2>&1 | tee "$OUT/decoding_mixed.txt" | grep -E "^\||mixed"
stamp train
timeout 190 python3 bench/train_bench.py --device cuda --configs trainer,zero2,zero2-compile@8 --steps 20 \
    --budget-s 180 --profile "$W/train_profiles" --json "$W/train_gpu.json" 2>&1 | tee "$OUT/train.txt" \
    | grep -E "^\||^  [a-z0-9@-]+: "
cat "$W"/train_profiles/*.txt > "$OUT/train_profiles.txt" 2>/dev/null
stamp gpu tests
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decoding.py 2>&1 | tail -5 | tee -a "$OUT/gpu.txt"
stamp done
tar czf "$OUT/json_and_profiles.tgz" -C "$W" . && echo "results in $OUT"
