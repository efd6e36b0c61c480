#!/usr/bin/env bash
# GPU call: the committed fixture sensitivity sweeps + the sd15-arch sweep timing benchmark.
# Run from the repo root on the GPU machine with PYTHONPATH=/tmp/site:$PWD (carried wheels).
# Everything lands in $OUT/sweeps.tar (+ logs), since a call returns at most 8 files.
set -o pipefail
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/sw
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$O/gpu.txt"
# 1. the default sweep of the fixture (DESIGN defaults; guidance 5 as the fixture is evaluated)
( time python3 -m quantsd.cli sensitivity --guidance 5 --device cuda -o /tmp/sw/fixture ) 2>&1 | tail -3 | tee -a "$O/log.txt"
# 2. a richer sweep for the mixed-precision search: per-channel scales, 2..8 bits
( time python3 -m quantsd.cli sensitivity --guidance 5 --device cuda --methods uniform,pwlq --bits 2,3,4,6,8 \
    --granularity channel -o /tmp/sw/fixture-channel ) 2>&1 | tail -3 | tee -a "$O/log.txt"
( time python3 -m quantsd.cli sensitivity --guidance 5 --device cuda --methods uniform,pwlq --bits 2,3,4,6,8 \
    --granularity tensor -o /tmp/sw/fixture-tensor ) 2>&1 | tail -3 | tee -a "$O/log.txt"
(cd /tmp/sw && tar cf "$O/sweeps.tar" --exclude='reference.safetensors' .)
# 3. sd15-arch: how long would the full default sweep take? (timed sample + extrapolation)
timeout 300 python3 bench/sensitivity_sd15.py --dtype float16 --budget-s 150 --out "$O/sd15_sweep_fp16.json" 2>&1 \
  | grep -v -i warn | tail -40 | tee "$O/sd15.log"
ls -la "$O"
