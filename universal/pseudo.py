"""Pseudo-labels: fill the classes a case's dataset does not annotate with a trained model's confident predictions.

:func:`pseudo_label` predicts every case of a manifest (unlabeled and partially labeled) with
:func:`universal.inference.segment`, keeps the ground truth of every class the case annotates, fills the other
classes with predictions that pass the confidence rule, and writes

- ``labels/<case>.nii.gz``: one label map per case with universal ids (1..32), on the CT's own grid;
- ``manifest.json``: a new manifest whose cases annotate the ground-truth classes *and* the accepted pseudo-labelled
  classes (listed under ``"pseudo"`` per case); a class whose prediction was not confident enough stays
  unannotated (so the masked loss ignores it rather than learning "absent");
- ``quality_report.json`` and ``quality_report.csv``: per case and class the source (ground truth / pseudo /
  dropped), volume, connected components, mean confidence inside the mask, agreement (DSC) of the model with the
  ground truth, and flags that send a case to review (left/right implausible, fragmented organ, low confidence,
  disagreement with the ground truth).

**Storage.** Classes overlap (a tumour voxel is also an organ voxel), so a single label map is written with tumours
over organs and the manifest's inline map restores the overlap: a tumour value also belongs to its parent organ
(``{"27": ["liver tumor", "liver"]}``; for paired parents, kidney or lung tumours, the side is taken from world x via
``split_lr``). Ground truth has priority: pseudo-labelled voxels never change a ground-truth class. This is checked
for every case by decoding the written label map exactly as training will (:func:`universal.taxonomy.transfer_labels`)
and comparing every ground-truth class voxel for voxel; pseudo voxels that would alter one are removed. A case's label
map covers the teacher's classes *and* the case's ground-truth classes: ground truth of a class the teacher does not
predict is kept too, so the new manifest annotates every class the source case annotated.

**Output folder.** Everything is written into a hidden temporary sibling of the output folder that is renamed into
place at the end (:func:`universal.io.atomic_folder`): the folder holds either the complete earlier output or the
complete new one, never a mixture; an error or an interruption (Ctrl+C, SIGTERM) leaves the earlier output as it
was. Only an absent or empty folder, or an earlier output of this function, is replaced; a folder holding other
files, or one the source cases' files lie in (pseudo-label a round's output into a new folder), is refused.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from universal import taxonomy
from universal.data import (
    Case,
    Manifest,
    case_targets,
    label_map_from_spec,
    load_manifest,
    universal_id_label_map_spec,
    validate_manifest,
    write_manifest,
)
from universal.errors import InputError
from universal.io import atomic_folder, atomic_write_text, load_volume, save_mask, to_json

__all__ = [
    "PseudoLabelConfig",
    "UnstorableGroundTruth",
    "pseudo_label",
    "merge_with_ground_truth",
    "encode_label_map",
    "quality_flags",
    "check_outdir",
]

PSEUDO_DATASET = "universal_pseudo"
#: what an earlier run of :func:`pseudo_label` leaves in its output folder (such a folder may be replaced)
OUTPUT_ENTRIES = ("manifest.json", "labels", "quality_report.json", "quality_report.csv")
#: what happens to a class the teacher predicts nowhere (``PseudoLabelConfig.empty_as_negative``; CLI ``--empty``)
EMPTY_POLICIES = {"absent": True, "unannotated": False}


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Rules that decide which predictions become pseudo-labels and which cases go to review.

    The probability threshold of the predicted masks is the teacher :class:`~universal.predictor.Predictor`'s (one
    home for it); these rules decide what happens to its predictions. Checked where they enter.

    Attributes:
        min_confidence: A predicted (non-empty) mask is accepted only if the mean probability inside it reaches
            this; otherwise the class stays unannotated for the case.
        empty_as_negative: An empty prediction counts as an annotated "absent" (True) or stays unannotated (False,
            the default: a weak teacher that predicts nothing would otherwise teach "absent" everywhere — the
            naive suppression that masked back-propagation exists to avoid).
        review_min_dsc: Flag a case when the model's prediction of a ground-truth class has a DSC below this.
        review_max_components: Flag an organ (other than naturally fragmented classes) with more components.
        review_min_confidence: Flag a case when an accepted pseudo-label's mean confidence is below this.
    """

    min_confidence: float = 0.75
    empty_as_negative: bool = False
    review_min_dsc: float = 0.5
    review_max_components: int = 1
    review_min_confidence: float = 0.85

    def __post_init__(self) -> None:
        for name in ("min_confidence", "review_min_dsc", "review_min_confidence"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise InputError(f"{name} is {v!r}; it must be a number in [0, 1]")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.empty_as_negative, bool):
            raise InputError(f"empty_as_negative is {self.empty_as_negative!r}; it must be True or False")
        v = self.review_max_components
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"review_max_components is {v!r}; it must be an integer >= 1")


# ------------------------------------------------------------------------------------------------ label storage
def encode_label_map(masks: Mapping[str, np.ndarray], ground_truth: Iterable[str] = ()) -> np.ndarray:
    """One-vs-all masks → int16 universal-id label map with ground truth on top.

    Draw order: pseudo organs, ground-truth organs, pseudo tumours, ground-truth tumours (each in index order), so
    a ground-truth organ is never painted over by a pseudo organ, and tumours stay over organs.
    """
    gt = set(ground_truth)
    items = [(taxonomy.resolve_class(n), np.asarray(m, dtype=bool)) for n, m in masks.items()]
    if not items:
        raise InputError("encode_label_map needs at least one mask")
    out = np.zeros(items[0][1].shape, dtype=np.int16)
    for info, m in sorted(items, key=lambda im: (im[0].is_tumor, im[0].name in gt, im[0].index)):
        out[m] = info.index
    return out


def _implied(names: Sequence[str]) -> dict[str, set[str]]:
    """For each class, the classes its universal-id label value sets (itself and its parent organ(s))."""
    spec = universal_id_label_map_spec(names)
    out: dict[str, set[str]] = {}
    for v, members in spec["labels"].items():
        name = taxonomy.resolve_class(int(v)).name
        out[name] = set(members) | set(spec.get("split_lr", {}).get(v, ()))
    return out


def merge_with_ground_truth(
    ground_truth: Mapping[str, np.ndarray],
    pseudo: Mapping[str, np.ndarray],
    affine: np.ndarray,
    classes: Sequence[str],
    max_rounds: int = 4,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Merge ground-truth and pseudo masks into one label map that decodes back to the ground truth exactly.

    A pseudo tumour is clipped to its ground-truth parent organ (when the parent is ground truth) and no pseudo
    class may paint over a ground-truth class its label value does not imply. The label map is then decoded as
    training will decode it; any voxel where a ground-truth class would differ is removed from the pseudo masks and
    the map re-encoded, until the ground truth survives exactly.

    Args:
        ground_truth: Class → bool mask for the classes the case annotates (kept voxel for voxel).
        pseudo: Class → bool mask for accepted predictions of the other classes.
        affine: Voxel → RAS+ affine of the grid (left/right decoding of paired parents).
        classes: The classes of the label map's inline spec (:func:`universal.data.universal_id_label_map_spec`).

    Returns:
        ``(label_map int16, decoded)`` where ``decoded`` maps every class of ``ground_truth`` and ``pseudo`` to the
        mask that the label map gives back (what training sees).

    Raises:
        RuntimeError: if the ground truth could not be preserved (a bug; never silently written).
    """
    names = list(classes)
    gt = {n: np.asarray(m, dtype=bool) for n, m in ground_truth.items()}
    ps = _clip_pseudo(pseudo, gt, _implied(names))
    spec_map = label_map_from_spec(PSEUDO_DATASET, universal_id_label_map_spec(names))
    wanted = [n for n in names if n in gt or n in ps]
    _check_storable(gt, spec_map, affine)
    for _ in range(max_rounds):
        label = encode_label_map({**ps, **gt}, ground_truth=gt)
        decoded_arr = taxonomy.transfer_labels(label, spec_map, affine, wanted)
        decoded = {n: decoded_arr[i] for i, n in enumerate(wanted)}
        bad = np.zeros(label.shape, dtype=bool)
        for g, m in gt.items():
            bad |= decoded[g] != m
        if not bad.any():
            return label, decoded
        for n in ps:
            ps[n] = ps[n] & ~bad
    raise RuntimeError(
        "pseudo-labels could not be merged without changing the ground truth; please report this case"
    )


def _clip_pseudo(
    pseudo: Mapping[str, np.ndarray], gt: Mapping[str, np.ndarray], implied: Mapping[str, set[str]]
):
    """Pseudo masks clipped so that a tumour stays inside its ground-truth parent organ and no pseudo class paints
    over a ground-truth class its label value does not imply (new arrays; inputs unchanged)."""
    ps: dict[str, np.ndarray] = {}
    for n, m in pseudo.items():
        m = np.asarray(m, dtype=bool).copy()
        imp = implied.get(n, {n})
        parents_gt = [g for g in imp - {n} if g in gt]
        if parents_gt:
            m &= _union(gt, parents_gt, m)
        others = [g for g in gt if g not in imp]
        if others:
            m &= ~_union(gt, others, m)
        ps[n] = m
    return ps


def _check_storable(gt: Mapping[str, np.ndarray], spec_map: Any, affine: np.ndarray) -> None:
    """Refuse ground truth that one universal-id label map cannot store (overlaps beyond tumour ⊂ organ)."""
    if not gt:
        return
    alone = taxonomy.transfer_labels(encode_label_map(gt, gt), spec_map, affine, list(gt))
    lost = [g for i, g in enumerate(gt) if not np.array_equal(alone[i], gt[g])]
    if lost:
        raise UnstorableGroundTruth(
            f"the ground truth of {lost} overlaps other classes in a way one universal-id label map cannot "
            "store (only tumours may lie inside their parent organ)"
        )


class UnstorableGroundTruth(InputError):
    """A case whose ground-truth classes overlap beyond tumour ⊂ parent organ (cannot be one label map)."""


def _union(masks: Mapping[str, np.ndarray], names: Iterable[str], like: np.ndarray) -> np.ndarray:
    out = np.zeros(like.shape, dtype=bool)
    for n in names:
        if n in masks:
            out |= masks[n]
    return out


# ------------------------------------------------------------------------------------------------ quality checks
def _components(mask: np.ndarray) -> int:
    from scipy import ndimage

    if not mask.any():
        return 0
    return int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1])


def _centroid_x(mask: np.ndarray, affine: np.ndarray) -> float:
    idx = np.argwhere(mask)
    c = idx.mean(axis=0)
    return float(affine[0, :3] @ c + affine[0, 3])


def quality_flags(
    masks: Mapping[str, np.ndarray],
    affine: np.ndarray,
    rows: Mapping[str, Mapping[str, Any]],
    config: PseudoLabelConfig,
) -> list[str]:
    """Review flags of one case (see the module docstring); ``rows`` are the per-class report entries."""
    from universal.postprocess import MULTI_COMPONENT_CLASSES

    flags: list[str] = []
    done: set[str] = set()
    for n, m in masks.items():
        info = taxonomy.resolve_class(n)
        if info.paired and info.side == "right" and info.paired in masks and n not in done:
            left = masks[info.paired]
            done |= {n, info.paired}
            if m.any() and left.any():
                xr, xl = _centroid_x(m, affine), _centroid_x(left, affine)
                if not xr > xl:
                    flags.append(
                        f"left/right implausible: {n} centroid x={xr:.1f} mm is not right of "
                        f"{info.paired} x={xl:.1f} mm (RAS+: right = larger x)"
                    )
    for n, row in rows.items():
        info = taxonomy.resolve_class(n)
        comps = row.get("components") or 0
        if (
            row.get("source") != "dropped"
            and not info.is_tumor
            and n not in MULTI_COMPONENT_CLASSES
            and comps > config.review_max_components
        ):
            flags.append(f"fragmented: {n} ({row['source']}) has {comps} components")
        if row.get("source") == "dropped" and math.isnan(row.get("mean_confidence", math.nan)):
            flags.append(f"empty: {n} is predicted nowhere; left unannotated")
        elif row.get("source") == "dropped":
            flags.append(
                f"low confidence: {n} mean p={row['mean_confidence']:.2f} < {config.min_confidence}; left unannotated"
            )
        elif row.get("source") == "pseudo":
            conf = row.get("mean_confidence")
            if conf is not None and not math.isnan(conf) and conf < config.review_min_confidence:
                flags.append(
                    f"uncertain: {n} pseudo-label mean p={conf:.2f} < {config.review_min_confidence}"
                )
        dsc = row.get("agreement_dsc")
        if (
            row.get("source") == "ground truth"
            and dsc is not None
            and not math.isnan(dsc)
            and dsc < config.review_min_dsc
        ):
            flags.append(f"disagreement: model vs ground truth {n} DSC={dsc:.2f} < {config.review_min_dsc}")
    return flags


# ------------------------------------------------------------------------------------------------------- main
def _as_cases(source: Any) -> tuple[list[Any], Path | None]:
    if isinstance(source, (str, os.PathLike)):
        source = load_manifest(source)
    if isinstance(source, Manifest):
        validate_manifest(source, strict=True)
        return list(source.cases), source.path
    cases = list(source)
    if not all(isinstance(c, Case) for c in cases):
        raise InputError("pseudo_label takes a manifest path, a Manifest or a list of universal.data.Case")
    return cases, None


def _as_predictor(teacher: Any):
    """The teacher as a :class:`~universal.predictor.Predictor` that also returns probabilities (the confidence
    rule needs them); a model, a name or a path gets the spec's settings."""
    from universal.predictor import Predictor

    predictor = teacher if isinstance(teacher, Predictor) else Predictor(teacher)
    if not predictor.settings.return_probabilities:
        predictor = predictor.with_settings(return_probabilities=True)
    return predictor


def pseudo_label(
    manifest_or_cases: Any,
    teacher: Any,
    out_dir: str | os.PathLike,
    config: PseudoLabelConfig | None = None,
    *,
    progress: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Pseudo-label a manifest's cases with ``teacher``; keep ground truth, fill the rest, write a new manifest.

    Args:
        manifest_or_cases: A manifest path, a :class:`~universal.data.Manifest` or a list of
            :class:`~universal.data.Case`.
        teacher: A :class:`~universal.predictor.Predictor` (its settings — classes, threshold, fast mode, device,
            post-processing — decide the predictions), or a model / checkpoint path / pretrained name (run with its
            spec's settings).
        out_dir: Output folder (``manifest.json``, ``labels/``, ``quality_report.json``/``.csv``), written whole or
            not at all: an earlier output there is replaced only once the new one is complete (on an error or
            Ctrl+C it stays as it was; see the module docstring).
        config: The acceptance and review rules (:class:`PseudoLabelConfig`; default: its defaults).

    Returns:
        ``(path of the new manifest, report)``; ``report["cases"]`` holds one dict per case with ``flags`` and
        ``report["settings"]`` the rules and the teacher's resolved settings that were used.

    Raises:
        InputError: a bad config or source, or an ``out_dir`` that is a file, holds files that are not an earlier
            output of this function, or holds the source cases' files (checked before any prediction).
        OSError: the folder cannot be written; nothing is left behind.
    """
    cfg = config or PseudoLabelConfig()
    if not isinstance(cfg, PseudoLabelConfig):
        raise InputError(f"config must be a PseudoLabelConfig, got {type(cfg).__name__}")
    cases, source_path = _as_cases(manifest_or_cases)
    predictor = _as_predictor(teacher)
    out = Path(out_dir)
    check_outdir(out, cases)
    iterator: Iterable[Any] = cases
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cases, desc="pseudo-label")
    with atomic_folder(out) as tmp:  # the earlier output stays whole until the new one is
        (tmp / "labels").mkdir()
        new_cases, reports = [], []
        for case in iterator:
            new_case, case_report = _label_case(case, predictor, cfg, tmp, out)
            new_cases.append(new_case)
            reports.append(case_report)
        write_manifest(new_cases, tmp / "manifest.json")  # paths relative to the folder: valid once renamed
        report = _run_report(source_path, out / "manifest.json", cfg, predictor, reports)
        _write_report(tmp, report)
    return out / "manifest.json", report


def _run_report(source: Path | None, manifest: Path, cfg: PseudoLabelConfig, predictor: Any, reports: list):
    """The report of a run: source and new manifest, the rules and teacher settings used, the cases, the flagged."""
    return {
        "source": str(source) if source else None,
        "manifest": str(manifest),
        "settings": {
            **asdict(cfg),
            "threshold": predictor.resolved.threshold,
            "teacher": predictor.describe(),
        },
        "cases": reports,
        "flagged": [r["case"] for r in reports if r["flags"]],
    }


def check_outdir(out: Path, cases: Sequence[Any] = ()) -> None:
    """Raise unless :func:`pseudo_label` may (re)place the folder ``out``: it is absent, empty, or holds only an
    earlier output (:data:`OUTPUT_ENTRIES`, ``labels/*.nii.gz``, hidden leftovers), and no file of ``cases`` lies
    inside it (replacing the folder would delete the source of a kept case).

    Raises:
        InputError: ``out`` is a file, holds other files (never deleted), or holds a source case's file.
    """
    out = out.resolve() if out.is_symlink() else out
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose an output folder")
    root = out.resolve()
    inside = [
        str(p)
        for c in cases
        for p in (c.image, c.label)
        if p is not None and Path(p).resolve().is_relative_to(root)
    ]
    if inside:
        raise InputError(
            f"the source cases' files lie in the output folder {out} ({inside[0]}, ...), which is replaced as a "
            "whole; write the pseudo-labels to another folder"
        )
    labels = out / "labels"
    known = all(e.name in OUTPUT_ENTRIES or e.name.startswith(".") for e in out.iterdir())
    if not known or (labels.is_dir() and not all(p.name.endswith(".nii.gz") for p in labels.iterdir())):
        raise InputError(
            f"{out} holds files that are not an earlier pseudo-label output (they are never replaced); choose an "
            "empty or new output folder"
        )


def _label_case(case: Any, predictor: Any, cfg: PseudoLabelConfig, folder: Path, out: Path):
    """One case: predict, keep ground truth, accept confident predictions, store the label map in ``folder``
    (the temporary folder renamed to ``out`` at the end) → (case, report)."""
    names = predictor.classes
    volume = load_volume(case.image)
    gt_names = list(case.ground_truth_classes())
    classes = list(names) + [n for n in gt_names if n not in names]  # ground truth the teacher lacks is kept
    gt_masks: dict[str, np.ndarray] = {}
    if gt_names:
        arr = case_targets(case, volume, gt_names)
        gt_masks = {n: arr[i] for i, n in enumerate(gt_names)}
    seg = predictor.predict(volume)
    rows, accepted = _accept(seg, gt_masks, names, cfg)
    if not gt_masks and not accepted:  # nothing to store: the case stays unlabeled (training skips it)
        return case, _unchanged_case_report(case, rows, "no pseudo-label accepted: the case stays unlabeled")
    try:
        label, final = merge_with_ground_truth(gt_masks, accepted, volume.affine, classes)
    except UnstorableGroundTruth as exc:  # kept as it was: never trade ground truth for pseudo-labels
        return case, _unchanged_case_report(case, rows, f"not pseudo-labelled: {exc}")
    _describe_final(rows, final, accepted, volume)
    flags = quality_flags(final, volume.affine, rows, cfg)
    label_path = folder / "labels" / f"{case.name}.nii.gz"
    save_mask(label, volume, label_path, dtype=np.int16)
    pseudo_map = label_map_from_spec(PSEUDO_DATASET, universal_id_label_map_spec(classes))
    return _pseudo_case(case, label_path, pseudo_map, classes, final, gt_masks), {
        "case": case.name,
        "dataset": case.dataset,
        "label": str(out / "labels" / label_path.name),
        "classes": rows,
        "flags": flags,
        "review": bool(flags),
    }


def _mean_inside(p: np.ndarray | None, mask: np.ndarray) -> float:
    return (
        float(np.asarray(p[mask], dtype=np.float32).mean())
        if (p is not None and mask.any())
        else float("nan")
    )


def _accept(seg: Any, gt_masks: Mapping[str, np.ndarray], names: Sequence[str], cfg: PseudoLabelConfig):
    """Per class: its report row (source, confidence, agreement with ground truth) and the accepted predictions."""
    from universal.metrics import dice

    probs = seg.probabilities or {}
    rows: dict[str, dict[str, Any]] = {}
    accepted: dict[str, np.ndarray] = {}
    for n in names:
        pred = np.asarray(seg.masks[n], dtype=bool)
        row: dict[str, Any] = {"mean_confidence": _mean_inside(probs.get(n), pred), "agreement_dsc": None}
        if n in gt_masks:
            # for ground truth: the model's agreement and its mean probability inside the ground-truth mask
            row.update(source="ground truth", agreement_dsc=float(dice(pred, gt_masks[n])))
            row["mean_confidence"] = _mean_inside(probs.get(n), gt_masks[n])
        elif not pred.any():
            row["source"] = "pseudo" if cfg.empty_as_negative else "dropped"
            if cfg.empty_as_negative:
                accepted[n] = pred
        elif row["mean_confidence"] >= cfg.min_confidence:
            row["source"] = "pseudo"
            accepted[n] = pred
        else:
            row["source"] = "dropped"
        rows[n] = row
    for n in gt_masks:  # ground truth of a class the teacher does not predict: kept, nothing to compare
        rows.setdefault(n, {"source": "ground truth", "mean_confidence": math.nan, "agreement_dsc": None})
    return rows, accepted


def _describe_final(
    rows: dict, final: Mapping[str, np.ndarray], accepted: Mapping[str, np.ndarray], volume
) -> None:
    voxel_ml = abs(float(np.linalg.det(np.asarray(volume.affine)[:3, :3]))) / 1000.0
    for n, row in rows.items():
        m = final.get(n)
        row["volume_ml"] = float(m.sum()) * voxel_ml if m is not None else None
        row["components"] = _components(m) if m is not None else None
        if m is not None and n in accepted:
            # predicted voxels the single label map could not keep (overlaps with ground truth / other classes)
            row["pseudo_voxels_lost"] = int(np.logical_and(accepted[n], ~m).sum())


def _pseudo_case(case: Any, label_path: Path, pseudo_map: Any, names, final, gt_masks):
    annotated = tuple(n for n in names if n in final)
    meta = dict(case.meta)
    meta["source_dataset"] = case.dataset
    if case.label is not None:
        meta["source_label"] = str(case.label)
    pseudo_classes = tuple(n for n in annotated if n not in gt_masks)
    return Case(
        case.name, Path(case.image), label_path, PSEUDO_DATASET, pseudo_map, annotated, pseudo_classes, meta
    )


def _names(classes: Iterable[str]) -> list[str]:
    return [c.name for c in taxonomy.resolve_classes(classes)]


def _unchanged_case_report(case: Any, rows: dict[str, dict[str, Any]], flag: str) -> dict[str, Any]:
    """The report entry of a case left as it was (flagged for review)."""
    return {
        "case": case.name,
        "dataset": case.dataset,
        "label": str(case.label) if case.label else None,
        "classes": rows,
        "flags": [flag],
        "review": True,
    }


def _write_report(out: Path, report: Mapping[str, Any]) -> None:
    atomic_write_text(
        out / "quality_report.json",
        json.dumps(to_json(report, default=str), indent=2, allow_nan=False) + "\n",
    )
    fields = [
        "case",
        "class",
        "source",
        "volume_ml",
        "components",
        "mean_confidence",
        "agreement_dsc",
        "review",
    ]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for c in report["cases"]:
        for n, row in c["classes"].items():
            w.writerow({"case": c["case"], "class": n, "review": c["review"], **to_json(row, default=str)})
    atomic_write_text(out / "quality_report.csv", buf.getvalue())
