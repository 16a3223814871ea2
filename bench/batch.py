"""Batch throughput of ``universal segment`` (issue 16): sequential vs prefetch, and 1 vs 2 ranks.

Builds a batch of ``--cases`` CTs (default 20: phantoms of different seeds and copies of the real
``../shared/data/ts_abdomen_3mm/ct.nii.gz``, alternating; the folder ``$UNIVERSAL_BENCH_DATA`` instead of
``../shared/data`` when that is set), then runs the CLI in a fresh process per row with the
built-in model in fast mode and prints a markdown table:

- ``sequential``: ``--prefetch 0 --no-pipeline`` (each CT read when its turn comes, written before the next);
- ``prefetch N``: the next CTs read and preprocessed in a worker thread while the current one runs;
- ``pipeline``: each case post-processed and written in a worker thread while the next one runs the network;
- ``prefetch 1 + pipeline``: both (the default of ``universal segment`` on a GPU; on the CPU it is ``sequential``);
- ``2 ranks``: ``torchrun --standalone --nproc_per_node 2`` (gloo on CPU, one GPU each on CUDA; torchrun gives
  each rank one OpenMP thread unless ``OMP_NUM_THREADS`` is set).

Columns: process wall time (start-up and model load included), cases per minute on it, the batch span
(``summary.json``'s ``elapsed_s``: from the first case to the last one written, on the slowest rank; start-up
excluded) and cases per minute on that, and the speed-up against ``sequential``. Timings depend on the machine and
its load (``nice`` it on a shared machine and compare ratios); never asserted in tests.

Usage::

    python bench/batch.py                      # 20 cases, every row
    python bench/batch.py --cases 8 --rows sequential "prefetch 1" --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: ``$UNIVERSAL_BENCH_DATA`` when set (``bench/gpu_checks.sh`` points it at ``.gpu_data``), else ../shared/data
DATA = Path(os.environ.get("UNIVERSAL_BENCH_DATA") or ROOT.parent / "shared" / "data").resolve()
REAL_CT = DATA / "ts_abdomen_3mm" / "ct.nii.gz"
ROWS = {
    "sequential": ["--prefetch", "0", "--no-pipeline"],
    "prefetch 1": ["--prefetch", "1", "--no-pipeline"],
    "pipeline": ["--prefetch", "0", "--pipeline"],
    "prefetch 1 + pipeline": ["--prefetch", "1", "--pipeline"],  # the default on a GPU
    "prefetch 2 + pipeline": ["--prefetch", "2", "--pipeline"],
    "2 ranks": [],  # the defaults of the device on each rank
}


def make_cases(folder: Path, n: int) -> list[Path]:
    """``n`` CTs in ``folder``: phantoms (128×128×96 at 1.5 mm, seeds 0, 1, ...) alternating with copies of the
    real CT when it exists."""
    from universal.io import save_volume
    from universal.phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"case{i:03d}.nii.gz"
        if i % 2 and REAL_CT.exists():
            shutil.copy(REAL_CT, path)
        else:
            save_volume(make_phantom((128, 128, 96), spacing=(1.5, 1.5, 1.5), seed=i).volume, path)
        paths.append(path)
    return paths


def run_row(
    name: str, cases: Path, out: Path, device: str | None, extra: list[str], threads: int | None
) -> dict:
    """One configuration in a fresh process → wall time, batch span and the summary's counts."""
    cli = [*ROWS[name], *extra, "--fast", "-o", str(out), str(cases)] + (
        ["--device", device] if device else []
    )
    head = [sys.executable, "-m", "universal.cli", "segment"]
    if name == "2 ranks":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "universal.cli", "segment"]  # fmt: skip
    # keep an existing PYTHONPATH (e.g. wheels installed with --target on a GPU machine)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # every process (each rank) gets this many intra-op threads
    t0 = time.perf_counter()
    done = subprocess.run(head + cli, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "wall": wall,
        "span": float(summary["elapsed_s"]),
        "counts": summary["counts"],
        "n": len(summary["cases"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=20, help="CTs in the batch (default 20)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--device", default=None, help="cpu or cuda (default: auto)")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME", help="default: all the model's")
    p.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of every process (default: unset)"
    )
    args = p.parse_args(argv)
    extra = ["--classes", *args.classes] if args.classes else []
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        cases = Path(tmp) / "cts"
        make_cases(cases, args.cases)
        for name in args.rows:
            results[name] = r = run_row(
                name, cases, Path(tmp) / name.replace(" ", "_"), args.device, extra, args.threads
            )
            print(f"  {name}: {r['wall']:.1f} s wall, span {r['span']:.1f} s, {r['counts']}", file=sys.stderr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nBatch throughput: {args.cases} cases (phantoms 128×128×96 at 1.5 mm and ts_abdomen_3mm copies), "
          f"built-in model, --fast, {os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads or 'unset'}, "
          f"load average {load:.1f} at the end\n")  # fmt: skip
    print("| configuration | wall s | cases/min (wall) | batch span s | cases/min (span) | speed-up (span) |")
    print("|---|---|---|---|---|---|")
    base = results.get("sequential")
    for name, r in results.items():
        speed = f"{base['span'] / r['span']:.2f}×" if base else "—"
        print(
            f"| {name} | {r['wall']:.1f} | {60 * r['n'] / r['wall']:.1f} | {r['span']:.1f} | "
            f"{60 * r['n'] / r['span']:.1f} | {speed} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
