"""bench/gpu_checks.sh (each step guarded, the final pass/fail line, the log in $OUT, STEPS) and the
UNIVERSAL_BENCH_DATA folder of bench/batch.py and bench/inference.py (what bench/gpu_checks.sh points at .gpu_data)."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "bench" / "gpu_checks.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="no bash"
)


def _checks(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    # PY=false: every Python the script starts fails at once, so each step fails in milliseconds
    full = {
        **os.environ,
        "PY": "false",
        "DEVICE": "cpu",
        "OUT": str(tmp_path / "out"),
        "TMPDIR": str(tmp_path),
        **env,
    }
    return subprocess.run(
        ["bash", str(CHECKS)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120
    )


def test_a_failing_step_does_not_stop_the_next_and_the_last_line_lists_them(tmp_path):
    done = _checks(tmp_path, STEPS="b d")
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 1
    assert "passed: none; failed: b(rc 1) d(rc 1)" in last
    assert "== step c-builtin" not in done.stdout and "== step a-nvml" not in done.stdout  # STEPS selects
    log = (tmp_path / "out" / "gpu_checks.log").read_text()
    assert log.strip().splitlines()[-1] == last  # the whole output, to its last line, is in $OUT


def test_steps_by_letter_and_a_spent_budget(tmp_path):
    done = _checks(tmp_path, STEPS="c", GPU_CHECKS_BUDGET_S="5")
    assert done.returncode == 1
    assert "failed: c-builtin(no time) c-random(no time)" in done.stdout
    assert "SKIPPED c-random: the budget (5s) is spent" in done.stdout


def _load(name: str, data: Path | None, monkeypatch):
    """bench/NAME.py imported afresh with UNIVERSAL_BENCH_DATA set to ``data`` (unset when None)."""
    if data is None:
        monkeypatch.delenv("UNIVERSAL_BENCH_DATA", raising=False)
    else:
        monkeypatch.setenv("UNIVERSAL_BENCH_DATA", str(data))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the bench scripts put bench/ on sys.path
    spec.loader.exec_module(module)
    return module


def test_bench_data_folder_comes_from_the_environment(tmp_path, monkeypatch):
    from universal.io import save_volume
    from universal.phantom import make_phantom

    data = tmp_path / "data"
    (data / "ts_abdomen_3mm").mkdir(parents=True)
    real = data / "ts_abdomen_3mm" / "ct.nii.gz"
    save_volume(make_phantom((32, 32, 16), spacing=(3.0, 3.0, 3.0), seed=7).volume, real)
    batch = _load("batch", data, monkeypatch)
    assert batch.REAL_CT == real.resolve()
    cases = batch.make_cases(tmp_path / "cts", 2)
    assert filecmp.cmp(cases[1], real, shallow=False)  # the odd case is a copy of that folder's CT
    assert not filecmp.cmp(cases[0], real, shallow=False)
    inference = _load("inference", data, monkeypatch)
    assert inference._input("ts_abdomen") == str(real.resolve())
    default = _load("inference", None, monkeypatch)
    assert default.SHARED == (ROOT.parent / "shared" / "data").resolve()
