"""Benchmark: universal.metrics.surface_dice vs MONAI compute_surface_dice(use_subvoxels=True).

Prints markdown tables with both NSD values side by side, their difference, the time of each (best of
``--repeat`` runs, after one warm-up) and the ratio MONAI time / our time, on

1. the real pair ``../shared/data/ts_abdomen_3mm`` (two TotalSegmentator segmentations of one CT, 3 mm), per class
   (FLARE 2023 tolerance for the FLARE organs, 3 mm otherwise);
2. a synthetic 256x256x192 pair of overlapping ellipsoids (0.8 x 0.8 x 2.5 mm) at 2 and 5 mm.

Usage: ``python bench/metrics.py [--repeat 3] [--classes 20]``
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from universal.metrics import FLARE23_TOLERANCES_MM, surface_dice

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# TotalSegmentator v2 name -> FLARE 2023 id (for the tolerance)
TS_FLARE = {
    "liver": 1,
    "kidney_right": 2,
    "spleen": 3,
    "pancreas": 4,
    "aorta": 5,
    "inferior_vena_cava": 6,
    "adrenal_gland_right": 7,
    "adrenal_gland_left": 8,
    "gallbladder": 9,
    "esophagus": 10,
    "stomach": 11,
    "duodenum": 12,
    "kidney_left": 13,
}


def _best_time(fn, repeat: int) -> tuple[float, float]:
    value = fn()  # warm-up (caches, lazy imports)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return value, best


def _monai(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> float:
    import torch
    from monai.metrics import compute_surface_dice

    def onehot(m):
        return torch.from_numpy(np.stack([~m, m]))[None].float()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            compute_surface_dice(
                onehot(pred),
                onehot(gt),
                [tol],
                include_background=False,
                spacing=tuple(spacing),
                use_subvoxels=True,
            )[0, 0]
        )


def _row(name: str, voxels: str, tol: float, pred, gt, spacing, repeat: int) -> str:
    ours, t_ours = _best_time(lambda: surface_dice(pred, gt, spacing, tol), repeat)
    ref, t_ref = _best_time(lambda: _monai(pred, gt, spacing, tol), repeat)
    return (
        f"| {name} | {voxels} | {tol:g} | {ours:.6f} | {ref:.6f} | {abs(ours - ref):.1e} | "
        f"{t_ours * 1e3:.1f} | {t_ref * 1e3:.1f} | {t_ref / t_ours:.1f}x |"
    )


HEADER = (
    "| class | voxels gt/pred | tol mm | NSD ours | NSD MONAI | abs diff | ours ms | MONAI ms | MONAI/ours |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def bench_real(repeat: int, max_classes: int) -> None:
    folder = DATA / "ts_abdomen_3mm"
    if not folder.exists():
        print(f"(skipped: {folder} is absent)\n")
        return
    import nibabel as nib

    names = json.loads((DATA / "totalsegmentator_v2_classes.json").read_text())
    a = nib.load(str(folder / "labels_totalseg.nii.gz"))
    b = nib.load(str(folder / "labels_totalseg_fast.nii.gz"))
    gt_lab = np.asarray(a.dataobj).astype(np.int32)
    pred_lab = np.asarray(b.dataobj).astype(np.int32)
    spacing = tuple(float(s) for s in a.header.get_zooms()[:3])
    print(
        f"### ts_abdomen_3mm: {gt_lab.shape} voxels at {spacing} mm (labels_totalseg_fast vs labels_totalseg)\n"
    )
    print(HEADER)
    labels = [v for v in sorted(set(np.unique(gt_lab)) & set(np.unique(pred_lab))) if v]
    labels.sort(key=lambda v: (names.get(str(v)) not in TS_FLARE, v))
    for v in labels[:max_classes]:
        name = names.get(str(v), str(v))
        gt, pred = gt_lab == v, pred_lab == v
        tol = FLARE23_TOLERANCES_MM[TS_FLARE[name]] if name in TS_FLARE else 3.0
        print(_row(name, f"{gt.sum()}/{pred.sum()}", tol, pred, gt, spacing, repeat))
    print()


def bench_synthetic(repeat: int) -> None:
    shape, spacing = (256, 256, 192), (0.8, 0.8, 2.5)
    g = np.indices(shape, dtype=np.float32)
    gt = ((g[0] - 128) / 90) ** 2 + ((g[1] - 128) / 70) ** 2 + ((g[2] - 96) / 60) ** 2 <= 1
    wobble = 0.04 * np.sin(g[0] / 9) * np.cos(g[1] / 7)
    pred = ((g[0] - 131) / 88) ** 2 + ((g[1] - 126) / 72) ** 2 + ((g[2] - 97) / 61) ** 2 <= 1 + wobble
    del g, wobble
    print(f"### synthetic ellipsoids: {shape} voxels at {spacing} mm\n")
    print(HEADER)
    for tol in (2.0, 5.0):
        print(_row("ellipsoid", f"{gt.sum()}/{pred.sum()}", tol, pred, gt, spacing, repeat))
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is reported)")
    p.add_argument("--classes", type=int, default=20, help="at most this many classes of the real pair")
    args = p.parse_args()
    import torch

    print(f"CPU threads: torch {torch.get_num_threads()}; times are the best of {args.repeat} runs\n")
    bench_real(args.repeat, args.classes)
    bench_synthetic(args.repeat)


if __name__ == "__main__":
    main()
