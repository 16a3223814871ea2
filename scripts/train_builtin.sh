#!/usr/bin/env bash
# Train the built-in model end to end and package it as universal/resources/builtin.pt (float16 weights).
#
#   make train-builtin          # or: bash scripts/train_builtin.sh
#
# 1. round 1: universal train configs/builtin.yaml (real partially labeled CT + a phantom case; synthesis hook off)
# 2. pseudo-labels: round 1 labels the unlabeled scans of ../shared/data (configs/builtin_unlabeled.json)
# 3. round 2: universal train configs/builtin_round2.yaml (starts from round 1; adds the pseudo-labels)
# 4. package round 2 as float16, then bench/accuracy.py prints held-out DSC/NSD of both rounds.
# Needs ../shared/data beside the project root (read in place, never copied). Each training round resumes from its
# own checkpoint if interrupted. About 30 minutes on an otherwise idle 2-core CPU; DEVICE=cuda trains on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DEVICE=${DEVICE:-cpu}
RUNS=runs/builtin

"$BIN/universal" train configs/builtin.yaml --device "$DEVICE"
"$BIN/universal" pseudo-label configs/builtin_unlabeled.json -o "$RUNS/pseudo" \
    --weights "$RUNS/round1/model.pt" --fast --device "$DEVICE"
"$BIN/universal" train configs/builtin_round2.yaml --device "$DEVICE"
"$BIN/python" scripts/package_builtin.py "$RUNS/round2/model.pt" universal/resources/builtin.pt
"$BIN/python" bench/accuracy.py --weights "$RUNS/round1/model.pt" --json "$RUNS/accuracy_round1.json"
"$BIN/python" bench/accuracy.py --json "$RUNS/accuracy_builtin.json"
