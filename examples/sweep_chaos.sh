#!/usr/bin/env bash
# The paper's CHAOST2 runs (settings 1 and 2, label groups 0 and 1, folds 0-4: 15 trainings, 20 tests) in parallel,
# then the table (runs/sweep/summary.md). Re-running skips finished runs and resumes interrupted ones.
#   DEVICES=0,1,2,3 bash examples/sweep_chaos.sh                  # local GPUs, one run per GPU at a time
#   SLURM=1 PARTITION=gpu TIME=24:00:00 bash examples/sweep_chaos.sh    # one SLURM job array (submitit)
#   bash examples/sweep_chaos.sh with n_steps=50000               # words after 'with' go to every run
# Overrides: DEVICES, SLURM, PARTITION, TIME, OUT, FOLDS, SETTINGS, LABEL_SETS (see docs/sweep.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATASET=${DATASET:-CHAOST2}
OUT=${OUT:-runs/sweep}
FOLDS=${FOLDS:-0-4}
SETTINGS=${SETTINGS:-"1 2"}
LABEL_SETS=${LABEL_SETS:-"0 1"}
if [ "${SLURM:-0}" = 1 ]; then
  WHERE=(--slurm --time "${TIME:-24:00:00}" --gpus-per-job 1)
  [ -n "${PARTITION:-}" ] && WHERE+=(--partition "$PARTITION")
else
  WHERE=(--devices "${DEVICES:-0}")
fi
# shellcheck disable=SC2086  # FOLDS, SETTINGS and LABEL_SETS are word lists
exec $PY -m launch.sweep --dataset "$DATASET" --settings $SETTINGS --folds $FOLDS --label-sets $LABEL_SETS \
  "${WHERE[@]}" --out "$OUT" "$@"
