#!/usr/bin/env bash
# Few-shot evaluation (EP1-ALP, docs/method.md#ep1-alp) of the models trained by train_ssl_abdominal_ct.sh, then the
# paper's table.
# Overrides: GPUID, FOLDS, SETTINGS, LABEL_SETS, NSTEPS, SNAPSHOT, RUNS (see _common.sh).
source "$(dirname "$0")/_common.sh"
LABEL_SETS=${LABEL_SETS:-"0 1"}
for k in $FOLDS; do
  for s in $SETTINGS; do
    for g in $LABEL_SETS; do
      if [ "$s" = 1 ]; then test_one SABS 1 "$g" "$k" 0; else test_one SABS 2 "$g" "$k" "$g"; fi
    done
  done
done
$PY -m evaluation.summarize "$RUNS/SABS" --out "$RUNS/SABS/summary"
