"""Per class: the project's grid convention against the official one, with the same official-format U-Net.

The issue's question: a researcher loads the official U-Net weights; how far are the per-class probabilities and
masks of the project's convention (``"universal"``: crop, then resample with box-aligned voxel centres) from those
of the official convention (``"official"``: MONAI's ``Spacingd`` before the foreground crop, ``Invertd`` back)?
Both runs use one model read by ``load_official`` (so one spec: the release's preprocessing, HU window, crop rule,
96³ windows, overlap, Gaussian blending and threshold), and differ only in ``convention``. The weights are random
(no trained checkpoint here), calibrated so that every class segments part of the CT (see
:func:`calibrated_official_unet`); the probabilities are compared on the CT's own grid.

Prints one markdown table: per class, the mean |Δp| over the CT's voxels, the voxel agreement of the masks
(fraction of voxels with the same label), their Dice, and each mask's fraction of the CT; then the wall time of
both conventions (one run each after a small warm-up run of each, nothing asserted).

Usage::

    nice -n 10 python bench/official_table.py                     # ts_cta_1p5mm_unlabeled, 96³ windows
    python bench/official_table.py --case CT.nii.gz --patch 48     # a quick check on a small case
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASE = ROOT.parent / "shared" / "data" / "ts_cta_1p5mm_unlabeled" / "ct.nii.gz"


def calibrated_official_unet(volume):
    """A random U-Net in the official release's layout (32 classes, 512-d embeddings), read by ``load_official``:
    the calibration of ``tests/test_official_convention.py`` (heads that depend on the class only, contrast on the
    last head layer, each class's median logit moved to 0) on a 64×64×48 block of the CT's official prepared grid,
    so that every class segments part of the CT."""
    import sys

    import torch

    from universal.model import load_official
    from universal.preprocess import PreprocessConfig, prepare_official

    sys.path.insert(0, str(ROOT / "tests"))
    from test_official_convention import _calibrated_official_state

    arr = prepare_official(
        volume, PreprocessConfig(foreground_hu=-175.0, margin_mm=0.0, convention="official")
    )
    arr = np.asarray(arr.array, np.float32)
    starts = [max(0, (s - b) // 2) for s, b in zip(arr.shape, (64, 64, 48))]
    probe = np.zeros((64, 64, 48), np.float32)
    block = arr[tuple(slice(a, a + b) for a, b in zip(starts, probe.shape))]
    probe[tuple(slice(0, n) for n in block.shape)] = block
    state = _calibrated_official_state(probe)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.pth"
        torch.save({"net": {f"module.{k}": v for k, v in state.items()}}, path)
        return load_official(path)


def _run(model, volume, convention: str, patch: int | None):
    """(probabilities (K, X, Y, Z) float64 on the CT's grid, masks, seconds) of one convention."""
    from universal.predictor import Predictor

    settings = dict(device="cpu", convention=convention, postprocess=False, return_probabilities=True)
    if patch:
        settings["patch_size"] = (patch,) * 3
    predictor = Predictor(model, **settings)
    t = time.perf_counter()
    seg = predictor.predict(volume)
    seconds = time.perf_counter() - t
    names = list(model.class_names)
    probs = np.stack([np.asarray(seg.probabilities[n], np.float32) for n in names])
    masks = np.stack([np.asarray(seg.masks[n], bool) for n in names])
    return probs, masks, seconds, seg.info


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def table(names, pu, mu, po, mo) -> list[str]:
    """The markdown rows: per class mean |Δp|, voxel agreement, Dice, mask fractions; then the mean row."""
    rows = [
        "| class | mean abs Δp | max abs Δp | voxel agreement | Dice | fraction universal | fraction official |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    means = []
    for k, name in enumerate(names):
        dp = np.abs(pu[k].astype(np.float64) - po[k])
        agree = float((mu[k] == mo[k]).mean())
        dsc = _dice(mu[k], mo[k])
        means.append((dp.mean(), agree, dsc))
        rows.append(
            f"| {name} | {dp.mean():.2e} | {dp.max():.3f} | {agree:.4f} | {dsc:.4f} | "
            f"{mu[k].mean():.3f} | {mo[k].mean():.3f} |"
        )
    m = np.array(means)
    rows.append(
        f"| **all {len(names)} (mean)** | {m[:, 0].mean():.2e} | | {m[:, 1].mean():.4f} | {m[:, 2].mean():.4f} | | |"
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--case", default=str(DEFAULT_CASE), help="a CT file (default: ts_cta_1p5mm_unlabeled)"
    )
    parser.add_argument("--patch", type=int, default=None, help="window size (default: the spec's 96³)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from universal.io import Volume, load_volume

    volume = load_volume(args.case)
    model = calibrated_official_unet(volume)
    warm = Volume(np.asarray(volume.array[:48, :48, :48]), volume.affine, "warm-up")
    for convention in ("universal", "official"):  # imports (MONAI) and caches, outside the timed runs
        _run(model, warm, convention, 48)
    pu, mu, tu, iu = _run(model, volume, "universal", args.patch)
    po, mo, to, io = _run(model, volume, "official", args.patch)
    print(
        f"case {Path(args.case).parent.name}/{Path(args.case).name}: {volume.shape} at "
        f"{', '.join(f'{s:g}' for s in volume.spacing)} mm; official-format U-Net (random, calibrated), 32 classes, "
        f"{args.patch or 96}³ windows, {torch.get_num_threads()} CPU threads; prepared grid universal "
        f"{iu.get('prepared_shape')}, official {io.get('prepared_shape')}\n"
    )
    print("\n".join(table(list(model.class_names), pu, mu, po, mo)))
    print("\n| convention | seconds (Predictor.predict, one run) |\n|---|---:|")
    print(f"| universal (project) | {tu:.1f} |\n| official | {to:.1f} |")


if __name__ == "__main__":
    main()
