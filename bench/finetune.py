"""Benchmark: does fine-tuning on one corrected case help that class on a *different* scan, and leave the others alone?

For each scenario:

1. segment the *correction* scan with the starting weights (``Predictor(weights, fast=True)``);
2. correct one class programmatically: its prediction is replaced by the reference mask, every other mask is left
   as predicted; save it with :func:`universal.corrections.save_case` (only that class annotated);
3. fine-tune with :func:`universal.finetune.finetune` (masked loss: only the corrected class has labels);
4. segment the *test* scan (another scan) with the old and the new weights and score every class the reference
   annotates (``universal.evaluation``): the corrected class's DSC before/after, and every other class's.

Scenarios: **real** — correct ``../shared/data/ts_abdomen_3mm`` (reference: ``labels_totalseg.nii.gz``,
TotalSegmentator output, ids mapped with ``totalsegmentator_v2``), test on ``ts_dicom_series`` (another patient,
contrast-enhanced); **phantom** — correct ``make_phantom(seed=0)``, test on ``make_phantom(seed=1)``.
The corrected case's own DSC for the class is printed too (did the model learn the correction at all?).

Usage: ``nice -n 10 python bench/finetune.py [--class spleen] [--steps 40] [--skip-real] [--skip-phantom]
[--mix-phantom N] [--anchor] [--lr LR] [--patch 64 64 32] [--device cpu]``. Prints markdown tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _scores(seg: Any, reference: Any) -> dict[str, tuple[float, bool]]:
    """DSC per scored class and whether the class is present in the reference."""
    from universal.evaluation import evaluate

    result = evaluate(seg, reference)
    return {c: (float(result[c].dsc), bool(np.any(reference.masks.get(c)))) for c in result.scored}


def _real_cases():
    from universal.evaluation import read_reference
    from universal.io import load_volume

    abd, dcm = DATA / "ts_abdomen_3mm", DATA / "ts_dicom_series"
    fix = load_volume(abd / "ct.nii.gz")
    test = load_volume(dcm / "dicom")
    return (
        (
            "ts_abdomen_3mm",
            fix,
            read_reference(abd / "labels_totalseg.nii.gz", "totalsegmentator_v2", like=fix),
        ),
        (
            "ts_dicom_series",
            test,
            read_reference(dcm / "labels_totalseg.nii.gz", "totalsegmentator_v2", like=test),
        ),
    )


def _phantom_cases():
    from universal.evaluation import read_reference
    from universal.phantom import make_phantom

    a, b = make_phantom(seed=0), make_phantom(seed=1)
    return (
        ("phantom seed 0", a.volume, read_reference(a.masks, like=a.volume)),
        ("phantom seed 1", b.volume, read_reference(b.masks, like=b.volume)),
    )


def scenario(name: str, cases, cls: str, weights: str, cfg: Any, work: Path) -> dict[str, Any]:
    """Correct ``cls`` on the first case, fine-tune, score the second case before and after."""
    from universal.corrections import save_case
    from universal.finetune import finetune
    from universal.predictor import Predictor

    (fix_name, fix, fix_ref), (test_name, test, test_ref) = cases
    before = Predictor(weights, fast=True)
    seg_fix = before.predict(fix)
    masks = dict(seg_fix.masks)
    masks[cls] = np.asarray(fix_ref.masks[cls], dtype=bool)  # the correction: the reference mask
    save_case(work / "dataset", fix, masks, [cls], name=fix_name, source=weights)
    t0 = time.perf_counter()
    result = finetune(work / "dataset", weights, work / "model.pt", cfg)
    tune_s = time.perf_counter() - t0
    after = Predictor(result.checkpoint, fast=True)
    fix_scores = (_scores(seg_fix, fix_ref).get(cls), _scores(after.predict(fix), fix_ref).get(cls))
    test_scores = (_scores(before.predict(test), test_ref), _scores(after.predict(test), test_ref))
    return {
        "name": name,
        "fix": fix_name,
        "test": test_name,
        "cls": cls,
        "fix_scores": fix_scores,
        "test_scores": test_scores,
        "seconds": tune_s,
        "result": result,
    }


def table(res: dict[str, Any]) -> str:
    r = res["result"]
    (fb, _), (fa, _) = res["fix_scores"]
    lines = [
        f"### {res['name']}: `{res['cls']}` corrected on {res['fix']}, tested on {res['test']}",
        "",
        f"fine-tune: {r.steps} steps, {r.train_seconds:.0f} s of training, {res['seconds']:.0f} s in all; "
        f"loss {r.losses[0]:.3f} → {r.losses[-1]:.3f}. Corrected case itself, {res['cls']} DSC {fb:.3f} → {fa:.3f}.",
        "",
        f"| class on {res['test']} | DSC before | DSC after | Δ |",
        "|---|---:|---:|---:|",
    ]
    before, after = res["test_scores"]
    order = [res["cls"], *[c for c in before if c != res["cls"]]]
    for c in order:
        if c not in before:
            continue
        (b, present), (a, _) = before[c], after[c]
        mark = " **(corrected)**" if c == res["cls"] else ""
        absent = "" if present else " (absent in reference)"
        lines.append(f"| {c}{mark}{absent} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    others = [c for c in before if c != res["cls"] and before[c][1]]
    if others:
        mb = np.mean([before[c][0] for c in others])
        ma = np.mean([after[c][0] for c in others])
        lines.append(f"| mean of the other present classes | {mb:.3f} | {ma:.3f} | {ma - mb:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    from universal.finetune import FinetuneConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--class", dest="cls", default="spleen", help="the class to correct (default spleen)")
    ap.add_argument("--weights", default="builtin")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--patch", type=int, nargs=3, default=None)
    ap.add_argument("--mix-phantom", type=int, default=None)
    ap.add_argument("--anchor", action="store_true", help="anchor the other classes (FinetuneConfig.anchor)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-phantom", action="store_true")
    args = ap.parse_args()
    given = {"steps": args.steps, "lr": args.lr, "patch_size": args.patch, "mix_phantom": args.mix_phantom}
    given["anchor"] = args.anchor or None
    cfg = FinetuneConfig(device=args.device, **{k: v for k, v in given.items() if v is not None})
    print(f"# Fine-tuning on one corrected case ({args.weights}, {cfg})\n")
    t0 = time.perf_counter()
    scenarios = []
    if not args.skip_real:
        if (DATA / "ts_abdomen_3mm").is_dir() and (DATA / "ts_dicom_series").is_dir():
            scenarios.append(("real", _real_cases))
        else:
            print(f"real scenario skipped: {DATA} lacks ts_abdomen_3mm / ts_dicom_series\n")
    if not args.skip_phantom:
        scenarios.append(("phantom", _phantom_cases))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cases in scenarios:
            with tempfile.TemporaryDirectory() as work:
                res = scenario(name, cases(), args.cls, args.weights, cfg, Path(work))
            print(table(res) + "\n", flush=True)
    print(f"total time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
