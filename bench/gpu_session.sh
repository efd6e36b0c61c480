#!/usr/bin/env bash
# One GPU (H100/H200) session for quantsd's kernels and benchmarks, <= 9 minutes of command time.
#   1. GPU kernel correctness tests (pytest -m gpu: Triton dequant == torch decode, compile, CUDA graphs;
#      PYTEST=0 skips)
#   2. bench/profile_packed.py (PROFILE=0 skips; COMPARE_KERNEL=path times another kernel module too);
#      VAEPEAK=1: bench/vae_peak.py (decode and image peaks: diffusers, lean, lean + banded convs);
#      HOSTOVH=1: bench/dynamo_host_overhead.py (torch.compile's host time per UNet call, full/minimal guards);
#      LAUNCHOVH=1: bench/launch_overhead.py (eager dequant host time per layer; eager UNet steps fp16 / packed
#      per layer / packed grouped);
#      PEAK=1: bench/peak_attribution.py (what is alive at a 512² image's memory peak; lean with LEAN=1)
#   3. scripts/recipe_error.py on sd15-arch for $RECIPES (space-separated; none by default)
#   4. quantsd bench on sd15-arch with recipes/paper-final.yaml (+ baselines), --compile, caps $CAPS (8,4 GiB),
#      s/image also with $SCHEDULERS (default dpm; empty for none); LEAN=1 adds --lean (lean VAE decode,
#      VAE encoder dropped, every configuration); MAXRES_CFG (default sequential,batch2) the CFG modes;
#      COMPILE_GUARDS=minimal compiles both compiled configurations without per-call module guards;
#      ONLY=fp16-sdpa-compiled,packed-compiled runs just those configurations; FUSED=1 first runs
#      bench/tune_fused.py (fused dequant-GEMM per weight-bound layer; FUSED_S seconds) and benches with its
#      tuned launch shapes; PYTEST_FILES / PYTEST_S choose the GPU test files and their time box; DENSE_BELOW=262144 keeps the
#      packed UNet's layers of at most that many weights dense (fewer dequant launches per step)
# Everything lands under $OUT (6 files, 2 levels): env.txt, pytest_gpu.txt, bench.log,
# bench/results.json, bench/report.md, bench/time_vs_pixels.png.  A compact summary goes to stdout.
# Each step is time-boxed; the bench records OOMs/errors per configuration and rewrites its
# JSON/Markdown after every measurement, so a step cut by its timeout still leaves numbers.
set -u
OUT=${OUT:-/tmp/quantsd-out}
mkdir -p "$OUT/bench"
export PYTHONPATH=${PYTHONPATH:-/tmp/site:$PWD}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
TOTAL=${TOTAL_S:-530}          # whole-script budget (seconds), under the 9-minute call limit
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(el)s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
  $PY -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0]); print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  $PY -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
  $PY -c "import pytest; print('pytest', pytest.__version__)" 2>&1 | tail -1
  # the device copy's git metadata can be stale: QUANTSD_TREE (the commit, passed in the command) names the tree
  echo "tree: ${QUANTSD_TREE:-unknown (set QUANTSD_TREE)}; git says: $(git log --oneline -1 2>/dev/null | cut -c1-60)"; } \
    > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- 1. kernel correctness on the GPU (<= 240 s)
log "pytest -m gpu (kernels, CUDA==CPU)"
if [ "${PYTEST:-1}" = 0 ]; then
  echo "skipped (PYTEST=0)" > "$OUT/pytest_gpu.txt"
elif $PY -c "import pytest" 2>/dev/null; then
  timeout -k 10 "${PYTEST_S:-240}" $PY -m pytest -v -m gpu -p no:cacheprovider \
      ${PYTEST_FILES:-tests/test_kernels.py tests/test_quant_cuda.py tests/test_schedulers.py tests/test_dequant_groups.py tests/test_compile_guards.py tests/test_fused.py tests/test_prefetch.py tests/test_sdpa_backend.py} \
      > "$OUT/pytest_gpu.txt" 2>&1
  echo "exit=$?" >> "$OUT/pytest_gpu.txt"
else
  echo "pytest is not importable here: carry it (e.g. pip download pytest pluggy iniconfig packaging -d wheels; unzip into /tmp/site)" | tee "$OUT/pytest_gpu.txt"
fi
grep -E "passed|failed|error|exit=" "$OUT/pytest_gpu.txt" | tail -4
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.txt" | head -8

# ---- 2. where the packed step's time goes (dequant alone, kernel time per eager step; <= 120 s)
if [ "${PROFILE:-1}" = 1 ]; then
  log "bench/profile_packed.py"
  CMP=(); [ -n "${COMPARE_KERNEL:-}" ] && CMP=(--compare "$COMPARE_KERNEL")
  timeout -k 10 120 $PY bench/profile_packed.py --out "$OUT/profile.json" "${CMP[@]}" > "$OUT/profile.log" 2>&1
  echo "profile exit=$?" >> "$OUT/profile.log"; grep -v -i warn "$OUT/profile.log" | tail -30
fi

if [ "${PEAK:-0}" = 1 ]; then
  log "bench/peak_attribution.py"
  timeout -k 10 120 $PY bench/peak_attribution.py --out "$OUT/peak.json" $([ "${LEAN:-0}" = 1 ] && echo --lean) \
      > "$OUT/peak.log" 2>&1
  echo "peak exit=$?" >> "$OUT/peak.log"; grep -v -i warn "$OUT/peak.log" | tail -22
fi

if [ "${VAEPEAK:-0}" = 1 ]; then
  log "bench/vae_peak.py"
  timeout -k 10 150 $PY bench/vae_peak.py --steps 10 --drop-encoder --out "$OUT/vae_peak.json" > "$OUT/vae_peak.log" 2>&1
  echo "vae_peak exit=$?" >> "$OUT/vae_peak.log"; grep -v -i warn "$OUT/vae_peak.log" | tail -8
fi

if [ "${LAUNCHOVH:-0}" = 1 ]; then
  log "bench/launch_overhead.py"
  timeout -k 10 150 $PY bench/launch_overhead.py --out "$OUT/launch_overhead.json" 2>&1 | grep -v -i warn | tail -3
fi

if [ "${FUSED:-0}" = 1 ]; then
  # fused dequant-GEMM vs dequant + op vs dense per weight-bound layer; its tuned launch shapes feed the bench
  log "bench/tune_fused.py"
  timeout -k 10 "${FUSED_S:-200}" $PY bench/tune_fused.py --max-rows "${FUSED_MAX_ROWS:-512}" --time-budget $(( ${FUSED_S:-200} - 60 )) \
      --out "$OUT/fused.json" --configs-out "$OUT/fused_configs.json" 2>&1 | grep -v -i warn | tail -32
  # the bench then fuses the shapes the table measured faster (the path is off by default)
  [ -s "$OUT/fused_configs.json" ] && export QUANTSD_FUSED_CONFIGS="$OUT/fused_configs.json" \
      QUANTSD_FUSED_MAX_M="${FUSED_MAX_ROWS:-512}"
fi

if [ "${HOSTOVH:-0}" = 1 ]; then
  log "bench/dynamo_host_overhead.py"
  timeout -k 10 120 $PY bench/dynamo_host_overhead.py --out "$OUT/dynamo_host_overhead.json" 2>&1 \
      | grep -E "^(dense|packed)" | tee "$OUT/dynamo_host_overhead.log"
fi

# ---- 3. measured error of recipes on sd15-arch against the committed sweep's settings (<= 90 s)
if [ -n "${RECIPES:-}" ]; then
  log "scripts/recipe_error.py $RECIPES"
  timeout -k 10 90 $PY scripts/recipe_error.py --sweep sensitivity/sd15-arch --device cuda --out "$OUT/recipe_errors.json" \
      $RECIPES 2>&1 | grep -v -i -E "warn|it/s" | tail -8
fi

# ---- 4. benchmarks with what is left (>= 240 s)
LEFT=$(( TOTAL - $(el) - 25 ))
[ "$LEFT" -lt 240 ] && LEFT=240
log "quantsd bench (time budget ${LEFT}s)"
timeout -k 15 $(( LEFT + 20 )) $PY -c "from quantsd.cli import main; main()" bench -m sd15-arch \
    --recipe recipes/paper-final.yaml --steps 50 --guidance 7.5 --height 512 --width 512 --compile \
    --max-res-cap-gb "${CAPS:-8,4}" --max-res-cfg "${MAXRES_CFG:-sequential,batch2}" --schedulers "${SCHEDULERS-dpm}" \
    $([ "${LEAN:-0}" = 1 ] && echo --lean) --compile-guards "${COMPILE_GUARDS:-full}" --only "${ONLY:-}" \
    --dense-below "${DENSE_BELOW:-0}" \
    --time-budget "$LEFT" -o "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
echo "bench exit=$?" >> "$OUT/bench.log"

# ---- summary
log "summary"
grep -E "^\s+\S+\.(unet_ms|image|max_res|attention|build|compile)" "$OUT/bench.log" | cut -c1-160 | tail -40
echo; [ -f "$OUT/bench/report.md" ] && cat "$OUT/bench/report.md" | cut -c1-400
tail -3 "$OUT/bench.log"
log "done"
