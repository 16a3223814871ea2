"""Start-up time of the command line: how long before ``universal segment`` does useful work (issue 16).

Prints a markdown table (median of ``--repeat`` fresh processes, wall seconds measured from outside each process,
so the interpreter's own start counts):

- ``python -c pass``: the baseline of this machine at this moment (a loaded machine shows here);
- ``universal --help`` and ``universal segment --help`` (target < 1 s);
- ``import universal.cli`` and ``import torch`` alone;
- ``Predictor("builtin")``: imports + loading the built-in model (no MONAI import: ``universal.model.segresnet``);
- ``segment → first inference``: ``universal segment CT -o OUT --fast`` from the process start until the sliding
  window of the first case begins (target: overhead < 2 s; reading and preprocessing the CT are included) and
  ``segment end to end``.

Usage::

    python bench/startup.py                          # the real CT ../shared/data/ts_abdomen_3mm/ct.nii.gz
    python bench/startup.py --ct my.nii.gz --repeat 5

Where ``PYTHONDONTWRITEBYTECODE`` is set (as on the project's development machine) Python never caches the
package's bytecode and every process compiles the modules it imports (about 0.1 s of ``--help``, 0.3 s before the
first inference); ``make demo`` and ``python -m compileall universal`` cache it, as ``pip install`` does. The table's
header says which case it measured. Timings depend on the machine and its load; never asserted in tests. ``python -X importtime -m universal.cli
segment --help`` shows what each import costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CT = ROOT.parent / "shared" / "data" / "ts_abdomen_3mm" / "ct.nii.gz"

FIRST_INFERENCE = """
import sys, time
import universal.inference as inference
original = inference._infer
def marked(*args, **kwargs):
    print(f"FIRST_INFERENCE {time.time():.6f}", flush=True)
    inference._infer = original
    return original(*args, **kwargs)
inference._infer = marked
from universal import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _wall(cmd: list[str], marker: str | None = None) -> tuple[float, float | None]:
    """Wall seconds of ``cmd`` and, when ``marker`` is given, seconds until it printed ``MARKER <time.time()>``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0, t0_epoch = time.perf_counter(), time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    mark = None
    if marker:
        line = next(s for s in done.stdout.splitlines() if s.startswith(marker))
        mark = float(line.split()[1]) - t0_epoch
    return wall, mark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct", default=str(DEFAULT_CT), help="the CT of the segment rows (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per row (median; default 3)")
    args = p.parse_args(argv)
    py = sys.executable
    rows: list[tuple[str, list[float]]] = []

    def row(name: str, cmd: list[str]) -> None:
        rows.append((name, [_wall(cmd)[0] for _ in range(args.repeat)]))
        print(f"  {name}: {statistics.median(rows[-1][1]):.2f} s", file=sys.stderr)

    row("python -c pass", [py, "-c", "pass"])
    row("universal --help", [py, "-m", "universal.cli", "--help"])
    row("universal segment --help", [py, "-m", "universal.cli", "segment", "--help"])
    row("import universal.cli", [py, "-c", "import universal.cli"])
    row("import torch", [py, "-c", "import torch"])
    row(
        "Predictor('builtin') (imports + model)",
        [py, "-c", "import universal; universal.Predictor('builtin')"],
    )
    first, total = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            out = Path(tmp) / f"o{i}"
            cmd = [py, "-c", FIRST_INFERENCE, "segment", args.ct, "-o", str(out), "--fast"]
            wall, mark = _wall(cmd, "FIRST_INFERENCE")
            first.append(mark or float("nan"))
            total.append(wall)
    rows.append(("segment --fast: start → first inference", first))
    rows.append(("segment --fast: end to end", total))
    base = statistics.median(rows[0][1])
    cached = any((ROOT / "universal").glob("__pycache__/cli.*.pyc"))
    no_write = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    print(f"\nStart-up ({args.repeat} fresh processes each, median; CT {Path(args.ct).name}; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; universal's bytecode "
          f"{'cached' if cached else 'NOT cached: every process compiles its modules'}"
          f"{', PYTHONDONTWRITEBYTECODE set' if no_write else ''})\n")  # fmt: skip
    print("| what | median s | min s | minus `python -c pass` s |")
    print("|---|---|---|---|")
    for name, values in rows:
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {min(values):.2f} | {med - base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
