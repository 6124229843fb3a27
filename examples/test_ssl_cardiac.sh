#!/usr/bin/env bash
# Few-shot evaluation (EP1-ALP, docs/method.md#ep1-alp) of the models trained by train_ssl_cardiac.sh, then the paper's
# table.
# Overrides: GPUID, FOLDS, SETTINGS, LABEL_SETS, NSTEPS, SNAPSHOT, RUNS (see _common.sh).
SETTINGS=${SETTINGS:-1}  # published cardiac tables report setting 1 only
source "$(dirname "$0")/_common.sh"
LABEL_SETS=${LABEL_SETS:-"0 1 2"}
for k in $FOLDS; do
  for s in $SETTINGS; do
    for g in $LABEL_SETS; do
      if [ "$s" = 1 ]; then test_one CMR 1 "$g" "$k" 0; else test_one CMR 2 "$g" "$k" "$g"; fi
    done
  done
done
$PY -m evaluation.summarize "$RUNS/CMR" --out "$RUNS/CMR/summary"
