"""Benchmark: accuracy of the built-in model (or any checkpoint) on real CT held out from its training, and on the phantom.

Segments, with ``universal.Predictor(weights, fast=True)`` (one Predictor for every case):

1. **held out** ``../shared/data/ts_dicom_series/dicom`` (a real 20-slice DICOM series; reference
   ``labels_totalseg.nii.gz``, TotalSegmentator v2 ids, mapped with the ``totalsegmentator_v2`` dataset map);
2. **held out** ``../shared/data/dcmqi_liver_3slice`` (3 real slices, reference ``liver_seg.nrrd``: liver only) --
   not used for training the built-in model (3 slices are one slice at 3 mm), reported for completeness;
3. the phantom (``universal.phantom.make_phantom()`` defaults, every class it draws);
4. **seen in training** ``../shared/data/ts_abdomen_3mm`` (for reference only: this is the training scan).

Scores come from the evaluation layer (``universal.evaluation.evaluate``, generic rules): the model's classes that
the reference annotates. Prints one markdown table per case: DSC and NSD per class, NSD tolerance from the FLARE
2023 table for its 13 organs (liver 5 mm, kidneys/spleen 3 mm, ...) and 2 mm otherwise
(``universal.metrics.DEFAULT_TOLERANCE_MM``). Classes absent from the reference are marked; their score is 1 when
the model also predicts nothing, else 0, and they are left out of the "mean over present classes". No FLARE z-crop
is applied (plain per-class scores).

Usage: ``python bench/accuracy.py [--weights builtin] [--json results.json] [--skip-phantom]``

``--compare NAME=CHECKPOINT ...`` evaluates several models on the same cases and prints two comparison tables
instead: mean DSC / NSD per case and model, and per-class DSC on the held-out scan (the model card's ablation, e.g.
``--compare real_only=runs/builtin/round1_real/model.pt round1=runs/builtin/round1/model.pt``).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _evaluate(name: str, seg: Any, reference: Any, note: str) -> dict[str, Any]:
    """Score ``seg`` with the evaluation layer (the classes segmented that the reference annotates, generic rules)."""
    from universal.evaluation import evaluate

    result = evaluate(seg, reference, name=name)
    rows = []
    for c in result.scored:
        s, gt = result[c], reference.masks.get(c)
        rows.append(
            {
                "class": c,
                "dsc": float(s.dsc),
                "nsd": float(s.nsd),
                "tolerance_mm": float(s.tolerance_mm),
                "present": bool(gt is not None and np.any(gt)),
                "ref_voxels": int(np.count_nonzero(gt)) if gt is not None else 0,
                "pred_voxels": int(np.count_nonzero(seg.masks[c])),
            }
        )
    mean = result.mean([r["class"] for r in rows if r["present"]])
    return {
        "case": name,
        "note": note,
        "rows": rows,
        "mean_present": mean,
        "skipped": dict(result.skipped),
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


def _ts_case(image: Path, label: Path, predictor: Any, name: str, note: str) -> dict[str, Any]:
    from universal.evaluation import read_reference
    from universal.io import load_volume

    vol = load_volume(image)
    reference = read_reference(label, "totalsegmentator_v2", like=vol)
    return _evaluate(name, predictor.predict(vol), reference, note)


def run(weights: str = "builtin", skip_phantom: bool = False) -> list[dict[str, Any]]:
    from universal.evaluation import read_reference
    from universal.io import load_volume
    from universal.predictor import Predictor

    predictor = Predictor(weights, fast=True)  # every class of the model, its spec's settings, 3 mm
    classes = predictor.classes
    results = []
    dicom = DATA / "ts_dicom_series"
    if dicom.is_dir():
        results.append(
            _ts_case(dicom / "dicom", dicom / "labels_totalseg.nii.gz", predictor, "ts_dicom_series", "HELD OUT")
        )
    dcmqi = DATA / "dcmqi_liver_3slice"
    if dcmqi.is_dir() and "liver" in classes:
        vol = load_volume(dcmqi)
        reference = read_reference(dcmqi / "liver_seg.nrrd", "dcmqi_liver", like=vol)
        seg = predictor.predict(vol)
        results.append(_evaluate("dcmqi_liver_3slice", seg, reference, "HELD OUT, 3 slices, liver only"))
    if not skip_phantom:
        from universal.phantom import make_phantom

        ph = make_phantom()
        seg = predictor.predict(ph.volume)
        reference = read_reference(ph.masks, like=ph.volume)
        results.append(_evaluate("phantom", seg, reference, "synthetic, make_phantom() defaults"))
    abd = DATA / "ts_abdomen_3mm"
    if abd.is_dir():
        results.append(
            _ts_case(
                abd / "ct.nii.gz",
                abd / "labels_totalseg.nii.gz",
                predictor,
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
            + " | ".join(
                f"{cells[c]['dsc']:.3f} / {cells[c]['nsd']:.3f}" if c in cells else "-" for c in cases
            )
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
        print(f"# Accuracy comparison (universal.Predictor, fast=True)\n\n{compare_tables(by_model)}\n")
        print(f"total time {time.perf_counter() - t0:.1f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(by_model, indent=2))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(args.weights, args.skip_phantom)
    print(f"# Accuracy of `{args.weights}` (universal.Predictor, fast=True)\n")
    for res in results:
        print(_table(res))
        print()
    print(f"total time {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
