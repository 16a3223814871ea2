#!/usr/bin/env bash
# Train the built-in model and package it as universal/resources/builtin.pt (float16 weights).
#   bash scripts/train_builtin.sh            # ~40 min on a 2-core CPU
# Needs ../shared/data beside the project root (read in place). Resumes from runs/builtin/run if interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/builtin.yaml}
OUT=${OUT:-runs/builtin/run/model.pt}
"$PY" -m universal.cli train "$CONFIG"
"$PY" scripts/package_builtin.py "$OUT" universal/resources/builtin.pt
