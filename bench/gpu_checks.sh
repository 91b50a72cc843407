#!/usr/bin/env bash
# The GPU figures of `make bench`, for a bare GPU machine (torch, numpy, safetensors only):
#   OUT=/some/dir bash bench/gpu_checks.sh
# writes model_load.json and gpu_busy.json (and their progress logs) under $OUT.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUT/gpu.txt"
python3 bench/model_load.py --device cuda --size-mb 2048 --rounds 3 --json \
    --sweep-warm 8:64:2,12:64:2,16:64:2,16:32:2,16:32:4,16:16:4,12:128:2,8:32:4 > "$OUT/model_load.json" 2> "$OUT/model_load.log"
python3 bench/gpu_busy.py --device cuda --json 2> "$OUT/gpu_busy.log" > "$OUT/gpu_busy.json"
cat "$OUT/model_load.json"; echo; cat "$OUT/gpu_busy.json"
