#!/usr/bin/env bash
# Evaluate the fixture fp32 pipeline and every shipped recipe (recipes/*.yaml, exported from the
# fixture) on N held-out fixture prompts; write one paper-style table to OUTROOT/README.md.
#
#   bash eval/fixture.sh OUTROOT [N=1024]
#
# Env: PY (python, default python3), STEPS (25), GUIDANCE (5, as the fixture was trained),
#      BATCH (128), INCEPTION (a path / fid-helper / torch-fidelity / none; default: fid-helper's
#      file if installed, else none), FEATURES_ONLY=1 (never generate: score images already in
#      OUTROOT, e.g. made on a GPU machine with INCEPTION=none), LAUNCH (prefix such as
#      "torchrun --nproc_per_node 4" or "accelerate launch --multi_gpu --num_processes 4").
# Re-running resumes: finished images, the reference cache and features are reused.
set -euo pipefail
OUTROOT=${1:?usage: bash eval/fixture.sh OUTROOT [N]}
N=${2:-1024}
PY=${PY:-python3}
STEPS=${STEPS:-25}
GUIDANCE=${GUIDANCE:-5}
BATCH=${BATCH:-128}
if [ -z "${INCEPTION:-}" ]; then
  if "$PY" -c 'import sys; from quantsd.eval.features import fid_helper_path; sys.exit(fid_helper_path() is None)'; then
    INCEPTION=fid-helper
  else
    INCEPTION=none
  fi
fi
EXTRA=()
[ "${FEATURES_ONLY:-0}" = 1 ] && EXTRA+=(--features-only)
KID=$(( N < 1000 ? N : 1000 ))
if [ -n "${LAUNCH:-}" ]; then RUN=($LAUNCH -m quantsd.eval); else RUN=("$PY" -m quantsd.eval); fi
COMMON=(--reference fixture --num-prompts "$N" --steps "$STEPS" --guidance "$GUIDANCE" --batch-size "$BATCH"
        --kid-subset-size "$KID" --inception "$INCEPTION" --cache-dir "$OUTROOT/cache" --table "$OUTROOT/README.md"
        --no-progress "${EXTRA[@]}")
echo "[eval/fixture.sh] N=$N steps=$STEPS guidance=$GUIDANCE inception=$INCEPTION features_only=${FEATURES_ONLY:-0}" >&2
"${RUN[@]}" -m fixture --label fp32 "${COMMON[@]}" -o "$OUTROOT/runs/fp32"
for recipe in recipes/*.yaml; do
  name=$(basename "$recipe" .yaml)
  ck="$OUTROOT/ckpt/$name"
  # export is deterministic (seeded), so a checkpoint re-exported on another machine is byte-identical
  [ -f "$ck/quantsd.json" ] || "$PY" -m quantsd.cli export -m fixture --recipe "$recipe" -o "$ck" --overwrite >&2
  "${RUN[@]}" -m "$ck" --label "$name" "${COMMON[@]}" -o "$OUTROOT/runs/$name"
done
"$PY" -m quantsd.cli eval-table "$OUTROOT"/runs/*/ -o "$OUTROOT/README.md"
cat "$OUTROOT/README.md"
