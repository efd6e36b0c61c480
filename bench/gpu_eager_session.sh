#!/usr/bin/env bash
# The eager packed-vs-fp16 measurements in one GPU call (<= 8 minutes of command time):
#   1. pytest -m gpu on the SDPA backend choice and the grouped/slot code, $PYTEST_FILES (default
#      tests/test_sdpa_backend.py tests/test_dequant_groups.py; PYTEST=0 skips)
#   2. quantsd bench: the eager pair alternating step by step (61 rounds), packed (the default) against
#      fp16-sdpa with $VARIANTS in the same turns (default fp16-sdpa-pytorch,packed-pytorch,packed-modcall:
#      PyTorch's own SDPA backend against the default FlashAttention preference, and packed without the armed
#      call; packed-roots and fp16-sdpa-inspect were measured in session 18), plus the 512² peak
#   3. bench/eager_host_profile.py --machinery-only: the arming's host time isolated and in situ, by part
#      (again with QUANTSD_EAGER_RUNS=0, one group per block, when packed-roots is among the variants and
#      MACHINERY_ROOTS is not 0)
#   3b. bench/eager_host_profile.py (HOSTPROF=0 skips): host ms per step fp16 vs packed and the full cProfile
#      diff by file (where the packed step's extra host time sits)
#   4. bench/max_res.py under a 4 GiB cap (MAXRES=0 skips; MAXRES_CAPS=8 or 4,8 other caps, MAXRES_S its time box)
# Everything lands in $OUT/eager.tar.gz (the device returns at most 8 files: the plot, bench log and max-res
# files are then removed from the loose copy) and a summary on stdout.
set -u
OUT=${OUT:-/tmp/quantsd-out}
R="$OUT/eager"
mkdir -p "$R"
export PYTHONPATH=${PYTHONPATH:-/tmp/site:$PWD}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])"
  # the device copy's git metadata can be stale: QUANTSD_TREE (the commit, passed in the command) names the tree
  echo "tree: ${QUANTSD_TREE:-unknown (set QUANTSD_TREE)}; git says: $(git log --oneline -1 2>/dev/null | cut -c1-60)"; } \
    > "$R/env.txt" 2>&1

if [ "${PYTEST:-1}" = 1 ]; then
  log "pytest -m gpu"
  timeout -k 10 "${PYTEST_S:-120}" $PY -m pytest -v -m gpu -p no:cacheprovider ${PYTEST_FILES:-tests/test_sdpa_backend.py tests/test_dequant_groups.py} \
      > "$R/pytest_gpu.txt" 2>&1
  tail -1 "$R/pytest_gpu.txt"
fi

log "quantsd bench (eager pair, 61 rounds of one step)"
timeout -k 10 "${BENCH_S:-300}" $PY -m quantsd.cli bench -m sd15-arch --recipe recipes/paper-final.yaml --lean \
    --max-res-cap-gb none --only "fp16-sdpa,packed,${VARIANTS:-fp16-sdpa-pytorch,packed-pytorch,packed-modcall}" --eager-pair-rounds 61 \
    --eager-pair-calls 1 -o "$R/bench" > "$R/bench.log" 2>&1
grep -E "taking turns|^\| (fp16|packed)" "$R/bench/report.md" 2>/dev/null

log "eager_host_profile --machinery-only"
timeout -k 10 "${MACHINERY_S:-90}" $PY bench/eager_host_profile.py --machinery-only --out "$R/machinery.json" \
    2>&1 | grep "^machinery" | cut -c1-600
case "${MACHINERY_ROOTS:-1},${VARIANTS:-}," in 1,*packed-roots,*)
  log "eager_host_profile --machinery-only, one group per block (QUANTSD_EAGER_RUNS=0)"
  QUANTSD_EAGER_RUNS=0 timeout -k 10 "${MACHINERY_S:-90}" $PY bench/eager_host_profile.py --machinery-only \
      --out "$R/machinery_roots.json" 2>&1 | grep "^machinery" | cut -c1-600 ;;
esac

if [ "${HOSTPROF:-1}" = 1 ]; then
  log "eager_host_profile (host ms, cProfile diff)"
  timeout -k 10 "${HOSTPROF_S:-90}" $PY bench/eager_host_profile.py --rounds 9 --out "$R/hostprof.json" \
      > "$R/hostprof.log" 2>&1
  grep -E "^\{|by file" "$R/hostprof.log" | cut -c1-900
fi

if [ "${MAXRES:-1}" = 1 ]; then
  log "max_res under ${MAXRES_CAPS:-4} GiB"
  timeout -k 10 "${MAXRES_S:-110}" $PY bench/max_res.py --configs packed --caps "${MAXRES_CAPS:-4}" --lean \
      --time-budget $(( ${MAXRES_S:-110} - 15 )) --out "$R/maxres" > "$R/maxres.log" 2>&1
  grep -E "max_res|GiB: " "$R/maxres.log" | tail -12
fi

(cd "$OUT" && tar czf eager.tar.gz eager)
# the device returns at most 8 files: keep the summaries loose, the rest only in the archive
rm -rf "$R/bench/time_vs_pixels.png" "$R/maxres" "$R/maxres.log" "$R/bench.log" "$R/hostprof.log"
log "done: $OUT/eager.tar.gz"
