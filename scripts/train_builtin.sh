#!/usr/bin/env bash
# Train the built-in model end to end and package it as universal/resources/builtin.pt (float16 weights).
#
#   make train-builtin                          # on this machine's device (cuda when available)
#   DEVICE=cuda ABLATION=1 make train-builtin   # what made the shipped weights: one H200, about 8.5 minutes
#   DEVICE=cpu BUDGET1=3600 BUDGET2=1800 make train-builtin   # a CPU needs far more time for a usable model
#
# 1. round 1: universal train configs/builtin.yaml (real partially labeled CT + phantom cases + synthesis),
#    bounded by BUDGET1 seconds of training (the schedule follows the clock)
# 2. pseudo-labels: round 1 labels the unlabeled scans (configs/builtin_unlabeled.json); classes it finds nowhere
#    stay unannotated (--empty unannotated)
# 3. round 2: universal train configs/builtin_round2.yaml (starts from round 1; adds the pseudo-labels), BUDGET2 s
# 4. package round 2 as float16 into universal/resources/builtin.pt (PACKAGE=0 skips it)
# ABLATION=1 also trains, concurrently on the same device: round1_real (real CT only: no phantom, no synthesis),
# round1_nophantom (real CT + synthesis) beside round 1, and round1_cont (round 1 continued for BUDGET2 without
# pseudo-labels) beside round 2, so that the model card can say what synthesis, the phantom and the pseudo-labels
# each bring at equal training time. Afterwards: python bench/accuracy.py --weights runs/builtin/<run>/model.pt.
# MANIFEST / UNLABELED replace the data manifests (e.g. copies of the data in another folder). Logs: RUNS/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-auto}
RUNS=${RUNS:-runs/builtin}
MANIFEST=${MANIFEST:-configs/builtin_manifest.json}
UNLABELED=${UNLABELED:-configs/builtin_unlabeled.json}
BUDGET1=${BUDGET1:-250}
BUDGET2=${BUDGET2:-170}
WORKERS=${WORKERS:-6}
ABLATION=${ABLATION:-0}
PACKAGE=${PACKAGE:-1}
if [ "$DEVICE" = auto ]; then
    DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
mkdir -p "$RUNS"
PHANTOM="$RUNS/phantom/manifest.json"

train() {  # NAME CONFIG BUDGET [--set ...]: one training run, its output in RUNS/NAME.log
    local name=$1 config=$2 budget=$3
    shift 3
    echo "[$(date +%T)] train $name ($config, ${budget} s on $DEVICE)"
    "$PY" -m universal.cli train "$config" --device "$DEVICE" --out "$RUNS/$name" \
        --set "train.time_budget_s=$budget" --set "train.num_workers=$WORKERS" "$@" >"$RUNS/$name.log" 2>&1
}
finish() {  # PID NAME REQUIRED: wait for a background run; a failed ablation run is reported, not fatal
    if wait "$1"; then
        echo "[$(date +%T)] $2 done: $(tail -n 1 "$RUNS/$2.log")"
    else
        echo "[$(date +%T)] $2 FAILED; the end of $RUNS/$2.log:" >&2
        tail -n 20 "$RUNS/$2.log" >&2
        [ "$3" = required ] && exit 1
    fi
    return 0
}

# ---- round 1 (+ the ablation runs beside it)
train round1 configs/builtin.yaml "$BUDGET1" --set "data.train=[$PHANTOM, $MANIFEST]" &
r1=$!
if [ "$ABLATION" = 1 ]; then
    train round1_real configs/builtin.yaml "$BUDGET1" --set "data.train=[$MANIFEST]" --set data.phantom=null \
        --set synthesis.prob=0 --set train.num_workers=2 &
    a1=$!
    train round1_nophantom configs/builtin.yaml "$BUDGET1" --set "data.train=[$MANIFEST]" \
        --set data.phantom=null &
    a2=$!
fi
finish $r1 round1 required
if [ "$ABLATION" = 1 ]; then
    finish $a1 round1_real optional
    finish $a2 round1_nophantom optional
fi

# ---- pseudo-labels by round 1
pseudo() {
    echo "[$(date +%T)] pseudo-label $UNLABELED on $1"
    "$PY" -m universal.cli pseudo-label "$UNLABELED" -o "$RUNS/pseudo" --weights "$RUNS/round1/model.pt" --fast \
        --device "$1" --empty unannotated >"$RUNS/pseudo.log" 2>&1
    local rc=$?
    cat "$RUNS/pseudo.log"
    return $rc
}
pseudo "$DEVICE" || { [ "$DEVICE" != cpu ] && pseudo cpu; }

# ---- round 2 (+ round 1 continued without pseudo-labels)
train round2 configs/builtin_round2.yaml "$BUDGET2" --set "model.init=$RUNS/round1/model.pt" \
    --set "data.train=[$PHANTOM, $MANIFEST, $RUNS/pseudo/manifest.json]" &
r2=$!
if [ "$ABLATION" = 1 ]; then
    train round1_cont configs/builtin_round2.yaml "$BUDGET2" --set "model.init=$RUNS/round1/model.pt" \
        --set "data.train=[$PHANTOM, $MANIFEST]" &
    a3=$!
fi
finish $r2 round2 required
if [ "$ABLATION" = 1 ]; then
    finish $a3 round1_cont optional
fi

if [ "$PACKAGE" = 1 ]; then
    "$PY" scripts/package_builtin.py "$RUNS/round2/model.pt" universal/resources/builtin.pt
fi
echo "[$(date +%T)] done. Held-out accuracy: $PY bench/accuracy.py [--weights $RUNS/round1/model.pt]"
