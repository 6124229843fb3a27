#!/usr/bin/env bash
# The paper's SABS (abdominal CT) runs in parallel, then the table: examples/sweep_chaos.sh with DATASET=SABS.
#   DEVICES=0,1 bash examples/sweep_sabs.sh      |     SLURM=1 PARTITION=gpu bash examples/sweep_sabs.sh
DATASET=SABS OUT=${OUT:-runs/sweep} exec bash "$(dirname "$0")/sweep_chaos.sh" "$@"
