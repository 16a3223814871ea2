"""The evaluation layer: a reference under a label convention, the classes to score, and a preset.

One question -- how good is this segmentation against that reference? -- gets one answer whether ``universal
evaluate``, the dashboard, ``bench/accuracy.py`` or a notebook asks it:

1. :func:`read_reference` reads the reference: a label map whose ids follow a **convention** -- ``"universal"``
   (the taxonomy's ids 1-32), ``"flare23"`` (FLARE 2023 ids: 1-13 organs, 14 lesion) or any dataset registered in
   :mod:`universal.taxonomy` (``"totalsegmentator_v2"``, ``"msd_liver"``, ...; its ids are mapped onto universal
   classes with :func:`~universal.taxonomy.transfer_labels`) -- or a folder of masks written by ``universal
   segment`` (``masks/<class_name>.nii.gz``), or masks in memory. It also knows which classes the reference
   **annotates**: a dataset's annotated classes, all 14 FLARE classes, the classes a universal-id map contains, the
   masks a folder holds.
2. :func:`read_prediction` reads what was **segmented**: a :class:`~universal.inference.Segmentation` or a
   ``universal segment`` output folder (every class it holds, empty or not), or a label map (the classes present).
3. :func:`choose_classes` picks the classes to score: by default those segmented **and** annotated; every other
   class is reported as skipped, with the reason (``"not segmented"``, ``"not annotated"``, ``"not a flare23
   class"``).
4. :func:`evaluate` scores them with :func:`universal.metrics.evaluate_case` (the scoring engine) under a preset
   and returns an :class:`EvaluationResult`: a :class:`~universal.metrics.CaseResult` that also says what it
   skipped and why, which convention the reference was read with, and where it came from.

**Preset x convention.** Every combination is defined:

==========================  =====================================  =========================================
reference convention         ``preset=None`` (generic rules)        ``preset="flare23"``
==========================  =====================================  =========================================
``universal`` / masks        by universal class name                the FLARE view of both: the 13 organs as
                                                                    they are, ``lesion`` = union of the
                                                                    tumour classes the reference annotates
``flare23``                  by FLARE name: the prediction is put   the same view, FLARE 2023 rules
                             into a FLARE label map first (lesion
                             drawn over organs, so an organ loses
                             its lesion voxels as FLARE's labels
                             do; tumour classes become ``lesion``)
a dataset                    the dataset's ids mapped to universal  the FLARE view of the mapped masks;
                             classes, compared by name              ``lesion`` only where the dataset
                                                                    annotates a tumour class, built from
                                                                    those tumour classes on both sides
==========================  =====================================  =========================================

In FLARE's view a predicted tumour class the reference does not annotate (a kidney tumour against MSD Liver) is
skipped as "not annotated" rather than counted as a false lesion. A universal-id label map says nothing about the
classes absent from it, so it annotates only the classes it contains (``read_reference(..., annotated=...)`` says
more).

Refused with an :class:`~universal.errors.InputError` that says why and what to do: label values outside the
convention's ids (e.g. TotalSegmentator ids read as universal or FLARE ids); a convention other than
``"universal"`` for masks named by class (a folder, masks by name: their names say the classes); a label map without a stated convention under a preset (the FLARE preset
once implied FLARE ids, so nothing is assumed); nothing to score (no class both segmented and annotated -- under
``flare23``, no FLARE class); masks on another grid than the reference's.

>>> import numpy as np
>>> from universal.io import volume_from_array
>>> grid = volume_from_array(np.zeros((16, 16, 16), np.float32), spacing=(2, 2, 2), check=False)
>>> ts = np.zeros(grid.shape, np.uint8); ts[2:8, 2:8, 2:8] = 5; ts[10:14, 10:14, 10:14] = 1  # TS: liver, spleen
>>> ref = read_reference(ts, "totalsegmentator_v2", like=grid)
>>> result = evaluate({"liver": ts == 5}, ref, preset="flare23")
>>> result["liver"].dsc, result.skipped["spleen"]
(1.0, 'not segmented')
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from universal import metrics, taxonomy
from universal.errors import InputError

__all__ = [
    "PRESETS",
    "UNIVERSAL",
    "FLARE23",
    "NOT_SEGMENTED",
    "NOT_ANNOTATED",
    "Reference",
    "Prediction",
    "EvaluationResult",
    "conventions",
    "convention_label",
    "resolve_convention",
    "read_reference",
    "read_prediction",
    "choose_classes",
    "evaluate",
    "check_json_path",
]

#: Preset names :func:`evaluate` accepts besides ``None`` (generic rules).
PRESETS: tuple[str, ...] = tuple(metrics.PRESETS)
#: The universal id convention (ids 1-32 of the taxonomy).
UNIVERSAL = "universal"
#: The FLARE 2023 id convention (1-13 organs, 14 lesion); the taxonomy's ``flare23`` dataset is read as this.
FLARE23 = "flare23"
#: FLARE's lesion class: pan-cancer lesions without an organ's name (not a universal class).
LESION = taxonomy.flare23_classes()[taxonomy.FLARE23.lesion_id]
#: Why a class was skipped: it is annotated by the reference but was not segmented.
NOT_SEGMENTED = "not segmented"
#: Why a class was skipped: it was segmented but the reference does not annotate it (not a miss).
NOT_ANNOTATED = metrics.STATUS_NOT_ANNOTATED

_UNIVERSAL_KEYS = {"universal", "universalids"}
_FLARE23_KEYS = {"flare23", "flare2023", "flare23ids", "flare2023ids"}


# ------------------------------------------------------------------------------------------------ conventions
def conventions() -> list[str]:
    """The label conventions a reference (or a predicted label map) may use: ``"universal"``, ``"flare23"``, then
    the taxonomy's datasets.

    >>> conventions()[:2], "totalsegmentator_v2" in conventions()
    (['universal', 'flare23'], True)
    """
    return [UNIVERSAL, FLARE23, *(d for d in taxonomy.list_datasets() if d != FLARE23)]


def convention_label(convention: str) -> str:
    """A short description of a convention (what the dashboard lists; :func:`resolve_convention` reads it back).

    >>> convention_label("universal"), convention_label("flare23"), convention_label("msd_liver")
    ('universal ids (1-32)', 'FLARE 2023 ids (1-14)', 'dataset: msd_liver')
    """
    conv = resolve_convention(convention)
    if conv == UNIVERSAL:
        return f"universal ids (1-{taxonomy.NUM_CLASSES})"
    if conv == FLARE23:
        return f"FLARE 2023 ids (1-{max(taxonomy.flare23_classes())})"
    return f"dataset: {conv}"


def resolve_convention(name: str | None) -> str:
    """The canonical convention of a name, an alias or a :func:`convention_label` (``None`` → ``"universal"``).

    Raises:
        InputError: for an unknown name (the message lists the conventions and the closest dataset names).

    >>> resolve_convention("TotalSegmentator"), resolve_convention("FLARE 2023 ids (1-14)")
    ('totalsegmentator_v2', 'flare23')
    """
    if name is None:
        return UNIVERSAL
    text = str(name).strip()
    if text.lower().startswith("dataset:"):
        text = text.split(":", 1)[1].strip()
    key = re.sub(r"[^a-z0-9]", "", text.split("(")[0].lower())
    if key in _UNIVERSAL_KEYS:
        return UNIVERSAL
    if key in _FLARE23_KEYS:
        return FLARE23
    try:
        conv = taxonomy.dataset(text).name
    except taxonomy.DatasetNameError as exc:
        raise InputError(
            f"unknown label convention {name!r}: use 'universal' (ids 1-{taxonomy.NUM_CLASSES}), 'flare23' "
            f"(FLARE 2023 ids 1-14) or a dataset. {exc}"
        ) from exc
    return FLARE23 if conv == FLARE23 else conv


def _max_id(convention: str) -> int:
    if convention == UNIVERSAL:
        return taxonomy.NUM_CLASSES
    if convention == FLARE23:
        return max(taxonomy.flare23_classes())
    ds = taxonomy.dataset(convention)
    return max(ds.max_label, *ds.labels, *ds.split_lr, *ds.unmapped)


def _check_ids(label: np.ndarray, convention: str, name: str) -> None:
    """An :class:`InputError` when ``label`` holds values that are not ids of ``convention``."""
    if not np.issubdtype(label.dtype, np.integer) and label.dtype != bool:
        if not np.array_equal(label, np.rint(label)):
            raise InputError(f"{name} has non-integer values: a label map holds integer ids")
    values = np.unique(label)
    top = _max_id(convention)
    bad = [int(v) for v in values if v < 0 or v > top]
    if not bad:
        return
    if int(values.min()) < 0:
        raise InputError(
            f"{name} holds negative values ({int(values.min())}...), which are no label ids: it looks like a CT "
            "in HU, not a label map; pass the label map (0 = background)"
        )
    fits = [c for c in conventions() if c != convention and _max_id(c) >= int(values.max())]
    hint = f"its values fit {', '.join(fits[:4])}" if fits else "no known convention has ids that high"
    api, option = _convention_option("prediction" if name.startswith("the prediction") else "reference")
    raise InputError(
        f"label values {bad[:6]} of {name} are not {convention_label(convention)}: {hint}; say "
        f"which ids the file carries ({api}=..., on the command line {option})"
    )


def _convention_option(what: str) -> tuple[str, str]:
    """The argument and the command-line option that give the convention of the ``what`` side."""
    return (
        ("prediction_convention", "--pred-dataset")
        if what == "prediction"
        else ("convention", "--gt-dataset")
    )


def _refuse_convention_for_masks(source: Any, convention: str, what: str) -> None:
    """The one rule for masks named by class (a folder, masks by name, a Segmentation): their names say the
    classes, and a convention gives the ids of a label map, so any but the default (``"universal"``: universal
    class names) would change nothing.

    Raises:
        InputError: for a convention other than ``"universal"`` given with masks named by class.
    """
    if convention == UNIVERSAL or _is_label_map(source):
        return
    api, option = _convention_option(what)
    if _is_path(source):
        side = "PRED" if what == "prediction" else "GT"
        raise InputError(
            f"{option} {convention} gives the ids of a label map, but {side} {source} is a folder of masks named "
            f"by class (their file names say the classes): leave {option} out ({api}= in Python)"
        )
    raise InputError(
        f"{api}={convention!r} gives the ids of a label map, but the {what} masks are named by class: leave it out"
    )


# ------------------------------------------------------------------------------------------------ readers
@dataclass(frozen=True)
class Reference:
    """A reference segmentation on its grid.

    Attributes:
        masks: Class name → bool (X, Y, Z) mask on ``grid``, keyed by universal class name (with the ``"flare23"``
            convention: the 13 FLARE organs by universal name and ``"lesion"``).
        annotated: The classes the reference annotates; a class outside it is never scored (not a miss).
        convention: The id space the label map was read in (see :func:`conventions`).
        grid: The grid: a :class:`~universal.io.Volume` or anything with ``shape``, ``spacing`` (mm) and
            ``affine``.
        name: Where it came from (a file name), for reports.
        from_label_map: Read from a label map (its ids under ``convention``), not from masks named by class.
    """

    masks: Mapping[str, np.ndarray]
    annotated: tuple[str, ...]
    convention: str
    grid: Any
    name: str = ""
    from_label_map: bool = True

    def describe(self) -> str:
        """Where the reference came from and how it was read, e.g. ``"gt.nii.gz (dataset: msd_liver)"``."""
        how = convention_label(self.convention) if self.from_label_map else "masks named by class"
        return f"{self.name} ({how})"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm (array axis order): the NSD's distances are measured with it."""
        return tuple(float(s) for s in self.grid.spacing)  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.grid.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class Prediction:
    """What was segmented: masks by class name and the classes that count as segmented."""

    masks: Mapping[str, np.ndarray]
    segmented: tuple[str, ...]
    convention: str = UNIVERSAL
    name: str = ""


@dataclass(frozen=True)
class _Grid:
    """A grid known only by shape and spacing (masks given in memory with ``spacing=``)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        return np.diag([*self.spacing, 1.0])


def _class_key(name: str) -> str:
    """A universal class name (or FLARE's ``"lesion"``) from a name, an alias or a mask file stem."""
    text = str(name).strip().replace("_", " ")
    return LESION if text.lower() == LESION else taxonomy.resolve_class(text).name


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _is_label_map(source: Any) -> bool:
    return isinstance(source, np.ndarray) or (_is_path(source) and not Path(source).is_dir())


def _mask_files(path: Path) -> list[Path]:
    """The mask files of a ``universal segment`` output folder (``masks/*.nii*``) or of a folder of masks."""
    folder = path / "masks" if (path / "masks").is_dir() else path
    files = sorted(folder.glob("*.nii*"))
    if not files:
        raise InputError(
            f"{path} is a folder without masks (masks/*.nii.gz): pass an output folder of `universal segment`, "
            "a folder of masks named by class, or a label map file"
        )
    return files


def _names_convention(masks: Mapping[str, Any]) -> str:
    """Masks keyed by name are in FLARE's view when they have its ``lesion`` class, else universal."""
    return FLARE23 if LESION in masks else UNIVERSAL


def _read_mask_folder(
    path: Path, convention: str, like: Any, what: str = "reference"
) -> tuple[dict[str, np.ndarray], Any]:
    from universal.io import label_grid, load_label

    _refuse_convention_for_masks(path, convention, what)
    files = _mask_files(path)
    grid = like if like is not None else label_grid(files[0])
    role = f"{what} mask" if like is not None else None  # a grid given from outside: say how each was placed
    return {_class_key(f.name.split(".")[0]): load_label(f, like=grid, role=role) > 0 for f in files}, grid


def _from_mapping(masks: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    out = {_class_key(n): metrics._as_bool(m, f"the {what} mask {n!r}") for n, m in masks.items()}
    shapes = {m.shape for m in out.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise InputError(f"the {what} masks must be on one 3-D grid, got shapes {sorted(shapes)}")
    return out


def _grid_of(shape: tuple[int, ...], like: Any, spacing: Any, what: str) -> Any:
    """``like``, else a grid of ``shape`` and ``spacing`` (mm): arrays in memory need one of them."""
    if like is not None:
        return like
    if spacing is None:
        raise InputError(f"a {what} given as arrays needs like= (the Volume it lies on) or spacing= (mm)")
    return _Grid(tuple(shape), metrics._spacing3(spacing))


def _read_label_map(
    source: Any, like: Any, spacing: Any, what: str = "reference"
) -> tuple[np.ndarray, Any, str]:
    """An integer label array on its grid: a file (on its own grid unless ``like``) or an array (on ``like``);
    a file placed onto ``like`` by a whole-voxel crop/pad (e.g. a prediction on a smaller grid) is warned about."""
    from universal.io import label_grid, load_label

    if _is_path(source):
        path = Path(source)
        if like is not None:
            return load_label(path, like=like, role=what), like, path.name
        grid = label_grid(path)
        lab = np.rint(grid.array).astype(np.int32)
        return lab, grid.with_array(lab), path.name
    lab = np.asarray(source)
    if lab.ndim != 3:
        raise InputError(f"a label map must be 3-D (X, Y, Z), got shape {lab.shape}")
    grid = _grid_of(lab.shape, like, spacing, "label map")
    if lab.shape != tuple(grid.shape):
        raise InputError(
            f"the label map's grid {lab.shape} does not match the CT's {tuple(grid.shape)}; "
            "give the label map that belongs to this scan"
        )
    return lab, grid, "label map"


def _masks_from_label_map(label: np.ndarray, convention: str, affine: Any) -> tuple[dict, tuple[str, ...]]:
    """Masks by class name and the classes the map annotates, under ``convention``."""
    if convention == UNIVERSAL:
        present = sorted(int(v) for v in np.unique(label) if v != 0)
        masks = metrics.universal_masks_from_label_map(label, classes=present)
        return masks, tuple(masks)
    if convention == FLARE23:
        masks = metrics.flare23_masks_from_label_map(label)
        return masks, tuple(masks)
    ds = taxonomy.dataset(convention)
    names = list(ds.annotated)
    arr = taxonomy.transfer_labels(label, ds, np.asarray(affine), classes=names)
    return dict(zip(names, arr)), tuple(names)


def _read(source: Any, convention: str | None, like: Any, spacing: Any, what: str) -> tuple:
    """(masks, classes the source lists, convention, grid, name, is a label map) of any source."""
    conv = resolve_convention(convention)
    if isinstance(source, Mapping):
        _refuse_convention_for_masks(source, conv, what)
        masks = _from_mapping(source, what)
        grid = _grid_of(next(iter(masks.values())).shape, like, spacing, what)
        return masks, tuple(masks), _names_convention(masks), grid, f"{what} masks", False
    if _is_path(source) and Path(source).is_dir():
        masks, grid = _read_mask_folder(Path(source), conv, like, what)
        return masks, tuple(masks), _names_convention(masks), grid, Path(source).name, False
    label, grid, name = _read_label_map(source, like, spacing, what)
    _check_ids(label, conv, f"the {what} {name}")
    masks, listed = _masks_from_label_map(label, conv, grid.affine)
    return masks, listed, conv, grid, name, True


def read_reference(
    source: Any,
    convention: str | None = UNIVERSAL,
    like: Any = None,
    *,
    annotated: Iterable[str] | None = None,
    spacing: Any = None,
) -> Reference:
    """Read a reference segmentation.

    Args:
        source: A label map (file or integer (X, Y, Z) array), a folder of masks (an output of ``universal
            segment``: ``masks/<class_name>.nii.gz``), masks by class name, or a :class:`Reference` (returned).
        convention: The id space of a label map: ``"universal"``, ``"flare23"`` or a dataset (see
            :func:`conventions`; aliases and :func:`convention_label` work). Masks named by class need none.
        like: The grid to read onto (the CT's :class:`~universal.io.Volume`); default: the file's own grid.
            Required for arrays unless ``spacing`` is given.
        annotated: The classes the reference annotates, instead of what the convention says (a dataset: its
            annotated classes; ``flare23``: all 14; ``universal``: the classes present; masks: their names).
        spacing: Voxel spacing (mm) of arrays given without ``like``.
    """
    if isinstance(source, Reference):
        return source
    masks, listed, conv, grid, name, is_map = _read(source, convention, like, spacing, "reference")
    if annotated is not None:
        listed = tuple(dict.fromkeys(_class_key(n) for n in annotated))
    return Reference(masks, listed, conv, grid, name, is_map)


def read_prediction(
    source: Any, convention: str | None = UNIVERSAL, like: Any = None, *, spacing: Any = None
) -> Prediction:
    """Read what was segmented: a Segmentation (``.masks``), masks by name, a ``universal segment`` output folder
    (every class it holds counts as segmented, found or not), or a label map (the classes present in it)."""
    if isinstance(source, Prediction):
        return source
    if isinstance(source, Mapping) or hasattr(source, "masks"):
        _refuse_convention_for_masks(source, resolve_convention(convention), "prediction")
        masks = _from_mapping(source if isinstance(source, Mapping) else source.masks, "prediction")
        name = getattr(getattr(source, "volume", None), "name", "prediction")
        return Prediction(masks, tuple(masks), _names_convention(masks), name)
    masks, listed, conv, _, name, is_map = _read(source, convention, like, spacing, "prediction")
    # a universal-id map says only what it holds; a FLARE or dataset map speaks for all its classes, as the
    # reference side does (an absent class is empty: a missed organ scores 0, never drops out of the mean)
    segmented = tuple(n for n in listed if masks[n].any()) if is_map and conv == UNIVERSAL else listed
    return Prediction(masks, segmented, conv, name)


# ------------------------------------------------------------------------------------------------ classes
def _flare_split(names: Iterable[str], to_lesion: Iterable[str]) -> tuple[list[str], list[str]]:
    """Names in FLARE's view -- its organs as they are, the tumour classes of ``to_lesion`` as ``lesion``, other
    tumour classes under their own name -- and the names outside it."""
    flare, to_lesion = set(taxonomy.flare23_classes().values()), set(to_lesion)
    inside: list[str] = []
    outside: list[str] = []
    for n in names:
        if n in taxonomy.FLARE23_LESION_CLASSES:
            inside.append(LESION if n in to_lesion else n)
        else:
            (inside if n in flare else outside).append(n)
    return list(dict.fromkeys(inside)), list(dict.fromkeys(outside))


def _order_key(flare: bool):
    flare_ids = {n: i for i, n in taxonomy.flare23_classes().items()} if flare else {}
    index = {c.name: c.index for c in taxonomy.CLASSES}

    def key(name: str) -> tuple[int, int]:
        if name in flare_ids:
            return (0, flare_ids[name])
        return (1, index.get(name, 10_000))

    return key


def _requested(requested: Iterable[str], flare: bool, rules: metrics.Preset | None) -> list[str]:
    names = [_class_key(r) for r in ([requested] if isinstance(requested, str) else requested)]
    if flare:
        names = [LESION if n in taxonomy.FLARE23_LESION_CLASSES else n for n in names]
    if rules is not None:
        unknown = [n for n in names if n not in rules.classes]
        if unknown:
            raise InputError(f"{unknown} are not {rules.name} classes; choose from {list(rules.classes)}")
    return list(dict.fromkeys(names))


def choose_classes(
    predicted: Prediction | Iterable[str],
    reference: Reference | Iterable[str],
    requested: Iterable[str] | None = None,
    *,
    preset: str | metrics.Preset | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The classes to score, and the others with the reason each is skipped.

    Args:
        predicted: A :class:`Prediction` or the names of the segmented classes.
        reference: A :class:`Reference` or the names of the classes it annotates.
        requested: Classes asked for (default: every class segmented or annotated).
        preset: With ``"flare23"`` (or a ``flare23``-convention reference) names are in FLARE's view: tumour
            classes count as ``"lesion"``; under the preset, other classes are skipped as ``"not a flare23 class"``.

    Returns:
        ``(scored, skipped)``: the classes both segmented and annotated (FLARE order in FLARE's view, else taxonomy
        order), and ``{class: reason}`` for the rest (:data:`NOT_SEGMENTED`, :data:`NOT_ANNOTATED`, ...).

    >>> choose_classes(["liver", "colon"], ["liver", "spleen"])
    (['liver'], {'spleen': 'not segmented', 'colon': 'not annotated'})
    """
    _, scored, skipped = _choose(predicted, reference, requested, metrics.get_preset(preset))
    return scored, skipped


def _choose(
    predicted: Any, reference: Any, requested: Iterable[str] | None, rules: metrics.Preset | None
) -> tuple[list[str], list[str], dict[str, str]]:
    """:func:`choose_classes` plus the candidate classes in report order."""
    seg = list(predicted.segmented if isinstance(predicted, Prediction) else predicted)
    ann = list(reference.annotated if isinstance(reference, Reference) else reference)
    conv = reference.convention if isinstance(reference, Reference) else _names_convention(dict.fromkeys(ann))
    flare = rules is not None or conv == FLARE23
    skipped: dict[str, str] = {}
    if flare:  # predicted tumour classes count as the lesion, but only those the reference annotates, if any
        tumours = taxonomy.FLARE23_LESION_CLASSES
        ann_tumours = set(ann) & set(tumours)
        seg_in, seg_out = _flare_split(seg, tumours if LESION in ann or not ann_tumours else ann_tumours)
        ann_in, ann_out = _flare_split(ann, tumours)
        if rules is not None:
            skipped.update({n: f"not a {rules.name} class" for n in seg_out})
            seg_out, ann_out = [], []
        seg, ann = seg_in + seg_out, ann_in + ann_out
    if requested is not None:
        candidates = _requested(requested, flare, rules)
    else:
        candidates = sorted(dict.fromkeys(seg + ann), key=_order_key(flare))
    scored = []
    for n in candidates:
        if n in seg and n in ann:
            scored.append(n)
        elif n not in skipped:
            skipped[n] = NOT_ANNOTATED if n in seg else NOT_SEGMENTED
    return candidates, scored, skipped


# ------------------------------------------------------------------------------------------------ evaluate
@dataclass(frozen=True)
class EvaluationResult(metrics.CaseResult):
    """A :class:`~universal.metrics.CaseResult` that also says what it skipped and why.

    ``scores`` hold the scored classes (status ``"ok"``) and the segmented classes the reference does not annotate
    (status ``"not annotated"``, NaN, left out of the means); ``skipped`` lists every class not scored with its
    reason, including those annotated but not segmented.
    """

    skipped: Mapping[str, str] = field(default_factory=dict)
    convention: str = UNIVERSAL
    reference: str = ""

    @property
    def scored(self) -> list[str]:
        """The classes scored."""
        return self.evaluated

    def summary(self) -> str:
        """Which reference and rules, which classes were scored, which were skipped and why (one line each)."""
        rules = self.preset or "none (generic rules)"
        lines = [f"reference: {self.reference}; preset: {rules}"]
        lines.append(f"scored ({len(self.scored)}): {', '.join(self.scored) or '-'}")
        by_reason: dict[str, list[str]] = {}
        for n, why in self.skipped.items():
            by_reason.setdefault(f"{why} by the reference" if why == NOT_ANNOTATED else why, []).append(n)
        lines += [f"skipped, {why} ({len(names)}): {', '.join(names)}" for why, names in by_reason.items()]
        return "\n".join(lines)

    def table(self, digits: int = 4) -> str:
        return f"{super().table(digits)}\n\n{self.summary()}"

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` whole or not at all (a temporary file, then a rename).

        Raises:
            InputError: when ``path`` cannot be written (see :func:`check_json_path`).
        """
        import json

        from universal.io import atomic_write_text

        return atomic_write_text(check_json_path(path), json.dumps(self.to_dict(), indent=2, allow_nan=False))

    def to_dict(self) -> dict[str, Any]:
        """:meth:`CaseResult.to_dict` plus ``scored``, ``skipped`` ({class: reason}), ``convention``, ``reference``."""
        out = super().to_dict()
        out.update(
            scored=self.scored,
            skipped=dict(self.skipped),
            convention=self.convention,
            reference=self.reference,
        )
        return out


def check_json_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path` when a JSON file can be written there: checked before scoring, so a
    typo fails at once rather than after the table.

    Raises:
        InputError: when ``path`` is a folder, or its folder does not exist or is not writable.
    """
    out = Path(path).expanduser()
    folder = out.parent
    if out.is_dir():
        raise InputError(f"the JSON output {out} is a folder: give a file name, e.g. {out / 'scores.json'}")
    if not folder.is_dir():
        raise InputError(
            f"the folder of the JSON output {out} does not exist: create {folder} or choose another"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the JSON output into {folder}: choose a writable folder")
    return out


def _convention_for(source: Any, convention: str | None, rules: metrics.Preset | None, what: str) -> str:
    if convention is not None:
        return resolve_convention(convention)
    if rules is not None and _is_label_map(source):
        name = Path(source).name if _is_path(source) else "given as an array"
        raise InputError(
            f"say which ids the {what} label map {name} carries: under the {rules.name} preset none is assumed "
            f"(it once implied FLARE 2023 ids): '{FLARE23}', '{UNIVERSAL}' or a dataset such as "
            "'totalsegmentator_v2' (convention=..., on the command line --gt-dataset / --pred-dataset)"
        )
    return UNIVERSAL


def _flare_label_map_view(masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The FLARE masks a FLARE label map of these masks gives: organs drawn in id order, the lesion (union of the
    tumour classes) over them, so organs lose their lesion voxels as in FLARE's own labels."""
    universal = {n: m for n, m in masks.items() if n != LESION}
    shape = np.shape(next(iter(masks.values())))
    lab = taxonomy.flare23_label_map(universal) if universal else np.zeros(shape, np.uint8)
    if LESION in masks:
        lab[np.asarray(masks[LESION], bool)] = taxonomy.FLARE23.lesion_id
    return metrics.flare23_masks_from_label_map(lab)


def _comparable(pred: Prediction, ref: Reference, rules: metrics.Preset | None) -> tuple[dict, dict]:
    """Prediction and reference masks in one view (see the module's table)."""
    ref_masks = {n: ref.masks[n] for n in ref.annotated if n in ref.masks}
    pred_masks = dict(pred.masks)
    if ref.convention == FLARE23 and pred.convention != FLARE23:
        return _flare_label_map_view(pred_masks), ref_masks
    if rules is not None and LESION not in ref.annotated:
        unannotated = set(taxonomy.FLARE23_LESION_CLASSES) - set(ref.annotated)
        pred_masks = {n: m for n, m in pred_masks.items() if n not in unannotated}
    return pred_masks, ref_masks


def _nothing_requested(
    pred: Prediction, ref: Reference, skipped: Mapping[str, str], requested: list[str], both: list[str]
) -> str:
    """Why none of the classes asked for can be scored: the side that lacks each (not segmented / annotated);
    ``both``: the classes that could be scored."""
    seg, ann = ", ".join(pred.segmented) or "nothing", ", ".join(ref.annotated) or "nothing"
    where = {
        NOT_SEGMENTED: f" in PRED {pred.name} (it has {seg})",
        NOT_ANNOTATED: f" by GT {ref.describe()} (it annotates {ann})",
    }
    by_reason: dict[str, list[str]] = {}
    for n in requested:
        by_reason.setdefault(skipped.get(n, NOT_SEGMENTED), []).append(n)
    asked = f"the classes asked for (--classes {' '.join(shlex.quote(n) for n in requested)})"
    if len(by_reason) == 1:
        why = next(iter(by_reason))
        problem = f"{asked} are {why}{where.get(why, '')}"
    else:
        lacks = [f"{', '.join(names)} {why}{where.get(why, '')}" for why, names in by_reason.items()]
        problem = f"{asked} cannot be scored: {'; '.join(lacks)}"
    if not both:
        return f"nothing to score: {problem}; no class is both segmented and annotated either: segment one GT annotates"
    return (
        f"nothing to score: {problem}; ask for classes both have ({', '.join(both)}), or leave --classes out "
        "(classes= in Python)"
    )


def _nothing_to_score(
    pred: Prediction,
    ref: Reference,
    rules: metrics.Preset | None,
    skipped: Mapping[str, str] | None = None,
    requested: list[str] | None = None,
) -> str:
    """The one-line message when no class can be scored: the classes asked for and the side that lacks each,
    else what was segmented and what the reference annotates."""
    if requested:
        return _nothing_requested(pred, ref, skipped or {}, requested, _choose(pred, ref, None, rules)[1])
    seg, ann = ", ".join(pred.segmented) or "nothing", ", ".join(ref.annotated) or "nothing"
    under = f" under the {rules.name} preset (FLARE 2023 classes)" if rules is not None else ""
    return (
        f"nothing to score{under}: no class is both segmented ({seg}) and annotated by the reference "
        f"{ref.describe()}: {ann}; segment a class the reference annotates"
        + (", or score without the preset" if rules is not None else ", or check the reference's convention")
    )


def _read_pair(
    prediction: Any,
    reference: Any,
    convention: str | None,
    pconvention: str | None,
    rules: metrics.Preset | None,
) -> tuple[Prediction, Reference]:
    """The reference (onto a Segmentation's grid when the prediction is one), then the prediction onto its grid."""
    if isinstance(reference, Reference):
        if convention is not None:
            raise InputError(
                f"convention={convention!r} gives the ids of a reference to read, but the reference was read "
                "already (a Reference): leave it out, or pass the label map and its convention"
            )
        ref = reference
    else:
        like = getattr(prediction, "volume", None) if hasattr(prediction, "masks") else None
        ref = read_reference(reference, _convention_for(reference, convention, rules, "reference"), like)
    pconv = _convention_for(prediction, pconvention, rules, "prediction")
    pred = read_prediction(prediction, pconv, ref.grid, spacing=ref.spacing)
    off_grid = sorted({np.shape(m) for m in pred.masks.values()} - {ref.shape})
    if off_grid:
        raise InputError(f"the prediction's masks {off_grid} are not on the reference's grid {ref.shape}")
    vol = getattr(prediction, "volume", None) if hasattr(prediction, "masks") else None
    grid = getattr(ref.grid, "affine", None)
    if vol is not None and grid is not None and not np.allclose(vol.affine, grid, atol=1e-3):
        raise InputError(
            f"the reference {ref.name} lies on another grid than the segmented CT (same shape, other position or "
            "orientation): read it with read_reference(..., like=segmentation.volume), or pass its file"
        )
    return pred, ref


def evaluate(
    prediction: Any,
    reference: Any,
    preset: str | metrics.Preset | None = None,
    classes: Iterable[str] | None = None,
    *,
    convention: str | None = None,
    prediction_convention: str | None = None,
    name: str = "",
) -> EvaluationResult:
    """DSC and NSD of a prediction against a reference, on the classes segmented and annotated.

    Args:
        prediction: Anything :func:`read_prediction` reads (a Segmentation, a ``universal segment`` output folder,
            masks by name, a label map).
        reference: A :class:`Reference`, or anything :func:`read_reference` reads (read onto the Segmentation's
            grid when the prediction is one, else on its own grid; the prediction is then read onto it).
        preset: ``None`` (generic rules) or ``"flare23"`` (:data:`PRESETS`; the module's table says what each
            preset does with each convention).
        classes: Classes to score (default: see :func:`choose_classes`); the skipped ones are stated.
        convention: The reference label map's ids (default ``"universal"``; under a preset a label map must say).
        prediction_convention: The same for a predicted label map.
        name: Case name (default: the prediction's).
    """
    rules = metrics.get_preset(preset)
    pred, ref = _read_pair(prediction, reference, convention, prediction_convention, rules)
    candidates, scored, skipped = _choose(pred, ref, classes, rules)
    if not scored:
        raise InputError(
            _nothing_to_score(pred, ref, rules, skipped, candidates if classes is not None else None)
        )
    shown = [
        n for n, why in skipped.items() if why == NOT_ANNOTATED and (rules is None or n in rules.classes)
    ]
    rows = [n for n in candidates if n in scored or n in shown]
    pred_masks, ref_masks = _comparable(pred, ref, rules)
    case = metrics.evaluate_case(
        pred_masks,
        ref_masks,
        ref.spacing,
        preset=rules,
        classes=rows,
        annotated=scored,
        name=name or pred.name,
    )
    return EvaluationResult(
        scores=case.scores,
        preset=case.preset,
        organ_classes=case.organ_classes,
        name=case.name,
        skipped=skipped,
        convention=ref.convention,
        reference=ref.describe(),
    )
