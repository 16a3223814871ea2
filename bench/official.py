"""Speed of the ``"official"`` grid convention against the project's own on one real CT (timings never asserted).

Two markdown tables:

1. End to end (``Predictor.predict``, the model loaded beforehand), per stage, for the same random weights with the
   same window, overlap, threshold and arithmetic (float32) in both conventions:

   - ``universal``: the project's convention (crop, then resample with box-aligned voxel centres; rolling-slab
     accumulator thresholded on the fly; each class's mask back over its own bounding box);
   - ``official``: the official release's MONAI chain (``Spacingd``, window, ``CropForegroundd``;
     ``sliding_window_inference`` with MONAI 0.9.0's Gaussian map; sigmoid; one packed ``Invertd`` for all
     masks);

   each with its own crop settings (the project's HU > -500 and 5 mm margin; the release's HU > -175, no margin),
   with the ratio official / universal of each stage (same run) and the seconds inside the network split out.
   Each variant runs once to warm up (MONAI's import, a few seconds cold), then the variants run interleaved
   ``--repeats`` times and the best time of each stage is shown (a shared machine's load drifts).
2. Mapping the masks back under the official convention: the packed inversion (16 masks per float32 channel, one
   ``Invertd``), one ``Invertd`` of the (K, X', Y', Z') float stack, and K separate ``Invertd`` calls (the release
   inverts each class on its own); all three give the same masks (checked).

Usage::

    python bench/official.py                         # ts_abdomen_3mm, random segresnet, 32 classes, 96³
    python bench/official.py --backbone unet --case ../shared/data/ts_aorta_1p5mm/ct.nii.gz
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASE = ROOT.parent / "shared" / "data" / "ts_abdomen_3mm" / "ct.nii.gz"
STAGES = ("preprocess", "inference", "postprocess", "resample", "total")


def _model(backbone: str, volume):
    """Random weights whose 32 classes each segment part of the CT (``reference_inference.calibrated_random_model``,
    calibrated on a 64×64×48 block of the CT's prepared grid)."""
    import sys

    from universal.preprocess import preprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_inference import calibrated_random_model

    arr = preprocess(volume).array
    starts = [max(0, (s - b) // 2) for s, b in zip(arr.shape, (64, 64, 48))]
    probe = np.zeros((64, 64, 48), np.float32)
    block = arr[tuple(slice(a, a + b) for a, b in zip(starts, probe.shape))]
    probe[tuple(slice(0, n) for n in block.shape)] = block
    return calibrated_random_model(None, seed=0, backbone=backbone, probe=probe)


class _TimedForward:
    """``model.forward`` timed (seconds inside the network, to tell the pipeline's own cost from the network's)."""

    def __init__(self, model) -> None:
        self.forward, self.seconds = model.forward, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def _end_to_end(model, volume, patch: int, postprocess: bool, repeats: int) -> dict[str, dict]:
    """Best-of-``repeats`` stage times of each convention, the runs interleaved (a shared machine's load drifts)."""
    from universal.predictor import Predictor
    from universal.spec import official_spec

    timer = _TimedForward(model)
    model.forward = timer
    official = official_spec("segresnet", 1, ("liver",), "unknown", "{}").preprocessing
    settings = dict(overlap=0.5, precision="float32", patch_size=(patch,) * 3, postprocess=postprocess)
    predictors = {
        # each convention with its own crop settings: the project's (HU > -500, 5 mm margin), the release's
        "universal": Predictor(model, device="cpu", convention="universal", **settings),
        "official": Predictor(model, device="cpu", preprocessing=official, **settings),
    }
    rows: dict[str, dict] = {name: {} for name in predictors}
    masks = {}
    for predictor in predictors.values():
        predictor.predict(volume)  # warm-up (MONAI's import, caches)
    for _ in range(repeats):
        for name, predictor in predictors.items():
            timer.seconds = 0.0
            seg = predictor.predict(volume)
            best = rows[name]
            times = {stage: float(seg.timings.get(stage, 0.0)) for stage in STAGES}
            times["network"] = timer.seconds
            times["inference without the network"] = times["inference"] - timer.seconds
            for stage, seconds in times.items():
                best[stage] = min(best.get(stage, float("inf")), seconds)
            best["_shape"] = seg.info["prepared_shape"]
            best["_windows"] = len(_window_starts(seg.info["prepared_shape"], patch))
            masks[name] = seg.masks
    del model.forward
    dsc = [_dsc(masks["universal"][n], masks["official"][n]) for n in masks["universal"]]
    rows["_dsc"] = {"min": float(min(dsc)), "median": float(np.median(dsc)), "n": len(dsc)}
    return rows


def _window_starts(shape, patch: int) -> list[tuple[int, ...]]:
    from itertools import product

    from universal.inference import window_starts

    return list(product(*(window_starts(max(s, patch), patch, 0.5) for s in shape)))


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def _inversions(volume, k: int) -> dict[str, float]:
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from universal.preprocess import PreprocessConfig, prepare_official

    prepared = prepare_official(
        volume, PreprocessConfig(foreground_hu=-175.0, margin_mm=0.0, convention="official")
    )
    levels = np.linspace(0.2, 0.8, k)
    masks = np.stack([prepared.array > lv for lv in levels])  # K masks of different extents
    out: dict[str, float] = {}

    t = time.perf_counter()
    packed = prepared.to_source(masks)
    out["packed (1 Invertd, ceil(K/16) channels)"] = time.perf_counter() - t

    t = time.perf_counter()
    inv = Invertd(keys="m", transform=prepared.transform, orig_keys="image", nearest_interp=True)
    stack = inv({"image": prepared.image, "m": MetaTensor(torch.from_numpy(masks.astype(np.float32)))})["m"]
    stack = np.asarray(stack) > 0.5
    out["float stack (1 Invertd, K channels)"] = time.perf_counter() - t

    t = time.perf_counter()
    each = []
    for c in range(k):
        one = MetaTensor(torch.from_numpy(masks[c : c + 1].astype(np.float32)))
        each.append(np.asarray(inv({"image": prepared.image, "m": one})["m"])[0] > 0.5)
    out["per class (K Invertd)"] = time.perf_counter() - t

    if not (np.array_equal(packed, stack) and np.array_equal(packed, np.stack(each))):
        raise AssertionError("the three inversions disagree")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", default=str(DEFAULT_CASE), help="a CT file (default: ts_abdomen_3mm)")
    parser.add_argument("--backbone", default="segresnet", help="random weights of this backbone, 32 classes")
    parser.add_argument("--patch", type=int, default=96, help="window size (voxels per side)")
    parser.add_argument("--postprocess", action="store_true", help="also run the post-processing")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (the best is shown)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from universal.io import load_volume

    volume = load_volume(args.case)
    model = _model(args.backbone, volume)
    print(
        f"case {Path(args.case).parent.name}/{Path(args.case).name}: {volume.shape} at "
        f"{', '.join(f'{s:g}' for s in volume.spacing)} mm; {args.backbone} (random, calibrated), {model.num_classes} classes, "
        f"{args.patch}³ windows, overlap 0.5, float32; {torch.get_num_threads()} CPU threads\n"
    )
    rows = _end_to_end(model, volume, args.patch, args.postprocess, args.repeats)
    print("| stage (s) | universal | official | official / universal |")
    print("|---|---:|---:|---:|")
    u, o = rows["universal"], rows["official"]
    print(f"| prepared grid | {'×'.join(map(str, u['_shape']))} | {'×'.join(map(str, o['_shape']))} | |")
    print(f"| windows | {u['_windows']} | {o['_windows']} | {o['_windows'] / u['_windows']:.2f} |")
    for stage in (*STAGES[:2], "network", "inference without the network", *STAGES[2:]):
        u, o = rows["universal"][stage], rows["official"][stage]
        ratio = f"{o / u:.2f}" if u > 1e-3 else "-"
        print(f"| {stage} | {u:.2f} | {o:.2f} | {ratio} |")
    d = rows["_dsc"]
    print(
        f"\nDSC universal vs official (different grids), {d['n']} classes: min {d['min']:.3f}, "
        f"median {d['median']:.3f}\n"
    )

    times = _inversions(volume, model.num_classes)
    base = times["packed (1 Invertd, ceil(K/16) channels)"]
    print(f"| masks back, official convention ({model.num_classes} masks) | s | ratio to packed |")
    print("|---|---:|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.1f} |")


if __name__ == "__main__":
    main()
