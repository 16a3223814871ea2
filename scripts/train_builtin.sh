#!/usr/bin/env bash
# Train the built-in model and package it as universal/resources/builtin.pt (float16 weights).
#   bash scripts/train_builtin.sh            # ~10-20 min on a 2-core CPU (steps of 1.2-9 s depending on load)
# Needs ../shared/data beside the project root (read in place, never copied). Resumes from runs/builtin/run if
# interrupted. The shipped weights are the configs/builtin.yaml run (450-step schedule) stopped after step 200
# (the session's time ran out); STOP_AFTER=450 runs the full schedule.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STOP_AFTER=${STOP_AFTER:-200}
"$PY" -c "from universal.train import train; train('configs/builtin.yaml', stop_after=$STOP_AFTER)"
"$PY" scripts/package_builtin.py runs/builtin/run/checkpoints/last.pt universal/resources/builtin.pt
