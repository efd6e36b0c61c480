#!/usr/bin/env bash
# One GPU call: dequant launch-shape tuning, the fixture eval table's generation (1024 prompts, every
# shipped recipe), and the sd15-arch speed/size columns.  Everything lands under $OUT in <= 8 files:
#   results.tgz   tune_dequant.json, recipe_speed.json, logs
#   cache.tgz (+ runs/fp32), run_<name>.tgz   the eval stores (images + latents), to be scored where the Inception
#                 weights are: FEATURES_ONLY=1 bash eval/fixture.sh /tmp/fxgpu 1024 (same OUTROOT path)
set -u
OUT=${OUT:-/tmp/quantsd-out}
R=/tmp/results; mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
T0=$(date +%s); log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$R/env.txt"
log "tune_dequant"
timeout -k 10 90 $PY bench/tune_dequant.py --out "$R/tune_dequant.json" 2>&1 | grep -v -i warn | tee "$R/tune.log" | tail -14
log "eval/fixture.sh (generation; INCEPTION=none)"
INCEPTION=none BATCH=128 PY=$PY timeout -k 10 ${EVAL_S:-240} bash eval/fixture.sh /tmp/fxgpu 1024 > "$R/eval.log" 2>&1
echo "eval exit=$?" | tee -a "$R/eval.log"; grep -E "^\|" "$R/eval.log" | tail -8
log "recipe_speed"
timeout -k 10 ${SPEED_S:-150} $PY bench/recipe_speed.py -m sd15-arch recipes/w8-pwlq.yaml recipes/paper-final.yaml \
    sensitivity/sd15-arch/searched-600mb.yaml recipes/w4-pwlq.yaml --out "$R/recipe_speed.json" 2>&1 \
    | grep -v -i -E "warn|float32" | tee "$R/speed.log" | tail -8
log "pack"
tar czf "$OUT/results.tgz" -C /tmp results
( cd /tmp/fxgpu && tar czf "$OUT/cache.tgz" cache runs/fp32 && for r in runs/*; do [ "$r" = runs/fp32 ] || tar czf "$OUT/run_$(basename "$r").tgz" "$r"; done )
ls -la "$OUT"; log done
