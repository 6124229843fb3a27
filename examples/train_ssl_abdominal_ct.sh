#!/usr/bin/env bash
# Self-supervised training of SSL-ALPNet on SABS (the paper's recipe, docs/method.md#training-schedule): for each fold,
# setting 1 trains one model that serves every label group; setting 2 trains one model per label group
# (leak-free exclusion of every slice that holds a test organ).
# Overrides: GPUID, FOLDS, SETTINGS, LABEL_SETS, NSTEPS, RUNS (see _common.sh).
source "$(dirname "$0")/_common.sh"
LABEL_SETS=${LABEL_SETS:-"0 1"}
for k in $FOLDS; do
  for s in $SETTINGS; do
    if [ "$s" = 1 ]; then
      train_one SABS 1 0 "$k"
    else
      for g in $LABEL_SETS; do train_one SABS 2 "$g" "$k"; done
    fi
  done
done
