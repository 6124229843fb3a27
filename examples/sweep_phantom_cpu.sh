#!/usr/bin/env bash
# The sweep on this machine's CPU cores with the phantom: setting 1, folds 0 and 1, two runs at a time (cpu,cpu),
# short demo trainings, then the table. Needs the phantom that `make demo` prepares (data/PHANTOM/...).
#   bash examples/sweep_phantom_cpu.sh                      # 300 steps per run (the demo's cosine over 300 steps)
#   STEPS=2000 bash examples/sweep_phantom_cpu.sh           # the demo's full training
# Further arguments are config updates for every run, e.g. bash examples/sweep_phantom_cpu.sh optim.lr=5e-3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec $PY -m launch.sweep --dataset PHANTOM --settings 1 --folds 0 1 --label-sets 0 --devices cpu,cpu \
  --out "${OUT:-runs/sweep_phantom}" with demo n_steps="${STEPS:-300}" "$@"
