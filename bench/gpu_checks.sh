#!/usr/bin/env bash
# bench/gpu_checks.sh — the GPU measurements of one lent-machine session, prepared so that its device time goes to
# measuring. Run THERE from the repository root, after `bash bench/gpu_prepare.sh` here:
#     run(command="bash bench/gpu_checks.sh", carry=[".whl", ".gpu_data"], timeout_s=540)
# It installs the wheels of .whl into /tmp/site (when .whl exists and $PY is Python 3.12, the wheels' version),
# prints nvidia-smi (when present), then runs, each step guarded (a failing step is reported and the next one runs):
#   a     universal.efficiency.gpu_probe: NVML when pynvml imports ("a-nvml"), torch.cuda when pynvml is made
#         unimportable ("a-torch"); one EfficiencySampler reading around a 1 GiB allocation each;
#   b     `universal segment` (standard mode, built-in weights) on .gpu_data/ts_cta_1p5mm_unlabeled/ct.nii.gz, timed
#         from outside, then report.json's timings and efficiency;
#   c     bench/inference.py --cases ts_cta --variants segment "segment fast", built-in weights ("c-builtin") and
#         random weights (1.5 mm, 32 classes; "c-random");
#   d     bench/batch.py --cases 20, rows sequential, prefetch 1, pipeline, prefetch 1 + pipeline (cases/min);
# and ends with one line listing the steps that passed and failed (exit 1 when any failed). Everything printed is
# also written to $OUT/gpu_checks.log when OUT is set (with report.json of b as $OUT/report_b.json).
# Each step has its own time cap and all run under a total budget (GPU_CHECKS_BUDGET_S, default 420 s; a step is
# stopped when either runs out and the rest are reported as skipped), so the script ends within about 7 minutes
# there (ran in about 3 minutes on this machine's 2 CPUs in QUICK mode).
# Environment: DEVICE (default cuda), PY (default python3), STEPS (only these, e.g. STEPS="b c-random" or "a d";
# default all), QUICK=1 (a CPU test: c only "segment fast", d 4 cases, caps ×5, budget 1800 s),
# GPU_CHECKS_BUDGET_S. A test here:  QUICK=1 DEVICE=cpu PY=.venv/bin/python nice bash bench/gpu_checks.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE="${DEVICE:-cuda}"
PY="${PY:-python3}"
QUICK="${QUICK:-0}"
export PYTHONUNBUFFERED=1
CAPX=1 # the steps' own caps ×CAPX (a CPU is slower)
if [[ "$QUICK" == 1 ]]; then BUDGET="${GPU_CHECKS_BUDGET_S:-1800}" CAPX=5; else BUDGET="${GPU_CHECKS_BUDGET_S:-420}"; fi
DEADLINE=$(($(date +%s) + BUDGET))
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_checks.log") 2>&1
    TEE_PID=$!
fi
[[ -d .gpu_data ]] && export UNIVERSAL_BENCH_DATA="$ROOT/.gpu_data"
DATA="${UNIVERSAL_BENCH_DATA:-$ROOT/../shared/data}"
CT="$DATA/ts_cta_1p5mm_unlabeled/ct.nii.gz"
SEG_OUT="${TMPDIR:-/tmp}/gout" # step b's output folder
PASSED=()
FAILED=()

echo "== gpu_checks $(date -u +%FT%TZ): DEVICE=$DEVICE PY=$PY QUICK=$QUICK budget ${BUDGET}s data $DATA"
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        t0=$(date +%s)
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl; then
            export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
            echo "installed $(ls .whl | tr '\n' ' ')into /tmp/site in $(($(date +%s) - t0)) s"
        else
            echo "FAILED: pip install of .whl (the steps run without those wheels)"
            FAILED+=(wheels)
        fi
    else
        echo "not installing .whl: its wheels are for Python 3.12, $PY is $("$PY" -V 2>&1)"
    fi
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi || true; else echo "(no nvidia-smi)"; fi
"$PY" -c 'import sys, torch; c = torch.cuda.is_available(); print("python", sys.version.split()[0], "| torch",
torch.__version__, "| cuda", c, "|", torch.cuda.get_device_name(0) if c else "no GPU", "|", torch.get_num_threads(),
"threads")' || true

# step NAME CAP CMD...: run CMD with at most CAP seconds (less when the budget runs out); record pass/fail
step() {
    local name="$1" cap=$(($2 * CAPX)) left t0 rc
    shift 2
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* && " $STEPS " != *" ${name%%-*} "* ]]; then
        return # not asked for (STEPS)
    fi
    left=$((DEADLINE - $(date +%s)))
    ((left < cap)) && cap=$left
    echo
    echo "== step $name (at most ${cap}s): ${*@Q}"
    if ((cap < 15)); then
        echo "SKIPPED $name: the budget (${BUDGET}s) is spent"
        FAILED+=("$name(no time)")
        return
    fi
    STEP_T=$cap
    t0=$(date +%s)
    "$@"
    rc=$?
    if ((rc == 0)); then
        PASSED+=("$name")
        echo "-- $name passed in $(($(date +%s) - t0)) s"
    else
        FAILED+=("$name(rc $rc)")
        echo "-- FAILED $name: exit $rc after $(($(date +%s) - t0)) s$( ((rc == 124 || rc == 137)) && echo ' (its time ran out)')"
    fi
}
tmo() { timeout -k 10 "$STEP_T" "$@"; }

# a: which GPU probe, and one sampler reading around a 1 GiB allocation (argument: nvml | torch)
probe_check() {
    tmo "$PY" - "$DEVICE" "$1" <<'EOF'
import sys, time
device, mode = sys.argv[1], sys.argv[2]
if mode == "torch":
    sys.modules["pynvml"] = None  # pynvml unimportable: the probe must fall back to torch.cuda
import torch
from universal.efficiency import EfficiencySampler, gpu_probe
cuda = device.startswith("cuda")
try:
    import pynvml
    pynvml.nvmlInit()
    from importlib.metadata import version
    nvml = f"nvml works (nvidia-ml-py {version('nvidia-ml-py')}, driver {pynvml.nvmlSystemGetDriverVersion()})"
except Exception as exc:  # noqa: BLE001
    nvml = f"nvml unavailable ({type(exc).__name__}: {exc})"
probe = gpu_probe(device)
name = None if probe is None else probe.name
print(f"[{mode}] {nvml}; gpu_probe({device!r}) -> {type(probe).__name__}: {name}")
expected = None if not cuda else ("torch.cuda" if mode == "torch" or "unavailable" in nvml else "nvml")
sampler = EfficiencySampler(device, probe=probe).start()
x = torch.ones(2**30, dtype=torch.uint8, device=device)  # 1 GiB
if cuda:
    torch.cuda.synchronize()
time.sleep(0.5)  # about 5 samples at 0.1 s
sampler.sample()
del x
if cuda:
    torch.cuda.empty_cache()
time.sleep(0.2)
e = sampler.stop().to_dict()
print(f"[{mode}] EfficiencySampler around a 1 GiB allocation: {e}")
ok = name == expected or (name or "").startswith(str(expected))
if cuda and not (isinstance(e["gpu_peak_mb"], float) and e["gpu_peak_mb"] >= 1000):
    print(f"[{mode}] unexpected: gpu_peak_mb {e['gpu_peak_mb']} < 1000 MB around a 1 GiB allocation")
    ok = False
print(f"[{mode}] probe {name!r}, expected {expected!r}: {'ok' if ok else 'UNEXPECTED'}")
sys.exit(0 if ok else 1)
EOF
}

# b: universal segment on the CTA (standard mode, built-in weights), timed from outside
segment_check() {
    rm -rf "$SEG_OUT"
    tmo "$PY" - "$PY" "$CT" "$DEVICE" "${OUT:-}" "$SEG_OUT" <<'EOF'
import json, pathlib, resource, shutil, subprocess, sys, time
py, ct, device, out, seg_out = sys.argv[1:6]
cmd = [py, "-m", "universal.cli", "segment", ct, "-o", seg_out, "--device", device, "--weights", "builtin"]
t0 = time.perf_counter()
done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t0
rc = done.returncode
for line in done.stderr.replace("\r", "\n").splitlines():  # its messages, without the progress bar
    if line.strip() and "%|" not in line:
        print(line.rstrip())
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"end to end (process start, imports, model load, CT read, inference, writing): {wall:.2f} s; exit {rc}; "
      f"peak RSS of the process {peak:.0f} MiB")
reports = sorted(pathlib.Path(seg_out).glob("*/report.json"))
if not reports:
    sys.exit(rc or 1)
report = json.loads(reports[0].read_text())
print("timings:", json.dumps(report.get("timings"), indent=1))
print("efficiency:", json.dumps(report.get("efficiency"), indent=1))
print("device:", report.get("device"), "| precision:", report.get("precision"), "| prepared_shape:",
      report.get("prepared_shape"), "| patch_size:", report.get("patch_size"))
if out:
    shutil.copy(reports[0], pathlib.Path(out) / "report_b.json")
sys.exit(rc)
EOF
}

VARIANTS=(segment "segment fast")
CASES=20
if [[ "$QUICK" == 1 ]]; then
    VARIANTS=("segment fast")
    CASES=4
fi
step a-nvml 60 probe_check nvml
step a-torch 60 probe_check torch
step b 120 segment_check
step c-builtin 120 tmo "$PY" bench/inference.py --cases ts_cta --variants "${VARIANTS[@]}" --device "$DEVICE"
step c-random 150 tmo "$PY" bench/inference.py --cases ts_cta --variants "${VARIANTS[@]}" --device "$DEVICE" \
    --weights random
step d "$BUDGET" tmo "$PY" bench/batch.py --cases "$CASES" --device "$DEVICE" \
    --rows sequential "prefetch 1" pipeline "prefetch 1 + pipeline"

echo
echo "== gpu_checks done in $((BUDGET - DEADLINE + $(date +%s))) s: passed: ${PASSED[*]:-none}; failed: ${FAILED[*]:-none}"
RC=$((${#FAILED[@]} > 0))
if [[ -n "${TEE_PID:-}" ]]; then # let tee write the log's last lines before the script returns
    exec >&- 2>&-
    wait "$TEE_PID"
fi
exit "$RC"
