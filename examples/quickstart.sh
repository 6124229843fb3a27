#!/usr/bin/env bash
# The whole pipeline on the synthetic phantom, on CPU, in a few minutes (the same as `make demo`):
# phantom -> class-slice index -> superpixels -> training (demo config) -> evaluation next to the intensity baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
$PY -m launch.demo --out "$OUT"
