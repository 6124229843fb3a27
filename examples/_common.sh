# Shared by the example scripts: environment overrides and the python of the project's venv.
# Every variable can be set from outside, e.g.  GPUID=1 FOLDS="0 1" SETTINGS="2" bash examples/train_ssl_abdominal_mri.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
GPUID=${GPUID:-0}                 # CUDA device index
FOLDS=${FOLDS:-"0 1 2 3 4"}       # folds (docs/method.md#folds)
SETTINGS=${SETTINGS:-"1 2"}       # 1: all slices; 2: slices with test organs removed
RUNS=${RUNS:-runs}                # output root
NSTEPS=${NSTEPS:-100000}          # optimiser steps (the paper's 100k)
SNAPSHOT=${SNAPSHOT:-$NSTEPS}     # checkpoint evaluated by the test scripts
export CUDA_VISIBLE_DEVICES=$GPUID

# train_one DATASET SETTING LABEL_SET FOLD [extra overrides...]
train_one() {
  local ds=$1 s=$2 g=$3 k=$4; shift 4
  local dir="$RUNS/$ds/setting$s/sets_$g/fold$k"
  echo ">>> training $ds setting $s label group $g fold $k -> $dir"
  $PY training.py with "$ds" "setting$s" label_sets="$g" eval_fold="$k" n_steps="$NSTEPS" \
      run_dir="$dir" path.log_dir="$RUNS/sacred" resume=True "$@"   # resume: re-running continues or skips
}

# test_one DATASET SETTING LABEL_SET FOLD TRAIN_LABEL_SET [extra overrides...]
test_one() {
  local ds=$1 s=$2 g=$3 k=$4 tg=$5; shift 5
  local train_dir="$RUNS/$ds/setting$s/sets_$tg/fold$k"
  echo ">>> testing $ds setting $s label group $g fold $k with $train_dir"
  $PY validation.py with "$ds" "setting$s" label_sets="$g" eval_fold="$k" n_steps="$NSTEPS" \
      reload_model_path="$train_dir/snapshots/$SNAPSHOT.pth" run_dir="$train_dir/eval_sets_$g" \
      path.log_dir="$RUNS/sacred" "$@"
}
