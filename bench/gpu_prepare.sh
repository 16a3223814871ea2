#!/usr/bin/env bash
# bench/gpu_prepare.sh — run HERE (the development machine, with network to PyPI) before a session's GPU checks.
#
# Gets everything that `bash bench/gpu_checks.sh` needs on the lent GPU machine (x86-64, Python 3.12, torch with
# CUDA, numpy, scipy, ... already installed; no network there) into two ignored folders that the device tool's
# `run` carries:
#   .whl/       wheels (cp312 manylinux x86_64 / py3-none-any) of the run-time packages the GPU image lacks:
#               nibabel (reading/writing NIfTI), connected-components-3d (post-processing) — the minimal set that
#               `universal segment --weights builtin` (NIfTI output) imports — and monai, which
#               bench/inference.py imports (its warm-up and the `reference` variant). Versions: the pins of
#               requirements.txt, else the version installed in .venv. Not torch/numpy/scipy (the image has them).
#               pydicom (and its decoders) is not needed: nibabel imports it only when it is installed.
#   .gpu_data/  copies of ../shared/data/ts_cta_1p5mm_unlabeled and ../shared/data/ts_abdomen_3mm (the CTs of
#               bench/gpu_checks.sh, bench/inference.py --cases ts_cta and bench/batch.py); ../shared does not travel.
# Adds /.whl/ and /.gpu_data/ to .git/info/exclude (once), and prints the sizes: what travels (tracked and
# untracked-not-ignored files plus the carried folders) must stay under 64 MiB.
#
# Usage:  bash bench/gpu_prepare.sh        (idempotent; re-downloads nothing pip has cached)
# Then, in a session with a GPU:  run(command="bash bench/gpu_checks.sh", carry=[".whl", ".gpu_data"],
#                                     timeout_s=540)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
DATA="${UNIVERSAL_SHARED_DATA:-$ROOT/../shared/data}"
PACKAGES=(nibabel connected-components-3d monai)
CASES=(ts_cta_1p5mm_unlabeled ts_abdomen_3mm)

# 1. ignore the two folders (once)
GITDIR="$(git rev-parse --git-common-dir)"
mkdir -p "$GITDIR/info"
touch "$GITDIR/info/exclude"
for pat in /.whl/ /.gpu_data/; do
    grep -qxF "$pat" "$GITDIR/info/exclude" || echo "$pat" >>"$GITDIR/info/exclude"
done

# 2. the wheels: NAME==VERSION from requirements.txt's pin, else the version in .venv
pin() {
    local name="$1" line
    line="$(grep -iE "^${name}==[^ #]+" requirements.txt | head -1 | sed 's/[ #].*//')" || true
    if [[ -n "$line" ]]; then
        echo "$line"
    else
        echo "${name}==$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")"
    fi
}
SPECS=()
for p in "${PACKAGES[@]}"; do SPECS+=("$(pin "$p")"); done
echo "wheels: ${SPECS[*]}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$TMP/whl" "${SPECS[@]}"
rm -rf .whl
mv "$TMP/whl" .whl # only these: two versions of one package would stop the install there
for w in .whl/*.whl; do
    needs="$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' |
        sed 's/^Requires-Dist: //' | paste -sd ';' -)"
    echo "  $(basename "$w")  (needs: ${needs:-nothing})"
done

# 3. the CTs
mkdir -p .gpu_data
for c in "${CASES[@]}"; do
    [[ -d "$DATA/$c" ]] || {
        echo "error: $DATA/$c is absent; set UNIVERSAL_SHARED_DATA to the folder holding it" >&2
        exit 2
    }
    rm -rf ".gpu_data/$c"
    cp -r "$DATA/$c" .gpu_data/
    chmod -R u+w ".gpu_data/$c"
done

# 4. sizes (MiB): the carried folders, and everything that travels
mib() { awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
whl="$(du -sb .whl | cut -f1 | mib)"
data="$(du -sb .gpu_data | cut -f1 | mib)"
tree="$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | mib)"
total="$(echo "$whl $data $tree" | awk '{printf "%.1f", $1 + $2 + $3}')"
echo "carried: .whl ${whl} MiB + .gpu_data ${data} MiB = $(echo "$whl $data" | awk '{printf "%.1f", $1 + $2}') MiB"
echo "working tree (tracked + untracked-not-ignored) ${tree} MiB; total that travels ${total} MiB (limit 64 MiB)"
awk -v t="$total" 'BEGIN {exit !(t >= 64)}' && echo "WARNING: over the 64 MiB that a run carries" >&2
echo 'next, in a session with a GPU: run(command="bash bench/gpu_checks.sh", carry=[".whl", ".gpu_data"], timeout_s=540)'
