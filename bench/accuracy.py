"""Benchmark: accuracy of the built-in model (or any checkpoint) on real CT held out from its training, and on the phantom.

Segments, with ``universal.segment(..., fast=True)``:

1. **held out** ``../shared/data/ts_dicom_series/dicom`` (a real 20-slice DICOM series; reference
   ``labels_totalseg.nii.gz``, TotalSegmentator v2 ids, mapped with the ``totalsegmentator_v2`` dataset map);
2. **held out** ``../shared/data/dcmqi_liver_3slice`` (3 real slices, reference ``liver_seg.nrrd``: liver only) --
   not used for training the built-in model (3 slices are one slice at 3 mm), reported for completeness;
3. the phantom (``universal.phantom.make_phantom()`` defaults, every class it draws);
4. **seen in training** ``../shared/data/ts_abdomen_3mm`` (for reference only: this is the training scan).

Prints one markdown table per case: DSC and NSD per model class, NSD tolerance from the FLARE 2023 table for its
13 organs (liver 5 mm, kidneys/spleen 3 mm, ...) and 2 mm otherwise (``universal.metrics.DEFAULT_TOLERANCE_MM``).
Classes absent from the reference are marked; their score is 1 when the model also predicts nothing, else 0, and
they are left out of the "mean over present classes". No FLARE z-crop is applied (plain per-class scores).

Usage: ``python bench/accuracy.py [--weights builtin] [--json results.json] [--skip-phantom]``

``--compare NAME=CHECKPOINT ...`` evaluates several models on the same cases and prints two comparison tables
instead: mean DSC / NSD per case and model, and per-class DSC on the held-out scan (the model card's ablation, e.g.
``--compare real_only=runs/builtin/round1_real/model.pt round1=runs/builtin/round1/model.pt``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _tolerances(classes: list[str]) -> dict[str, float]:
    from universal import taxonomy
    from universal.metrics import DEFAULT_TOLERANCE_MM

    flare = {name: taxonomy.FLARE23.tolerances_mm[i] for i, name in taxonomy.FLARE23.classes.items()}
    return {c: float(flare.get(c, DEFAULT_TOLERANCE_MM)) for c in classes}


def _evaluate(
    name: str, seg: Any, gt: dict[str, np.ndarray], annotated: list[str], spacing: Any, note: str
) -> dict[str, Any]:
    from universal.metrics import evaluate_case

    classes = list(seg.masks)
    ann = [c for c in classes if c in annotated]
    result = evaluate_case(
        {c: seg.masks[c] for c in classes},
        {c: gt[c] for c in ann if c in gt},
        spacing,
        classes=ann,
        annotated=ann,
        tolerance_mm=_tolerances(ann),
        name=name,
    )
    rows = []
    for c in ann:
        s = result[c]
        rows.append(
            {
                "class": c,
                "dsc": float(s.dsc),
                "nsd": float(s.nsd),
                "tolerance_mm": float(s.tolerance_mm),
                "present": bool(gt.get(c) is not None and np.any(gt[c])),
                "ref_voxels": int(np.count_nonzero(gt[c])) if c in gt else 0,
                "pred_voxels": int(np.count_nonzero(seg.masks[c])),
            }
        )
    present = [r for r in rows if r["present"]]
    mean = {
        "dsc": float(np.mean([r["dsc"] for r in present])) if present else math.nan,
        "nsd": float(np.mean([r["nsd"] for r in present])) if present else math.nan,
    }
    return {
        "case": name,
        "note": note,
        "rows": rows,
        "mean_present": mean,
        "seconds": seg.timings.get("total"),
    }


def _table(res: dict[str, Any]) -> str:
    lines = [
        f"### {res['case']} ({res['note']})",
        "",
        "| class | DSC | NSD | tol (mm) | reference voxels | predicted voxels |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        mark = "" if r["present"] else " (absent in reference)"
        lines.append(
            f"| {r['class']}{mark} | {r['dsc']:.3f} | {r['nsd']:.3f} | {r['tolerance_mm']:g} | "
            f"{r['ref_voxels']} | {r['pred_voxels']} |"
        )
    m = res["mean_present"]
    lines.append(f"| **mean over present classes** | **{m['dsc']:.3f}** | **{m['nsd']:.3f}** | | | |")
    return "\n".join(lines)


def _ts_case(image: Path, label: Path, model: Any, name: str, note: str) -> dict[str, Any]:
    import universal
    from universal import taxonomy
    from universal.io import load_label, load_volume

    vol = load_volume(image)
    ds = taxonomy.dataset("totalsegmentator_v2")
    lab = load_label(label, like=vol)
    classes = list(model.class_names)
    masks = taxonomy.transfer_labels(lab, ds, vol.affine, classes=classes)
    gt = dict(zip(classes, masks))
    seg = universal.segment(vol, classes, model=model, fast=True)
    return _evaluate(name, seg, gt, [c for c in classes if ds.annotates(c)], vol.spacing, note)


def run(weights: str = "builtin", skip_phantom: bool = False) -> list[dict[str, Any]]:
    import universal
    from universal.io import load_label, load_volume
    from universal.model import load_pretrained

    model = load_pretrained(weights)
    classes = list(model.class_names)
    results = []
    dicom = DATA / "ts_dicom_series"
    if dicom.is_dir():
        results.append(
            _ts_case(dicom / "dicom", dicom / "labels_totalseg.nii.gz", model, "ts_dicom_series", "HELD OUT")
        )
    dcmqi = DATA / "dcmqi_liver_3slice"
    if dcmqi.is_dir() and "liver" in classes:
        vol = load_volume(dcmqi)
        lab = load_label(dcmqi / "liver_seg.nrrd", like=vol)
        seg = universal.segment(vol, classes, model=model, fast=True)
        results.append(
            _evaluate(
                "dcmqi_liver_3slice",
                seg,
                {"liver": lab > 0},
                ["liver"],
                vol.spacing,
                "HELD OUT, 3 slices, liver only",
            )
        )
    if not skip_phantom:
        from universal.phantom import make_phantom

        ph = make_phantom()
        seg = universal.segment(ph.volume, classes, model=model, fast=True)
        gt = {c: np.asarray(ph.masks[c], bool) for c in classes if c in ph.masks}
        results.append(
            _evaluate("phantom", seg, gt, list(gt), ph.volume.spacing, "synthetic, make_phantom() defaults")
        )
    abd = DATA / "ts_abdomen_3mm"
    if abd.is_dir():
        results.append(
            _ts_case(
                abd / "ct.nii.gz",
                abd / "labels_totalseg.nii.gz",
                model,
                "ts_abdomen_3mm",
                "SEEN IN TRAINING - reference only, not a validation",
            )
        )
    return results


def compare_tables(by_model: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: mean DSC / NSD per (model, case), then per-class DSC of each model on the held-out cases."""
    names = list(by_model)
    cases = [r["case"] for r in by_model[names[0]]]
    out = ["### mean DSC / NSD over present classes", ""]
    out.append("| model | " + " | ".join(cases) + " |")
    out.append("|---|" + "---:|" * len(cases))
    for n in names:
        cells = {r["case"]: r["mean_present"] for r in by_model[n]}
        out.append(
            f"| {n} | "
            + " | ".join(f"{cells[c]['dsc']:.3f} / {cells[c]['nsd']:.3f}" if c in cells else "-" for c in cases)
            + " |"
        )
    for held in [r for r in by_model[names[0]] if r["note"].startswith("HELD OUT")]:
        present = [row["class"] for row in held["rows"] if row["present"]]
        out += ["", f"### {held['case']} (held out): DSC per class", ""]
        out.append("| class | " + " | ".join(names) + " |")
        out.append("|---|" + "---:|" * len(names))
        for c in present:
            vals = []
            for n in names:
                res = next((r for r in by_model[n] if r["case"] == held["case"]), None)
                row = next((x for x in res["rows"] if x["class"] == c), None) if res else None
                vals.append(f"{row['dsc']:.3f}" if row else "-")
            out.append(f"| {c} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--weights", default="builtin", help="pretrained name or checkpoint path (default builtin)"
    )
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument(
        "--compare", nargs="+", metavar="NAME=CHECKPOINT", help="compare several models in two summary tables"
    )
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (the real CT data live in ../shared/data)")
        return
    t0 = time.perf_counter()
    if args.compare:
        pairs = [item.partition("=") for item in args.compare]
        if any(not sep or not name or not path for name, sep, path in pairs):
            ap.error("--compare takes NAME=CHECKPOINT items")
        by_model = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, _, path in pairs:
                by_model[name] = run(path, args.skip_phantom)
        print(f"# Accuracy comparison (universal.segment, fast=True)\n\n{compare_tables(by_model)}\n")
        print(f"total time {time.perf_counter() - t0:.1f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(by_model, indent=2))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(args.weights, args.skip_phantom)
    print(f"# Accuracy of `{args.weights}` (universal.segment, fast=True)\n")
    for res in results:
        print(_table(res))
        print()
    print(f"total time {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
