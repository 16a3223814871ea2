"""Benchmark of ``universal.segment`` against a reference-style implementation of the official algorithm.

Prints a markdown table: end-to-end time (load + preprocess + sliding window + post-processing + mapping back;
model creation excluded) and peak memory (each variant runs in a fresh subprocess; peak CPU RSS during the call —
the kernel's high-water mark VmHWM is reset just before it — and its increase over the RSS just before the call;
GPU max allocated when CUDA is used) for

- ``reference``: the official algorithm's choices (``bench/reference_inference.py``): overlap 0.5, one window per
  forward pass, MONAI's float32 full-resolution accumulator for all classes, a Python loop over classes in the heads,
  per-class full-volume resampling back;
- ``segment@0.5``: ``universal.segment`` with the reference's overlap and float32 (same windows and arithmetic:
  checks equivalence);
- ``segment``: the defaults (overlap 0.25; bfloat16 autocast on a CPU with native bfloat16, float16 on CUDA);
- ``segment fast``: ``fast=True`` (3 mm).

and the minimum per-class DSC of each ``segment`` variant against the reference (``segment@0.5`` must be
≥ 0.999: same algorithm, different implementation). Cases: the real CTs of ``../shared/data`` (or of the folder
named by the environment variable ``UNIVERSAL_BENCH_DATA``, e.g. ``.gpu_data`` on a GPU machine) —
``ts_cta_1p5mm_unlabeled`` (233×167×191 at 1.5 mm), ``ts_aorta_1p5mm``, ``ts_abdomen_3mm`` — and the synthetic
phantom (128×128×96 at 1.5 mm). The per-stage times (preprocess/inference/postprocess/resample) of ``segment``
(standard) and ``segment fast`` with the trained built-in weights are the numbers to quote (issue 16):
``python bench/inference.py --variants segment "segment fast"``.

Weights (one table each; ``--weights``): ``random``, a randomly initialised segresnet for all 32 classes at the
paper's 1.5 mm and 96³ windows (one-hot prompts, fixed seed, heads calibrated so that every class gives a
non-trivial mask: ``reference_inference.calibrated_random_model``), and ``builtin``, the shipped checkpoint
``universal/resources/builtin.pt`` with its own classes, spacing and training window (when it exists). The default
is ``builtin``: random weights make connected components artificially slow and misrepresent post-processing.

Usage::

    python bench/inference.py                       # all cases and variants
    python bench/inference.py --cases phantom --variants segment "segment fast" --weights random
    python bench/inference.py --device cuda

Timings are for information (never asserted in tests); they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: the real CTs: ``$UNIVERSAL_BENCH_DATA`` when set (``bench/gpu_checks.sh``: ``.gpu_data``), else ../shared/data
SHARED = Path(os.environ.get("UNIVERSAL_BENCH_DATA") or ROOT.parent / "shared" / "data").resolve()
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "reference": {},
    "segment@0.5": {"overlap": 0.5, "precision": "float32"},
    "segment": {},
    "segment fast": {"fast": True},
}
CASES = {
    "ts_cta": "ts_cta_1p5mm_unlabeled/ct.nii.gz",
    "ts_aorta": "ts_aorta_1p5mm/ct.nii.gz",
    "ts_abdomen": "ts_abdomen_3mm/ct.nii.gz",
    "phantom": None,
}
PHANTOM_SHAPE = (128, 128, 96)


# ------------------------------------------------------------------------------------------------ worker
def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (MiB), or None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """Current resident set size (MiB)."""
    v = _status_mb("VmRSS")
    return float("nan") if v is None else v


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that the peak covers only the timed call (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset_ok: bool) -> float:
    hwm = _status_mb("VmHWM") if reset_ok else None
    if hwm is not None:
        return hwm
    peak = resource.getrusage(
        resource.RUSAGE_SELF
    ).ru_maxrss  # KiB on Linux, bytes on macOS (process lifetime)
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


BUILTIN = ROOT / "universal" / "resources" / "builtin.pt"
WEIGHTS = {
    "random": "random segresnet, all 32 classes, 1.5 mm, 96³ windows (seed 0, one-hot prompts, heads calibrated on "
    "the phantom; no trained weights)",
    "builtin": "checkpoint universal/resources/builtin.pt (its classes, spacing and training window)",
}


def _make_model(weights: str):
    if weights == "builtin":
        from universal.model import load_pretrained

        return load_pretrained("builtin").eval()
    from reference_inference import calibrated_random_model

    from universal.phantom import make_phantom
    from universal.preprocess import preprocess

    # calibrate the heads on CT-like content: the central 96³ of the preprocessed phantom (deterministic)
    arr = preprocess(make_phantom(PHANTOM_SHAPE, spacing=(1.5, 1.5, 1.5), seed=0).volume).array
    size = [min(96, s - s % 8) for s in arr.shape]
    start = [(s - w) // 2 for s, w in zip(arr.shape, size)]
    probe = arr[tuple(slice(a, a + w) for a, w in zip(start, size))]
    return calibrated_random_model(None, seed=0, probe=probe)


def _input(case: str):
    """A path (real CT, loaded inside the timed call) or an in-memory Volume (phantom)."""
    if CASES[case] is None:
        from universal.phantom import make_phantom

        return make_phantom(PHANTOM_SHAPE, spacing=(1.5, 1.5, 1.5), seed=0).volume
    return str(SHARED / CASES[case])


def worker(case: str, variant: str, weights: str, device: str | None, out: Path) -> None:
    """Run one variant once in this (fresh) process; write masks (bit-packed) and measurements."""
    import torch

    from universal.io import load_volume

    model = _make_model(weights)
    checksum = float(sum(float(p.double().sum()) for p in model.state_dict().values()))
    src = _input(case)
    if device is not None:
        model = model.to(device)
    cuda = device is not None and str(device).startswith("cuda")
    # warm-up of lazy imports (MONAI, scipy.ndimage) outside the timed region, on a tiny input
    import monai.inferers  # noqa: F401
    import scipy.ndimage  # noqa: F401

    import universal.postprocess  # noqa: F401

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    import gc

    gc.collect()
    reset_ok = _reset_peak_rss()
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    if variant == "reference":
        from reference_inference import reference_segment

        volume = load_volume(src) if isinstance(src, str) else src
        with torch.inference_mode():
            masks = reference_segment(volume, model, overlap=0.5)
        timings = {}
        spacing = float(np.max(model.spec.preprocessing.target_spacing()))
        patch = list(model.spec.inference.patch_size)
    else:
        from universal.predictor import Predictor

        res = Predictor(model, device=device, **VARIANTS[variant]).predict(src)
        masks, timings = res.masks, res.timings
        spacing = float(np.max(res.info["target_spacing_mm"]))
        patch = res.info["patch_size"]
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = _peak_rss_mb(reset_ok)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    names = list(masks)
    np.savez_compressed(out / "masks.npz", **{n.replace(" ", "_"): np.packbits(m) for n, m in masks.items()})
    (out / "result.json").write_text(
        json.dumps(
            {
                "wall_s": wall,
                "peak_rss_mb": peak,
                "rss_before_mb": rss_before,
                "gpu_peak_mb": gpu,
                "timings": timings,
                "classes": names,
                "shape": list(next(iter(masks.values())).shape),
                "checksum": checksum,
                "overlap": res.info["overlap"] if variant != "reference" else 0.5,
                "threads": torch.get_num_threads(),
                "spacing_mm": spacing,
                "patch_size": "×".join(str(int(v)) for v in np.broadcast_to(np.asarray(patch), (3,))),
            }
        )
    )


# ------------------------------------------------------------------------------------------------ driver
def _run_variant(
    case: str, variant: str, weights: str, device: str | None, out: Path, timeout: float
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, variant, weights, str(out)]
    if device:
        cmd += ["--device", device]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
        raise RuntimeError(f"{case}/{variant} failed: {last}\n{proc.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def _load_masks(out: Path, classes: list[str], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    n = int(np.prod(shape))
    with np.load(out / "masks.npz") as z:
        return {c: np.unpackbits(z[c.replace(" ", "_")])[:n].reshape(shape).astype(bool) for c in classes}


def _min_dsc(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    from reference_inference import dsc

    scores = {c: dsc(a[c], b[c]) for c in a}
    worst = min(scores, key=scores.get)
    return scores[worst], worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default=None, help="cpu, cuda (default: auto)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per variant (fresh process each); the fastest is shown"
    )
    p.add_argument(
        "--weights",
        nargs="+",
        choices=list(WEIGHTS),
        default=None,
        help="model(s) to bench (default: builtin, the trained model, whose realistic masks make post-processing "
        "representative; random when universal/resources/builtin.pt is absent)",
    )
    p.add_argument("--worker", nargs=4, metavar=("CASE", "VARIANT", "WEIGHTS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        case, variant, weights, out = args.worker
        worker(case, variant, weights, args.device, Path(out))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights_list = args.weights or (["builtin"] if BUILTIN.exists() else ["random"])
    for case in [c for c in args.cases if CASES[c] is not None and not (SHARED / CASES[c]).exists()]:
        print(f"skipping {case}: {SHARED / CASES[case]} is absent", file=sys.stderr)
        args.cases = [c for c in args.cases if c != case]
    cpu = os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        for weights in weights_list:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            print(
                f"### `segment` vs reference-style inference — weights: {WEIGHTS[weights]}\n\n"
                f"Device {device} ({torch.get_num_threads()} torch threads, {cpu} CPUs, load average {load:.1f} "
                f"at start); best of {args.repeat} run(s) per row, each in a fresh process.\n"
            )
            _table(args, weights, device, Path(tmp) / weights)
            print(
                "\n`segment@0.5` uses the reference's windows: its DSC checks that both implementations give the "
                "same masks (≥ 0.999 expected). The other rows differ from the reference by design (overlap, "
                "spacing); with random weights their DSC says little about accuracy.\n"
            )
    return 0


def _table(args, weights: str, device: str, tmp: Path) -> None:
    header = (
        "| case | variant | overlap | spacing | window | end-to-end s | speed-up vs reference | peak RSS MiB | "
        "RSS increase MiB | GPU peak MiB | preprocess/inference/postprocess/resample s | "
        "min DSC vs reference (class) |"
    )
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|", flush=True)
    for case in args.cases:
        results: dict[str, dict] = {}
        for variant in args.variants:
            out = tmp / case / variant.replace(" ", "_").replace("@", "_")
            try:
                runs = [
                    _run_variant(case, variant, weights, device, out, args.timeout)
                    for _ in range(args.repeat)
                ]
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(
                    f"| {case} | {variant} | failed: {str(exc).splitlines()[0][:200]} ||||||||||", flush=True
                )
                continue
            results[variant] = r = dict(min(runs, key=lambda x: x["wall_s"]))
            r["rss_increase_mb"] = max(x["peak_rss_mb"] - x["rss_before_mb"] for x in runs)
            r["peak_rss_mb"] = max(x["peak_rss_mb"] for x in runs)
            r["out"] = out
            ref = results.get("reference")
            speed = f"{ref['wall_s'] / r['wall_s']:.1f}×" if ref and variant != "reference" else "—"
            dsc_txt = "—"
            if ref and variant != "reference":
                a = _load_masks(out, r["classes"], tuple(r["shape"]))
                b = _load_masks(ref["out"], ref["classes"], tuple(ref["shape"]))
                worst, name = _min_dsc(a, b)
                present = sum(bool(m.any()) for m in b.values())
                dsc_txt = f"{worst:.4f} ({name}); {present}/{len(b)} classes non-empty"
                if abs(r["checksum"] - ref["checksum"]) > 1e-6 * max(1.0, abs(ref["checksum"])):
                    dsc_txt += " (weights differ!)"
            overlap = r.get(
                "overlap", "?"
            )  # what the run used (the spec's default unless the variant sets it)
            gpu = f"{r['gpu_peak_mb']:.0f}" if r.get("gpu_peak_mb") is not None else "—"
            t = r["timings"]
            stages = (
                "/".join(f"{t.get(k, 0):.1f}" for k in ("preprocess", "inference", "postprocess", "resample"))
                if t
                else "—"
            )
            print(
                f"| {case} | {variant} | {overlap} | {r['spacing_mm']:g} mm | {r['patch_size']} | "
                f"{r['wall_s']:.1f} | {speed} | {r['peak_rss_mb']:.0f} | "
                f"{r['rss_increase_mb']:.0f} | {gpu} | {stages} | {dsc_txt} |",
                flush=True,
            )


if __name__ == "__main__":
    raise SystemExit(main())
