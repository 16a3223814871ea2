"""Segmentation metrics: Dice (DSC) and normalised surface Dice (NSD), with the FLARE 2023 rules.

Masks are boolean ``(X, Y, Z)`` arrays on one voxel grid (RAS+ in this project, so the third axis is the axial
axis ``z``); spacing is in mm in array axis order.

**NSD** is the surface-area-weighted surface Dice of Nikolov et al. (the DeepMind ``surface-distance`` method,
also used by the FLARE evaluation code and by MONAI's ``compute_surface_dice(use_subvoxels=True)``):

1. Both masks are cropped to the bounding box of their union and padded by one empty voxel on every side.
2. Every 2x2x2 block of voxels (a "cube" whose corners are voxel centres) gets an 8-bit neighbour code.
   Cubes with a code other than 0 (all outside) and 255 (all inside) are surface elements ("surfels").
3. The surfel area is the area of the marching-cubes surface inside the cube (vertices at edge midpoints),
   scaled by the voxel spacing: see :func:`surfel_area_table`.
4. Distances in mm from each surfel to the other mask's surfels come from a Euclidean distance transform on the
   cube grid (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``).
5. NSD = (area of the prediction's surfels within ``tolerance_mm`` of the reference surface + area of the
   reference's surfels within ``tolerance_mm`` of the predicted surface) / (total area of both surfaces).

**FLARE 2023 rules** (``preset="flare23"``, from the challenge's public evaluation code ``FLARE23_DSC_NSD_Eval.py``):
classes 1 liver, 2 right kidney, 3 spleen, 4 pancreas, 5 aorta, 6 IVC, 7 right adrenal, 8 left adrenal,
9 gallbladder, 10 esophagus, 11 stomach, 12 duodenum, 13 left kidney, 14 lesion; NSD tolerances (mm)
5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3, 2. Both masks empty: DSC = NSD = 1; exactly one empty: 0.
Aorta, IVC and esophagus are first cropped to the reference's z-range -- exactly as the official code does it,
``[:, :, z_min:z_max]``, i.e. the reference's top slice ``z_max`` is *excluded* (a quirk of the official code that
:data:`FLARE23_PRESET` reproduces; pass a custom :class:`Preset` with ``zcrop_inclusive=True`` for the closed range).
NSD is set to 0 where DSC < 0.1 (the 2023 threshold; later editions use 0.2).

>>> import numpy as np
>>> a = np.zeros((20, 20, 20), bool); a[5:15, 5:15, 5:15] = True
>>> dice(a, a), surface_dice(a, a, (1.0, 1.0, 1.0), 1.0)
(1.0, 1.0)
>>> b = np.roll(a, 2, axis=0)
>>> round(dice(a, b), 3), round(surface_dice(a, b, (1.0, 1.0, 1.0), 1.0), 3)
(0.8, 0.723)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from universal import taxonomy
from universal.errors import InputError
from universal.postprocess import bounding_box

__all__ = [
    "ClassScore",
    "CaseResult",
    "Preset",
    "FLARE23_PRESET",
    "PRESETS",
    "get_preset",
    "FLARE23_TOLERANCES_MM",
    "DEFAULT_TOLERANCE_MM",
    "dice",
    "surface_dice",
    "surface_dice_parts",
    "surfel_area_table",
    "evaluate_case",
    "aggregate",
    "flare23_masks_from_label_map",
    "flare23_masks_from_universal",
    "universal_masks_from_label_map",
]

#: NSD tolerance (mm) per FLARE 2023 class id (1..13 organs, 14 lesion).
FLARE23_TOLERANCES_MM: dict[int, float] = {
    1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0, 8: 2.0, 9: 2.0, 10: 3.0, 11: 5.0, 12: 7.0, 13: 3.0,
    14: 2.0,
}  # fmt: skip
#: FLARE 2023 class ids cropped to the reference's z-range before scoring (aorta, IVC, esophagus).
FLARE23_ZCROP_IDS: tuple[int, ...] = (5, 6, 10)
#: Tolerance (mm) used without a preset for classes outside the FLARE 2023 label set.
DEFAULT_TOLERANCE_MM = 2.0

STATUS_OK = "ok"
STATUS_NOT_ANNOTATED = "not annotated"


# ------------------------------------------------------------------------------------------------ helpers
def _as_bool(mask: Any, what: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise InputError(f"{what} must be a 3-D (X, Y, Z) mask, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind == "f" and not ((arr == 0) | (arr == 1)).all():
        raise InputError(
            f"{what} holds values other than 0 and 1 (a probability map?), not a mask: threshold it first "
            "(e.g. prob >= 0.5)"
        )
    return arr != 0


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise InputError(f"prediction {p.shape} and reference {g.shape} masks must be on the same grid")
    return p, g


def _spacing3(spacing: Any) -> tuple[float, float, float]:
    s = (
        np.broadcast_to(np.asarray(spacing, dtype=np.float64).ravel(), (3,))
        if np.size(spacing) in (1, 3)
        else None
    )
    if s is None or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise InputError(f"spacing must be 3 positive numbers in mm (array axis order), got {spacing!r}")
    return (float(s[0]), float(s[1]), float(s[2]))


# ------------------------------------------------------------------------------------------------ Dice
def dice(pred: Any, gt: Any, *, empty_value: float = 1.0) -> float:
    """Dice similarity coefficient 2|P∩G| / (|P| + |G|).

    Args:
        pred: Predicted mask (X, Y, Z), bool or 0/1.
        gt: Reference mask on the same grid.
        empty_value: Returned when both masks are empty (1.0, the FLARE rule; pass ``nan`` to leave it undefined).

    >>> import numpy as np
    >>> dice(np.ones((2, 2, 2)), np.zeros((2, 2, 2)))
    0.0
    """
    p, g = _pair(pred, gt)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return float(empty_value)
    return 2.0 * int(np.count_nonzero(p & g)) / total


# ------------------------------------------------------------------------------------------------ surfels
def _corner_cube(code: int) -> np.ndarray:
    """The 2x2x2 occupancy of a neighbour code: bit ``4*i + 2*j + k`` is corner (i, j, k)."""
    bits = (code >> np.arange(8)) & 1
    return bits.reshape(2, 2, 2).astype(np.float64)


def _mc_area(cube: np.ndarray, spacing: tuple[float, float, float]) -> float:
    from skimage.measure import marching_cubes, mesh_surface_area

    verts, faces, _, _ = marching_cubes(cube, 0.5, spacing=spacing, method="lorensen", allow_degenerate=True)
    return float(mesh_surface_area(verts, faces)) if len(faces) else 0.0


@functools.lru_cache(maxsize=1)
def _surfel_configurations() -> tuple[int, ...]:
    """For each code, the configuration (the code itself or its complement) whose triangulation is used.

    Lorensen's marching-cubes table is not symmetric under complement for the ambiguous configurations (two corners
    diagonal on a face, ...): it separates the inside corners but joins the outside ones. The surface between inside
    and outside must not depend on which side is called inside, so for every code we use whichever of the two
    triangulations (of the code, or of its complement) has the smaller area -- the one that keeps diagonal corners
    apart. This reproduces the DeepMind / FLARE / MONAI table (checked in tests/test_metrics.py).
    """
    unit = (1.0, 1.0, 1.0)
    chosen = [0] * 256
    for code in range(1, 255):
        own = _mc_area(_corner_cube(code), unit)
        comp = _mc_area(_corner_cube(255 - code), unit)
        chosen[code] = code if own <= comp + 1e-12 else 255 - code
    return tuple(chosen)


@functools.lru_cache(maxsize=32)
def _surfel_area_table_cached(spacing: tuple[float, float, float]) -> np.ndarray:
    configs = _surfel_configurations()
    table = np.zeros(256, dtype=np.float64)
    for code in range(1, 255):
        table[code] = _mc_area(_corner_cube(configs[code]), spacing)
    table.setflags(write=False)
    return table


def surfel_area_table(spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Area (mm²) of the surface element of each of the 256 neighbour codes of a 2x2x2 voxel block.

    Computed by marching cubes (iso-level 0.5, vertices at edge midpoints) on each configuration with the given
    voxel spacing, complement-symmetric for the ambiguous cases (see ``_surfel_configurations``). Bit
    ``4*i + 2*j + k`` of a code is the corner voxel at offset (i, j, k). Cached per spacing.

    >>> t = surfel_area_table((1.0, 1.0, 1.0))
    >>> round(float(t[1]), 4), float(t[0]), float(t[255])   # one corner cut off: a triangle of area √3/8
    (0.2165, 0.0, 0.0)
    """
    return _surfel_area_table_cached(_spacing3(spacing))


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """uint8 neighbour codes of all 2x2x2 blocks of ``mask`` padded by one empty voxel (shape + 1 per axis)."""
    m = np.pad(mask, 1).view(np.uint8) if mask.dtype == bool else np.pad(mask != 0, 1).view(np.uint8)
    nx, ny, nz = (s - 1 for s in m.shape)
    code = np.zeros((nx, ny, nz), dtype=np.uint8)
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                code |= m[i : i + nx, j : j + ny, k : k + nz] << np.uint8(4 * i + 2 * j + k)
    return code


def surface_dice_parts(
    pred: Any, gt: Any, spacing: Sequence[float], tolerance_mm: float
) -> tuple[float, float, float, float]:
    """The four areas (mm²) behind the NSD: (pred area within tol, pred area, gt area within tol, gt area).

    Both masks are cropped to the bounding box of their union first (exact: every distance that matters lies
    inside it).
    """
    p, g = _pair(pred, gt)
    sp = _spacing3(spacing)
    box = bounding_box(p | g)
    if box is None:
        return 0.0, 0.0, 0.0, 0.0
    p, g = p[box], g[box]
    table = surfel_area_table(sp)
    code_p, code_g = _neighbour_codes(p), _neighbour_codes(g)
    border_p = (code_p != 0) & (code_p != 255)
    border_g = (code_g != 0) & (code_g != 255)
    area_p = table[code_p[border_p]]
    area_g = table[code_g[border_g]]
    total_p, total_g = float(area_p.sum()), float(area_g.sum())
    if not border_p.any() or not border_g.any():
        return 0.0, total_p, 0.0, total_g
    dist_to_g = ndimage.distance_transform_edt(~border_g, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~border_p, sampling=sp)
    ok_p = float(area_p[dist_to_g[border_p] <= tolerance_mm].sum())
    ok_g = float(area_g[dist_to_p[border_g] <= tolerance_mm].sum())
    return ok_p, total_p, ok_g, total_g


def surface_dice(
    pred: Any, gt: Any, spacing: Sequence[float], tolerance_mm: float, *, empty_value: float = 1.0
) -> float:
    """Normalised surface Dice (surface-area weighted, DeepMind neighbour-code surfels) at ``tolerance_mm``.

    Args:
        pred: Predicted mask (X, Y, Z).
        gt: Reference mask on the same grid.
        spacing: Voxel spacing in mm (array axis order); anisotropic spacing is honoured both in the surfel areas
            and in the distances.
        tolerance_mm: Surface distances up to and including this value count as correct.
        empty_value: Returned when both masks are empty (exactly one empty gives 0).

    No DSC gating here; :func:`evaluate_case` applies the FLARE rule (NSD = 0 where DSC < 0.1).
    """
    if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):
        raise InputError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    ok_p, total_p, ok_g, total_g = surface_dice_parts(pred, gt, spacing, tolerance_mm)
    total = total_p + total_g
    if total == 0.0:
        return float(empty_value)
    if total_p == 0.0 or total_g == 0.0:
        return 0.0
    return (ok_p + ok_g) / total


# ------------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    """Evaluation rules of a benchmark.

    Attributes:
        name: Identifier (``"flare23"``).
        classes: Class names in report order.
        tolerances_mm: NSD tolerance per class name.
        zcrop: Classes cropped to the reference's z-range (third array axis) before scoring.
        zcrop_inclusive: Whether that range includes the reference's top slice (the official FLARE code: no).
        nsd_min_dsc: NSD is set to 0 where DSC is below this.
        organ_classes: Classes averaged into the "organ" mean (FLARE reports organs and lesion separately).
    """

    name: str
    classes: tuple[str, ...]
    tolerances_mm: Mapping[str, float]
    zcrop: frozenset[str] = frozenset()
    zcrop_inclusive: bool = False
    nsd_min_dsc: float = 0.0
    organ_classes: tuple[str, ...] = ()


def _flare23_view() -> tuple[dict[int, str], tuple[str, ...]]:
    return dict(taxonomy.flare23_classes()), tuple(taxonomy.FLARE23_LESION_CLASSES)


def _flare23_preset() -> Preset:
    ids, _ = _flare23_view()
    names = tuple(ids[i] for i in sorted(ids))
    return Preset(
        name="flare23",
        classes=names,
        tolerances_mm={ids[i]: FLARE23_TOLERANCES_MM[i] for i in ids},
        zcrop=frozenset(ids[i] for i in FLARE23_ZCROP_IDS),
        zcrop_inclusive=False,
        nsd_min_dsc=0.1,
        organ_classes=tuple(ids[i] for i in sorted(ids) if i != 14),
    )


#: The FLARE 2023 rules (classes keyed by universal names + "lesion").
FLARE23_PRESET: Preset = _flare23_preset()


#: The presets by name (``None`` = no preset: generic rules).
PRESETS: dict[str, Preset] = {FLARE23_PRESET.name: FLARE23_PRESET}


def get_preset(preset: str | Preset | None) -> Preset | None:
    """A :class:`Preset` from its name (``"flare23"``; case, ``_`` and ``-`` ignored, ``"flare2023"`` too) or ``None``.

    >>> get_preset("FLARE-23").name, get_preset(None)
    ('flare23', None)
    """
    if preset is None or isinstance(preset, Preset):
        return preset
    key = str(preset).lower().replace("_", "").replace("-", "").replace(" ", "")
    key = {"flare2023": "flare23"}.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    raise InputError(
        f"unknown metrics preset {preset!r}: use one of {sorted(PRESETS)} or None (generic rules)"
    )


# ------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class ClassScore:
    """Scores of one class in one case (``n``: number of cases behind an :func:`aggregate` value)."""

    name: str
    dsc: float
    nsd: float
    status: str = STATUS_OK
    tolerance_mm: float = float("nan")
    n: int = 1


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


@dataclass(frozen=True)
class CaseResult:
    """Per-class DSC/NSD of one case (or of a set of cases, from :func:`aggregate`).

    Classes a dataset does not annotate carry status ``"not annotated"`` and NaN scores and are left out of
    every mean (they are not misses).
    """

    scores: dict[str, ClassScore]
    preset: str | None = None
    organ_classes: tuple[str, ...] = ()
    n_cases: int = 1
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ClassScore:
        return self.scores[name]

    @property
    def evaluated(self) -> list[str]:
        """Names of the classes actually scored (status ``"ok"``)."""
        return [n for n, s in self.scores.items() if s.status == STATUS_OK]

    def mean(self, classes: Iterable[str] | None = None) -> dict[str, float]:
        """Mean DSC and NSD over the scored classes (optionally a subset), NaN-free values only."""
        names = set(self.evaluated if classes is None else classes)
        sel = [s for n, s in self.scores.items() if n in names and s.status == STATUS_OK]
        return {"dsc": _nanmean(s.dsc for s in sel), "nsd": _nanmean(s.nsd for s in sel)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: ``{"classes": {name: {"dsc", "nsd", "status", "tolerance_mm"}}, "mean": {"dsc",
        "nsd"}}`` plus ``"organ_mean"`` (presets that report organs apart from lesions), ``"preset"``,
        ``"n_cases"`` and, for :func:`aggregate` results, ``"n"`` per class. NaN (not annotated) becomes ``None``.
        """

        def num(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        classes = {}
        for n, s in self.scores.items():
            entry: dict[str, Any] = {
                "dsc": num(s.dsc),
                "nsd": num(s.nsd),
                "status": s.status,
                "tolerance_mm": num(s.tolerance_mm),
            }
            if self.n_cases != 1:
                entry["n"] = s.n
            classes[n] = entry
        out: dict[str, Any] = {"classes": classes, "mean": {k: num(v) for k, v in self.mean().items()}}
        if self.organ_classes:
            out["organ_mean"] = {k: num(v) for k, v in self.mean(self.organ_classes).items()}
        out["preset"] = self.preset
        out["n_cases"] = self.n_cases
        return out

    def to_frame(self):  # pragma: no cover - thin pandas wrapper
        """A pandas DataFrame with one row per class (pandas imported lazily)."""
        import pandas as pd

        rows = [
            {
                "class": n,
                "dsc": s.dsc,
                "nsd": s.nsd,
                "tolerance_mm": s.tolerance_mm,
                "status": s.status,
                "n": s.n,
            }
            for n, s in self.scores.items()
        ]
        return pd.DataFrame(rows).set_index("class")

    def table(self, digits: int = 4) -> str:
        """A printable text table: one row per class, then the mean(s)."""

        def fmt(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:.{digits}f}"

        width = max([len("class"), len("mean (organs)"), *(len(n) for n in self.scores)])
        head = f"{'class':<{width}}  {'DSC':>{digits + 2}}  {'NSD':>{digits + 2}}  {'tol mm':>6}  status"
        if self.n_cases != 1:
            head += f"  (n of {self.n_cases} cases)"
        lines = [head, "-" * len(head)]
        for n, s in self.scores.items():
            tol = "-" if math.isnan(s.tolerance_mm) else f"{s.tolerance_mm:g}"
            row = (
                f"{n:<{width}}  {fmt(s.dsc):>{digits + 2}}  {fmt(s.nsd):>{digits + 2}}  {tol:>6}  {s.status}"
            )
            if self.n_cases != 1:
                row += f"  ({s.n})"
            lines.append(row)
        lines.append("-" * len(head))
        means = [("mean", self.mean())]
        if self.organ_classes:
            means.append(("mean (organs)", self.mean(self.organ_classes)))
        for label, m in means:
            lines.append(f"{label:<{width}}  {fmt(m['dsc']):>{digits + 2}}  {fmt(m['nsd']):>{digits + 2}}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------------------------------------ evaluation
def _score_class(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    tolerance_mm: float,
    *,
    zcrop: bool,
    zcrop_inclusive: bool,
    nsd_min_dsc: float,
) -> tuple[float, float]:
    p_any, g_any = bool(pred.any()), bool(gt.any())
    if not p_any and not g_any:
        return 1.0, 1.0
    if not p_any or not g_any:
        return 0.0, 0.0
    if zcrop:
        z = np.flatnonzero(np.any(gt, axis=(0, 1)))
        z0, z1 = int(z[0]), int(z[-1]) + (1 if zcrop_inclusive else 0)
        pred, gt = pred[:, :, z0:z1], gt[:, :, z0:z1]
    # after the crop both may be empty (a one-slice reference with the official half-open range): the official
    # code then yields NaN for DSC and NSD; we reproduce that rather than invent a value
    dsc = dice(pred, gt, empty_value=float("nan"))
    if dsc < nsd_min_dsc:
        return dsc, 0.0
    return dsc, surface_dice(pred, gt, spacing, tolerance_mm, empty_value=float("nan"))


def _tolerance_for(
    name: str, preset: Preset | None, tolerance_mm: float | Mapping[str, float] | None
) -> float:
    if isinstance(tolerance_mm, Mapping):
        if name in tolerance_mm:
            return float(tolerance_mm[name])
    elif tolerance_mm is not None:
        return float(tolerance_mm)
    if preset is not None and name in preset.tolerances_mm:
        return float(preset.tolerances_mm[name])
    ids, lesion = _flare23_view()
    by_name = {v: FLARE23_TOLERANCES_MM[k] for k, v in ids.items()}
    if name in by_name:
        return by_name[name]
    if name in lesion:
        return FLARE23_TOLERANCES_MM[14]
    return DEFAULT_TOLERANCE_MM


def _report_classes(
    rules: Preset | None,
    classes: Iterable[str] | None,
    pred_masks: Mapping[str, Any],
    gt_masks: Mapping[str, Any],
) -> list[str]:
    """The classes :func:`evaluate_case` reports: ``classes`` (checked against the preset), else the preset's,
    else the reference's keys then the prediction's."""
    if classes is None:
        if rules is not None:
            return list(rules.classes)
        return list(gt_masks) + [n for n in pred_masks if n not in gt_masks]
    names = list(dict.fromkeys(classes))
    if rules is not None:
        unknown = [n for n in names if n not in rules.classes]
        if unknown:
            raise InputError(f"{unknown} are not {rules.name} classes; choose from {list(rules.classes)}")
    return names


def _common_shape(pred_masks: Mapping[str, Any], gt_masks: Mapping[str, Any]) -> tuple[int, ...]:
    """The one grid shape of all masks (an :class:`InputError` when they differ or there are none)."""
    shapes = {np.shape(m) for m in (*pred_masks.values(), *gt_masks.values())}
    if len(shapes) > 1:
        raise InputError(f"all masks must be on one grid, got shapes {sorted(shapes)}")
    if not shapes:
        raise InputError("evaluate_case needs at least one mask to know the grid")
    (shape,) = shapes
    return shape


def _class_score(
    n: str,
    pred_masks: Mapping[str, Any],
    gt_masks: Mapping[str, Any],
    empty: np.ndarray,
    spacing: tuple[float, float, float],
    rules: Preset | None,
    tolerance_mm: float | Mapping[str, float] | None,
    annotated: bool,
) -> ClassScore:
    """The :class:`ClassScore` of class ``n`` (a class missing from a dict is an empty mask)."""
    tol = _tolerance_for(n, rules, tolerance_mm)
    if not annotated:
        return ClassScore(n, float("nan"), float("nan"), STATUS_NOT_ANNOTATED, tol)
    p = _as_bool(pred_masks[n], f"prediction {n!r}") if n in pred_masks else empty
    g = _as_bool(gt_masks[n], f"reference {n!r}") if n in gt_masks else empty
    dsc, nsd = _score_class(
        p,
        g,
        spacing,
        tol,
        zcrop=rules is not None and n in rules.zcrop,
        zcrop_inclusive=rules.zcrop_inclusive if rules is not None else False,
        nsd_min_dsc=rules.nsd_min_dsc if rules is not None else 0.0,
    )
    return ClassScore(n, float(dsc), float(nsd), STATUS_OK, tol)


def evaluate_case(
    pred_masks: Mapping[str, Any],
    gt_masks: Mapping[str, Any],
    spacing: Sequence[float],
    preset: str | Preset | None = None,
    classes: Iterable[str] | None = None,
    annotated: Iterable[str] | None = None,
    tolerance_mm: float | Mapping[str, float] | None = None,
    name: str = "",
) -> CaseResult:
    """DSC and NSD per class of one case.

    Args:
        pred_masks: Predicted masks keyed by class name, each a bool (X, Y, Z) array on the reference grid.
        gt_masks: Reference masks keyed by class name. With ``preset="flare23"`` both dicts are keyed by universal
            names (``"liver"``, ..., ``"left kidney"``) plus ``"lesion"``; when ``"lesion"`` is absent it is built as
            the union of the universal tumour classes present (``FLARE23_LESION_CLASSES``).
        spacing: Voxel spacing in mm (array axis order) -- the reference's.
        preset: ``"flare23"`` (its classes, tolerances, z-crop and DSC<0.1 rule) or ``None`` (generic: both empty →
            1/1, one empty → 0/0, no crop, no DSC gating).
        classes: Classes to report (default: the preset's, else the reference's keys then the prediction's).
        annotated: Classes the reference annotates; others are reported as ``"not annotated"`` (NaN, left out of
            means). Default: every preset class with ``preset``, else the keys of ``gt_masks``. An annotated class
            missing from a dict counts as an empty mask.
        tolerance_mm: NSD tolerance: a number for all classes, or a dict per class (falls back to the preset's,
            then to the FLARE 2023 value of that class, then :data:`DEFAULT_TOLERANCE_MM`).
        name: Case name (kept in the result).

    Returns:
        A :class:`CaseResult`.

    >>> import numpy as np
    >>> m = np.zeros((8, 8, 8), bool); m[2:6, 2:6, 2:6] = True
    >>> r = evaluate_case({"liver": m}, {"liver": m, "spleen": m}, (1, 1, 1))
    >>> r["liver"].dsc, r["spleen"].dsc, r.mean()["dsc"]
    (1.0, 0.0, 0.5)
    """
    rules = get_preset(preset)
    sp = _spacing3(spacing)
    if rules is not None and rules.name == "flare23":
        pred_masks = flare23_masks_from_universal(pred_masks)
        gt_masks = flare23_masks_from_universal(gt_masks)
    names = _report_classes(rules, classes, pred_masks, gt_masks)
    if annotated is None:
        annotated_set = set(rules.classes) if rules is not None else set(gt_masks)
    else:
        annotated_set = set(annotated)
    empty = np.zeros(_common_shape(pred_masks, gt_masks), dtype=bool)
    scores = {
        n: _class_score(n, pred_masks, gt_masks, empty, sp, rules, tolerance_mm, n in annotated_set)
        for n in names
    }
    organs = tuple(c for c in rules.organ_classes if c in scores) if rules is not None else ()
    return CaseResult(scores=scores, preset=rules.name if rules else None, organ_classes=organs, name=name)


def aggregate(results: Sequence[CaseResult]) -> CaseResult:
    """Mean DSC/NSD per class over cases, each class over the cases that annotate it (``ClassScore.n``).

    >>> import numpy as np
    >>> m = np.ones((4, 4, 4), bool)
    >>> r1 = evaluate_case({"liver": m}, {"liver": m}, (1, 1, 1))
    >>> r2 = evaluate_case({"liver": ~m}, {"liver": m}, (1, 1, 1))
    >>> aggregate([r1, r2])["liver"].dsc
    0.5
    """
    if not results:
        raise InputError("aggregate needs at least one CaseResult")
    names: list[str] = []
    for r in results:
        names += [n for n in r.scores if n not in names]
    scores = {}
    for n in names:
        sel = [r.scores[n] for r in results if n in r.scores and r.scores[n].status == STATUS_OK]
        tols = [r.scores[n].tolerance_mm for r in results if n in r.scores]
        if sel:
            scores[n] = ClassScore(
                n, _nanmean(s.dsc for s in sel), _nanmean(s.nsd for s in sel), STATUS_OK, tols[0], len(sel)
            )
        else:
            scores[n] = ClassScore(n, float("nan"), float("nan"), STATUS_NOT_ANNOTATED, tols[0], 0)
    first = results[0]
    organs = {c for r in results for c in r.organ_classes}  # every case's organs, whichever case comes first
    organ_classes = tuple(n for n in names if n in organs)
    return CaseResult(scores=scores, preset=first.preset, organ_classes=organ_classes, n_cases=len(results))


# ------------------------------------------------------------------------------------------------ label maps
def flare23_masks_from_label_map(label_map: Any) -> dict[str, np.ndarray]:
    """Masks keyed by FLARE 2023 class name (universal names + ``"lesion"``) from a map carrying FLARE ids 1-14.

    Every class is present (empty masks for absent labels).
    """
    lab = np.asarray(label_map)
    if lab.ndim != 3:
        raise InputError(f"a label map must be 3-D (X, Y, Z), got shape {lab.shape}")
    ids, _ = _flare23_view()
    return {ids[i]: lab == i for i in sorted(ids)}


def flare23_masks_from_universal(masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The FLARE 2023 view of masks keyed by universal names: the 13 organs as they are, ``"lesion"`` = the given
    ``"lesion"`` mask or else the union of the universal tumour classes present. Classes absent stay absent.

    Other classes are dropped. Inputs are not modified (the lesion union is a new array).
    """
    ids, lesion_classes = _flare23_view()
    out: dict[str, np.ndarray] = {}
    for i in sorted(ids):
        n = ids[i]
        if n in masks:
            out[n] = np.asarray(masks[n])
    lesion_name = ids.get(14, "lesion")
    if lesion_name not in out:
        parts = [np.asarray(masks[n]) != 0 for n in lesion_classes if n in masks]
        if parts:
            out[lesion_name] = np.logical_or.reduce(parts) if len(parts) > 1 else parts[0].copy()
    return out


def universal_masks_from_label_map(
    label_map: Any, classes: Iterable[str | int] | None = None, *, include_parents: bool = True
) -> dict[str, np.ndarray]:
    """One-vs-all masks keyed by universal class name from a label map carrying universal ids (1..32).

    A class's mask is ``label_map == its index``. With ``include_parents`` (default), tumour voxels (drawn over
    their organ in a label map) also count as their parent organ, as the project's one-vs-all convention says:
    with a single candidate parent (liver tumour → liver) all of them; with several candidates (kidney tumour →
    right or left kidney) each connected tumour component goes to the candidate organ it touches most (26-connected
    contact); a component touching none of them is added to no organ.

    Args:
        label_map: Integer (X, Y, Z) array of universal ids.
        classes: Universal names or ids to return (default: all 32, in index order).
        include_parents: Add tumour voxels to their parent organ.
    """
    lab = np.asarray(label_map)
    if lab.ndim != 3:
        raise InputError(f"a label map must be 3-D (X, Y, Z), got shape {lab.shape}")
    wanted = taxonomy.resolve_classes(classes)
    present = {int(v) for v in np.unique(lab)} - {0}
    masks = {c.name: lab == c.index for c in wanted}
    if not include_parents:
        return masks
    wanted_names = {c.name for c in wanted}
    by_name = {c.name: c for c in taxonomy.CLASSES}
    for tumor in taxonomy.CLASSES:
        parents = _parents(tumor)
        if tumor.kind != "tumor" or not parents or tumor.index not in present:
            continue
        targets = [p for p in parents if p in wanted_names]
        if not targets:
            continue
        tmask = lab == tumor.index
        if len(parents) == 1:
            masks[targets[0]] = masks[targets[0]] | tmask
            continue
        comps, ncomp = ndimage.label(tmask, structure=np.ones((3, 3, 3), bool))
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            grow = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
            comp = comps[grow] == k
            ring = ndimage.binary_dilation(comp, structure=np.ones((3, 3, 3), bool)) & ~comp
            contact = {p: int(np.count_nonzero(ring & (lab[grow] == by_name[p].index))) for p in parents}
            best = max(parents, key=lambda p: contact[p])
            if contact[best] > 0 and best in masks:
                sub = masks[best][grow]
                masks[best][grow] = sub | comp
    return masks


def _parents(info: Any) -> tuple[str, ...]:
    parent = getattr(info, "parent", None)
    if parent is None:
        return ()
    if isinstance(parent, str):
        return (parent,)
    return tuple(parent)
