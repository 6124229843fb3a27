#!/usr/bin/env bash
# The whole-volume methods next to EP1-ALP on the phantom's 5 folds, one demo checkpoint per fold (CPU):
# trains fold k with the demo config (skipped when its 2000-step snapshot exists), then scores it with EP1-ALP
# (the paper's protocol: the query's labels pick its slices) and with EP2 and each whole-volume method (no query
# label), then writes the table (docs/protocols.md "Whole-volume methods").
#   bash examples/whole_volume_phantom.sh
#   CKPTS=/other/runs bash examples/whole_volume_phantom.sh    # checkpoints <CKPTS>/fold<k>/snapshots/2000.pth
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/PHANTOM/phantom_normalized}
RUNS=${RUNS:-runs/whole_volume}
CKPTS=${CKPTS:-$RUNS/train}
$PY -m launch.demo --skip-training --data-dir "$DATA"      # the demo's phantom, pseudolabels and class map
for f in 0 1 2 3 4; do
  ckpt="$CKPTS/fold$f/snapshots/2000.pth"
  [ -f "$ckpt" ] || $PY training.py with demo eval_fold=$f data_dir="$DATA" run_dir="$CKPTS/fold$f" \
      use_file_observer=False resume=True
  common=(with demo eval_fold=$f data_dir="$DATA" reload_model_path="$ckpt" use_file_observer=False
          save_predictions=False)
  $PY validation.py "${common[@]}" run_dir="$RUNS/ep1_alp_fold$f"
  for m in registered atlas body; do
    $PY validation.py "${common[@]}" protocol=ep2 ep2_method=$m run_dir="$RUNS/${m}_fold$f"
  done
done
$PY -m evaluation.compare_protocols --runs "$RUNS" --out "${OUT:-docs/results/whole_volume_phantom.json}"
