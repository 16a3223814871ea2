"""Partial-label dataset manifests, label transfer onto universal classes, and training patch sampling.

A **manifest** lists the cases of one training (or validation, or pseudo-labelling) run. Each case names a CT, an
optional label map and the dataset it comes from; the dataset's *label map* says which universal classes each label
value belongs to and which universal classes the dataset annotates at all. The set of annotated classes becomes the
case's **availability mask** ``(K,)`` that the masked loss (:func:`universal.loss.masked_bce_dice`) uses: a class the
dataset never draws contributes no gradient, instead of being learnt as "absent". Dataset identity is always stated
in the manifest, never guessed from file names.

Manifest (JSON; paths relative to the manifest file)::

    {
      "version": 1,
      "datasets": {
        "ts": "totalsegmentator_v2",                 # a label map registered in universal.taxonomy, by name
        "liver_only": {                               # or an inline map
          "labels": {"1": ["liver"], "2": ["liver tumor", "liver"]},
          "split_lr": {"3": ["right kidney", "left kidney"]},   # optional: one value for both sides
          "annotated": ["liver", "liver tumor"],                # optional: default = every class named above
          "ignore": [4, 5]                                      # optional: label values that map to no class
        }
      },
      "cases": [
        {"name": "case01", "image": "images/case01.nii.gz", "label": "labels/case01.nii.gz", "dataset": "ts"},
        {"name": "case02", "image": "dicom/case02/", "label": null, "dataset": "unlabeled"},
        {"name": "case03", "image": "ct3.nrrd", "label": "seg3.nrrd", "dataset": "liver_only",
         "annotated": ["liver"], "pseudo": []}     # optional per-case subset / pseudo-labelled classes
      ]
    }

A case's ``dataset`` is a key of ``datasets`` or directly a registered taxonomy name; a case may also carry its own
``"label_map": {...}``. Cases without a label (``null``) are unlabeled: nothing is available for them (they are
pseudo-labelling material). A CSV manifest has the columns ``image,label,dataset`` and optionally ``name``,
``label_map`` (inline map as JSON), ``annotated`` and ``pseudo`` (class names separated by ``;``).

>>> m = manifest_from_dict({"datasets": {"d": {"labels": {"1": ["liver"]}}},
...                         "cases": [{"image": "a.nii.gz", "label": "b.nii.gz", "dataset": "d"}]}, root=".")
>>> m.cases[0].availability(["liver", "spleen"]).tolist()
[True, False]

Training samples: :func:`prepare_case` loads a case (via :mod:`universal.io`), resamples it to the training spacing
(the integer label map with nearest neighbour, then label transfer on the new grid, so left/right splitting uses the
right world coordinates), windows the HU and keeps everything in memory (:class:`PreparedCase`). :class:`PatchDataset`
draws positive/negative-balanced random patches with light augmentation. Each sample is a pure function of
``(seed, sample index)``, so training is reproducible across resumes, workers and ranks without saving data-loader
state. These transforms are small numpy equivalents of MONAI's dictionary transforms (``Spacingd``,
``ScaleIntensityRanged``, ``RandCropByPosNegLabeld``, ``RandFlipd``, ``RandScaleIntensityd``,
``RandShiftIntensityd``): they take an explicit random generator (reproducible resumes) and swap the left/right class
channels when they flip the left/right axis, which MONAI's flips cannot know to do.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from universal import taxonomy
from universal.errors import ClassNameError, InputError, UniversalError
from universal.io import atomic_write_text, load_label, load_volume
from universal.phantom import Phantom, make_phantom
from universal.preprocess import PreprocessConfig, preprocess

if TYPE_CHECKING:  # pragma: no cover
    from universal.io import Volume
    from universal.taxonomy import DatasetLabelMap

__all__ = [
    "DATA_DIR_ENV",
    "find_sample_data",
    "Case",
    "Manifest",
    "PatchDataset",
    "PreparedCase",
    "AugmentConfig",
    "case_targets",
    "label_map_from_spec",
    "label_map_to_spec",
    "load_manifest",
    "manifest_from_dict",
    "paired_channel_permutation",
    "prepare_case",
    "resample_label",
    "validate_manifest",
    "write_manifest",
    "write_phantom_dataset",
]

#: environment variable naming the folder of the real sample CTs (tutorials, dashboard, benchmarks)
DATA_DIR_ENV = "UNIVERSAL_DATA_DIR"


def find_sample_data(
    explicit: str | os.PathLike | None = None,
    *,
    start: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """The folder of the real sample CTs, or ``None`` when there is none (callers then use the phantom).

    In order: ``explicit`` (a notebook parameter, a CLI option), ``$UNIVERSAL_DATA_DIR``, else the first
    ``shared/data`` folder found walking up from ``start`` (default: the current folder) — the repository layout,
    where the data live in ``../shared/data`` beside the project. A named folder that does not exist gives ``None``
    with a warning saying so (never a silent fallback).

    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     find_sample_data("/no/such/folder", environ={}) is None
    True
    """
    env = os.environ if environ is None else environ
    named = explicit if explicit is not None else env.get(DATA_DIR_ENV)
    if named:
        path = Path(named).expanduser()
        if path.is_dir():
            return path.resolve()
        from universal.errors import InputWarning

        source = "given" if explicit is not None else f"${DATA_DIR_ENV}"
        warnings.warn(
            f"the sample data folder {str(path)!r} ({source}) does not exist; no real samples",
            InputWarning,
            stacklevel=2,
        )
        return None
    here = Path.cwd() if start is None else Path(start).resolve()
    return next(
        (
            (p / "shared" / "data").resolve()
            for p in (here, *here.parents)
            if (p / "shared" / "data").is_dir()
        ),
        None,
    )


MANIFEST_VERSION = 1
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip", ".dcm")


# ----------------------------------------------------------------------------------------------------- label maps
def _canonical(name: str) -> str:
    """Canonical universal class name (raises ClassNameError for unknown names)."""
    return taxonomy.resolve_class(name).name


def _class_names(classes: Iterable | None) -> list[str]:
    return [c.name for c in taxonomy.resolve_classes(classes)]


def label_map_from_spec(name: str, spec: str | Mapping[str, Any]) -> DatasetLabelMap:
    """A :class:`~universal.taxonomy.DatasetLabelMap` from a manifest entry: a registered name or an inline dict.

    Inline dicts: ``{"labels": {value: [class, ...]}, "split_lr": {value: [right, left]}, "annotated": [...],
    "ignore": [values]}``; class names are resolved (aliases, case) to canonical names. Masks are one-vs-all, so a
    tumour value must also set its parent organ whenever the map annotates that organ.

    >>> dict(label_map_from_spec("x", {"labels": {"1": ["Liver"]}}).labels)
    {1: ('liver',)}

    Raises:
        InputError: malformed spec, unknown dataset name, a tumour value that forgets its annotated parent organ.
        ClassNameError: unknown class names (the message lists the closest valid names).
    """
    if isinstance(spec, str):
        try:
            return taxonomy.dataset(spec)
        except ClassNameError as exc:
            raise InputError(
                f'{exc} Or define the dataset inline, e.g. {{"labels": {{"1": ["liver"]}}}}.'
            ) from None
    _check_spec_keys(name, spec)
    labels = _spec_labels(name, spec.get("labels") or {})
    split_lr = _spec_split_lr(name, spec.get("split_lr") or {})
    for v in split_lr:
        labels.setdefault(v, ())
    named = [n for names in labels.values() for n in names] + [n for pair in split_lr.values() for n in pair]
    annotated = spec.get("annotated")
    annotated = tuple(dict.fromkeys(_canonical(n) for n in (annotated if annotated is not None else named)))
    annotated = tuple(sorted(annotated, key=lambda n: taxonomy.resolve_class(n).index))
    ignore = sorted({_label_value(name, v) for v in (spec.get("ignore") or [])})
    clash = sorted(set(ignore) & set(labels))
    if clash:
        raise InputError(f"dataset {name!r}: label value(s) {clash} are both mapped and in 'ignore'")
    _check_tumour_parents(name, labels, split_lr, annotated)
    return taxonomy.DatasetLabelMap(
        name=name,
        full_name=str(spec.get("description") or name),
        labels=MappingProxyType(dict(sorted(labels.items()))),
        split_lr=MappingProxyType(dict(sorted(split_lr.items()))),
        annotated=annotated,
        source_names=MappingProxyType({}),
        unmapped=MappingProxyType({v: "declared in the manifest's ignore list" for v in ignore}),
    )


def _check_spec_keys(name: str, spec: Any) -> None:
    """An inline label map is a dict with only the known keys."""
    if not isinstance(spec, Mapping):
        raise InputError(
            f"dataset {name!r}: a label map must be a registered name or a dict, not {type(spec).__name__}"
        )
    unknown_keys = set(spec) - {"labels", "split_lr", "annotated", "ignore", "description"}
    if unknown_keys:
        raise InputError(
            f"dataset {name!r}: unknown keys {sorted(unknown_keys)} in the label map "
            "(valid: labels, split_lr, annotated, ignore, description)"
        )


def _spec_labels(name: str, raw_labels: Any) -> dict[int, tuple[str, ...]]:
    """The ``labels`` of an inline map: label value → canonical class names (deduplicated, in order)."""
    if not isinstance(raw_labels, Mapping):
        raise InputError(f'dataset {name!r}: "labels" must map label values to lists of class names')
    labels: dict[int, tuple[str, ...]] = {}
    for value, names in raw_labels.items():
        v = _label_value(name, value)
        names = [names] if isinstance(names, str) else list(names or [])
        labels[v] = tuple(dict.fromkeys(_canonical(n) for n in names))
    return labels


def _spec_split_lr(name: str, raw: Mapping[Any, Any]) -> dict[int, tuple[str, str]]:
    """The ``split_lr`` of an inline map: label value → (right class, left class) of a paired organ."""
    split_lr: dict[int, tuple[str, str]] = {}
    for value, pair in raw.items():
        v = _label_value(name, value)
        if isinstance(pair, str) or len(pair) != 2:
            raise InputError(
                f'dataset {name!r}: "split_lr" value {value} must name [right class, left class]'
            )
        right, left = taxonomy.resolve_class(pair[0]), taxonomy.resolve_class(pair[1])
        if right.side != "right" or left.side != "left" or right.paired != left.name:
            raise InputError(
                f'dataset {name!r}: "split_lr" value {value} must be a [right, left] pair, got {[right.name, left.name]}'
            )
        split_lr[v] = (right.name, left.name)
    return split_lr


def _check_tumour_parents(
    name: str,
    labels: Mapping[int, tuple[str, ...]],
    split_lr: Mapping[int, tuple[str, str]],
    annotated: tuple[str, ...],
) -> None:
    """One-vs-all: a tumour value must also set its parent organ whenever the map annotates that organ."""
    for v, cls in labels.items():
        targets = set(cls) | set(split_lr.get(v, ()))
        for n in cls:
            info = taxonomy.resolve_class(n)
            parents = [p for p in info.parent if p in annotated]
            if info.is_tumor and parents and not targets & set(info.parent):
                raise InputError(
                    f"dataset {name!r}: label {v} ({n}) must also list its parent organ ({' or '.join(parents)}), "
                    "because masks are one-vs-all (a tumour voxel is also an organ voxel)"
                )


def _label_value(dataset: str, value: Any) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise InputError(f"dataset {dataset!r}: label value {value!r} is not an integer") from None
    if v <= 0:
        raise InputError(f"dataset {dataset!r}: label value {v} must be > 0 (0 is background)")
    return v


def _is_registered(label_map: DatasetLabelMap) -> bool:
    try:
        return taxonomy.dataset(label_map.name) is label_map
    except Exception:  # noqa: BLE001 - unknown name
        return False


def _known_values(label_map: DatasetLabelMap) -> set[int]:
    """Label values a file of this dataset may hold: mapped, split and declared-unmapped values."""
    return set(label_map.labels) | set(label_map.split_lr) | set(label_map.unmapped)


def label_map_to_spec(label_map: DatasetLabelMap) -> str | dict[str, Any]:
    """The manifest form of a label map: its registered name when it is the taxonomy's, else an inline dict."""
    if _is_registered(label_map):
        return label_map.name
    spec: dict[str, Any] = {
        "labels": {
            str(v): list(n) for v, n in sorted(label_map.labels.items()) if n or v not in label_map.split_lr
        }
    }
    if label_map.split_lr:
        spec["split_lr"] = {str(v): list(p) for v, p in sorted(label_map.split_lr.items())}
    spec["annotated"] = list(label_map.annotated)
    if label_map.unmapped:
        spec["ignore"] = sorted(int(v) for v in label_map.unmapped)
    if label_map.full_name and label_map.full_name != label_map.name:
        spec["description"] = label_map.full_name
    return spec


# ----------------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One CT of a manifest.

    Attributes:
        name: Unique case name within the manifest.
        image: Path of the CT (file, DICOM folder or zip).
        label: Path of the label map, or ``None`` (unlabeled).
        dataset: Name of the dataset it belongs to (the manifest's key).
        label_map: The dataset's map from label values to universal classes (``None`` if unknown/unlabeled).
        annotated: Per-case subset of annotated classes (``None``: the dataset's ``annotated``).
        pseudo: Classes whose labels are model predictions (pseudo-labels) rather than ground truth.
        meta: Free-form extra fields of the manifest entry (kept on write).
    """

    name: str
    image: Path
    label: Path | None
    dataset: str
    label_map: DatasetLabelMap | None = None
    annotated: tuple[str, ...] | None = None
    pseudo: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labeled(self) -> bool:
        return self.label is not None and self.label_map is not None

    def annotated_classes(self) -> tuple[str, ...]:
        """Universal classes whose masks this case's label file holds (ground truth or pseudo-labels)."""
        if not self.labeled:
            return ()
        return tuple(self.annotated) if self.annotated is not None else tuple(self.label_map.annotated)

    def ground_truth_classes(self) -> tuple[str, ...]:
        """Annotated classes that are not pseudo-labels."""
        pseudo = set(self.pseudo)
        return tuple(c for c in self.annotated_classes() if c not in pseudo)

    def availability(self, classes: Iterable | None = None) -> np.ndarray:
        """Boolean ``(K,)``: which of ``classes`` (default all 32) this case annotates.

        >>> Case("a", Path("a.nii"), None, "d").availability(["liver"]).tolist()
        [False]
        """
        annotated = set(self.annotated_classes())
        return np.array([n in annotated for n in _class_names(classes)], dtype=bool)

    def load(self, classes: Iterable | None = None) -> tuple[Volume, np.ndarray | None]:
        """The CT (RAS+ HU :class:`~universal.io.Volume`) and its one-vs-all masks ``(K, X, Y, Z)`` bool (or None)."""
        volume = load_volume(self.image)
        return volume, (case_targets(self, volume, classes) if self.labeled else None)


def case_targets(case: Case, volume: Volume, classes: Iterable | None = None) -> np.ndarray:
    """One-vs-all masks ``(K, X, Y, Z)`` bool of ``case`` on ``volume``'s RAS grid (left/right split by world x).

    Classes the case does not annotate come back as all-False channels (their availability is False anyway).
    """
    names = _class_names(classes)
    if not case.labeled:
        return np.zeros((len(names), *volume.shape), dtype=bool)
    label = load_label(case.label, like=volume)
    return _transfer(label, case, volume.affine, names)


def _transfer(label: np.ndarray, case: Case, affine: np.ndarray, names: list[str]) -> np.ndarray:
    masks = taxonomy.transfer_labels(label, case.label_map, affine, names)
    masks = np.asarray(masks, dtype=bool)
    avail = case.availability(names)
    if not avail.all():  # a per-case subset: channels the case does not annotate hold no information
        masks = masks & avail[:, None, None, None]
    return masks


# -------------------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    """The cases of a manifest, its dataset label maps, where it lives, and problems found while loading it.

    ``problems`` (unknown datasets or class names, malformed entries) are reported together by
    :func:`validate_manifest` instead of one at a time.
    """

    cases: tuple[Case, ...]
    datasets: dict[str, Any] = field(default_factory=dict)  # name -> DatasetLabelMap
    path: Path | None = None
    problems: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __getitem__(self, key: int | str) -> Case:
        if isinstance(key, str):
            for c in self.cases:
                if c.name == key:
                    return c
            raise KeyError(key)
        return self.cases[key]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.cases]

    def labeled(self) -> Manifest:
        """The labeled cases only."""
        return replace(self, cases=tuple(c for c in self.cases if c.labeled))


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read a JSON or CSV manifest (paths inside are relative to the manifest's folder).

    Structural errors (not JSON, no ``cases``) raise :class:`~universal.errors.InputError` at once; per-entry
    problems (unknown datasets or classes) are collected in ``Manifest.problems`` for :func:`validate_manifest`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist: give the path of a .json or .csv manifest")
    root = path.resolve().parent
    if path.suffix.lower() == ".csv":
        data = _read_csv_manifest(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(
                f"manifest {path} is not valid JSON ({exc}); fix the file or use a .csv manifest"
            ) from exc
    return replace(manifest_from_dict(data, root=root), path=path.resolve())


def _read_csv_manifest(path: Path) -> dict[str, Any]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(
            f"manifest {path} has no rows: it needs a header image,label,dataset and one row per case"
        )
    missing = {"image", "dataset"} - set(rows[0])
    if missing:
        raise InputError(
            f"manifest {path} lacks the column(s) {sorted(missing)} (header: image,label,dataset[,name])"
        )
    cases = []
    for row in rows:
        entry: dict[str, Any] = {
            "image": row["image"].strip(),
            "label": (row.get("label") or "").strip() or None,
            "dataset": row["dataset"].strip(),
        }
        if (row.get("name") or "").strip():
            entry["name"] = row["name"].strip()
        if (row.get("label_map") or "").strip():
            try:
                entry["label_map"] = json.loads(row["label_map"])
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"manifest {path}: the label_map of {entry['image']} is not JSON ({exc})"
                ) from exc
        for key in ("annotated", "pseudo"):
            if (row.get(key) or "").strip():
                entry[key] = [s.strip() for s in row[key].split(";") if s.strip()]
        cases.append(entry)
    return {"cases": cases}


def _case_name(image: str) -> str:
    base = Path(str(image).rstrip("/\\")).name
    for suffix in sorted(_IMAGE_SUFFIXES, key=len, reverse=True):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)] or base
    return base


def manifest_from_dict(data: Mapping[str, Any], root: str | os.PathLike = ".") -> Manifest:
    """Build a :class:`Manifest` from its dict form; relative paths are taken relative to ``root``."""
    if not isinstance(data, Mapping) or not isinstance(data.get("cases"), list):
        raise InputError(
            'a manifest must be an object with a "cases" list (see universal.data for the format)'
        )
    version = data.get("version", MANIFEST_VERSION)
    if version != MANIFEST_VERSION:
        raise InputError(
            f"manifest version {version} is not supported (this version reads {MANIFEST_VERSION})"
        )
    problems: list[str] = []
    datasets: dict[str, Any] = {
        str(name): _resolve_spec(str(name), spec, problems)
        for name, spec in (data.get("datasets") or {}).items()
    }
    cases: list[Case] = []
    for i, entry in enumerate(data["cases"]):
        if not isinstance(entry, Mapping) or not entry.get("image"):
            problems.append(f"case #{i}: an entry needs at least an 'image' path")
            continue
        cases.append(_case_from_entry(entry, Path(root), datasets, problems))
    return Manifest(tuple(cases), datasets, None, tuple(problems))


def _resolve_spec(name: str, spec: Any, problems: list[str]) -> DatasetLabelMap | None:
    """:func:`label_map_from_spec`, or ``None`` with the reason appended to ``problems``."""
    try:
        return label_map_from_spec(name, spec)
    except (InputError, ClassNameError) as exc:
        problems.append(f"dataset {name!r}: {exc}")
        return None


def _case_from_entry(
    entry: Mapping[str, Any], root: Path, datasets: dict[str, Any], problems: list[str]
) -> Case:
    """One manifest case; appends its problems to ``problems`` and the datasets it names to ``datasets``."""
    image = _resolve_path(root, entry["image"])
    label = _resolve_path(root, entry["label"]) if entry.get("label") else None
    name = str(entry.get("name") or _case_name(entry["image"]))
    from universal.batch import bad_case_name

    if (why := bad_case_name(name)) is not None:  # names become file names (pseudo-labels, corrections)
        problems.append(f"case {name!r}: the name {why}")
    ds = str(entry.get("dataset") or "")
    if entry.get("label_map") is not None:
        ds = ds or name
    label_map = _case_label_map(entry, name, ds, label is not None, datasets, problems)
    annotated = pseudo = None
    try:
        if entry.get("annotated") is not None:
            annotated = tuple(dict.fromkeys(_canonical(n) for n in entry["annotated"]))
        pseudo = tuple(dict.fromkeys(_canonical(n) for n in entry.get("pseudo") or ()))
    except ClassNameError as exc:
        problems.append(f"case {name!r}: {exc}")
    meta = {k: v for k, v in entry.items() if k not in _CASE_KEYS}
    return Case(name, image, label, ds, label_map, annotated, pseudo or (), meta)


def _case_label_map(
    entry: Mapping[str, Any], name: str, ds: str, labeled: bool, datasets: dict[str, Any], problems: list[str]
) -> DatasetLabelMap | None:
    """A case's label map: its inline ``label_map``, else its dataset (manifest or registered), else ``None``."""
    if entry.get("label_map") is not None:
        label_map = _resolve_spec(ds, entry["label_map"], problems)
        if label_map is not None and ds not in datasets:
            datasets[ds] = label_map
        return label_map
    if ds in datasets:
        return datasets[ds]
    if ds:
        try:
            datasets[ds] = taxonomy.dataset(ds)
        except ClassNameError as exc:
            if labeled:
                problems.append(f'case {name!r}: {exc} Or define {ds!r} under "datasets" in the manifest.')
            return None
        return datasets[ds]
    if labeled:
        problems.append(f"case {name!r}: a labeled case needs a 'dataset' (or an inline 'label_map')")
    return None


_CASE_KEYS = {"name", "image", "label", "dataset", "label_map", "annotated", "pseudo"}


def _resolve_path(root: Path, p: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else root / p


def write_manifest(manifest: Manifest | Sequence[Case], path: str | os.PathLike) -> Path:
    """Write a JSON manifest (atomically) with paths relative to its folder; returns the path.

    Registered label maps are written by name, others inline under ``"datasets"``.
    """
    path = Path(path)
    cases = manifest.cases if isinstance(manifest, Manifest) else tuple(manifest)
    root = path.resolve().parent
    datasets: dict[str, Any] = {}
    entries = []
    for case in cases:
        entry: dict[str, Any] = {"name": case.name, "image": _relative(case.image, root)}
        entry["label"] = _relative(case.label, root) if case.label is not None else None
        entry["dataset"] = case.dataset
        if case.label_map is not None:
            spec = label_map_to_spec(case.label_map)
            if case.dataset in datasets and datasets[case.dataset] != spec:
                entry["label_map"] = spec  # same dataset name, different map: keep it with the case
            else:
                datasets.setdefault(case.dataset, spec)
        if case.annotated is not None:
            entry["annotated"] = list(case.annotated)
        if case.pseudo:
            entry["pseudo"] = list(case.pseudo)
        entry.update(case.meta)
        entries.append(entry)
    data = {"version": MANIFEST_VERSION, "datasets": datasets, "cases": entries}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _relative(p: Path, root: Path) -> str:
    p = Path(p).resolve()
    try:
        return Path(os.path.relpath(p, root)).as_posix()
    except ValueError:  # another drive (Windows)
        return p.as_posix()


# ------------------------------------------------------------------------------------------------------ validation
def validate_manifest(
    manifest: Manifest | str | os.PathLike,
    *,
    read_labels: bool = False,
    classes: Iterable | None = None,
    require_labels: bool = False,
    strict: bool = True,
) -> list[str]:
    """Check a manifest before training; report every problem at once.

    Checks: problems found while loading (unknown datasets, unknown class names), duplicate case names, missing image
    and label files, labeled cases without a label map, and (``require_labels``) unlabeled cases. With
    ``read_labels`` every label file is read and its values are checked against its dataset's map (a value that maps
    to nothing must be declared in the map's ``ignore`` list). With ``classes`` (the model's classes) a labeled case
    whose dataset annotates none of them is reported.

    Returns:
        The list of problems (empty when the manifest is usable) when ``strict`` is False.

    Raises:
        InputError: when ``strict`` and there are problems; the message lists all of them.
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    problems = list(manifest.problems)
    seen: set[str] = set()
    wanted = set(_class_names(classes)) if classes is not None else None
    for case in manifest.cases:
        if case.name in seen:
            problems.append(f"case {case.name!r}: the name is used twice (give each case a unique 'name')")
        seen.add(case.name)
        if not case.image.exists():
            problems.append(f"case {case.name!r}: image {case.image} does not exist")
        if case.label is None:
            if require_labels:
                problems.append(f"case {case.name!r}: no label file, but this manifest must be labeled")
            continue
        if not case.label.exists():
            problems.append(f"case {case.name!r}: label {case.label} does not exist")
            continue
        if case.label_map is None:
            continue  # already reported (unknown dataset / no dataset)
        extra = set(case.annotated_classes()) - set(case.label_map.annotated)
        if extra:
            problems.append(
                f"case {case.name!r}: 'annotated' names {sorted(extra)} which dataset {case.dataset!r} does not map"
            )
        if wanted is not None and not (set(case.annotated_classes()) & wanted):
            problems.append(
                f"case {case.name!r}: dataset {case.dataset!r} annotates none of the model's classes "
                f"({', '.join(case.annotated_classes()) or 'nothing'}); remove the case or add its classes"
            )
        if read_labels:
            problems.extend(_check_label_values(case))
    if problems and strict:
        listing = "\n  - ".join(problems)
        where = f" {manifest.path}" if manifest.path else ""
        raise InputError(f"manifest{where} has {len(problems)} problem(s):\n  - {listing}")
    return problems


def _check_label_values(case: Case) -> list[str]:
    try:
        label = load_label(case.label)
    except UniversalError as exc:
        return [f"case {case.name!r}: cannot read label {case.label}: {exc}"]
    except Exception as exc:  # noqa: BLE001 - any reader failure is a problem of this file
        return [f"case {case.name!r}: cannot read label {case.label}: {type(exc).__name__}: {exc}"]
    arr = np.asarray(label)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            return [
                f"case {case.name!r}: label {case.label} holds non-integer values; save it as an integer map"
            ]
    values = {int(v) for v in np.unique(arr)} - {0}
    unknown = sorted(values - _known_values(case.label_map))
    if not unknown:
        return []
    shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
    if _is_registered(case.label_map):
        # a registered map lists the values with a universal counterpart; a source with many more classes
        # (TotalSegmentator: 117) legitimately holds others, which are ignored
        warnings.warn(
            f"case {case.name!r}: label values {shown} have no universal class in the {case.label_map.name!r} map "
            "and are ignored",
            UserWarning,
            stacklevel=3,
        )
        return []
    return [
        f"case {case.name!r}: label {case.label} holds value(s) {shown} that dataset {case.dataset!r} does not "
        "map; add them to its 'labels' (or to 'ignore' if they are no universal class)"
    ]


# ------------------------------------------------------------------------------------------------- preparation
@dataclass(frozen=True)
class PreparedCase:
    """A case ready for patch sampling, on the training grid.

    Attributes:
        name: Case name.
        image: float32 ``(1, X, Y, Z)`` windowed intensities in [0, 1].
        target: bool ``(K, X, Y, Z)`` one-vs-all masks (all False for classes the case does not annotate).
        available: bool ``(K,)`` availability mask.
        affine: (4, 4) voxel → RAS+ mm affine of the training grid.
        foreground: int64 flat indices of voxels inside any available mask (for positive patch centres).
    """

    name: str
    image: np.ndarray
    target: np.ndarray
    available: np.ndarray
    affine: np.ndarray
    foreground: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def resample_label(label: np.ndarray, prepared: Any) -> np.ndarray:
    """Nearest-neighbour resampling of an integer label map (source RAS grid) onto a prepared grid.

    Uses the geometry of :func:`universal.preprocess.preprocess` (crop box, ``align_corners=False`` voxel centres,
    round half up), so labels and image stay aligned voxel for voxel.
    """
    idx = []
    for (b0, b1), m in zip(prepared.box, prepared.shape):
        n = b1 - b0
        coords = (np.arange(m) + 0.5) * (n / m) - 0.5
        idx.append(np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.int64) + b0)
    return np.asarray(label)[np.ix_(*idx)]


def prepare_case(
    case: Case,
    classes: Iterable | None = None,
    spacing: float | Sequence[float] = (1.5, 1.5, 1.5),
    window_hu: Sequence[float] = (-175.0, 250.0),
    crop_foreground: bool = True,
) -> PreparedCase:
    """Load ``case`` and prepare it like inference does, plus its labels on the same grid.

    The image goes through :func:`universal.preprocess.preprocess` (foreground crop, resampling to ``spacing`` mm,
    HU window → [0, 1]); the integer label map is resampled with nearest neighbour onto that grid and only then
    transferred to one-vs-all masks of ``classes`` (left/right split by world x on the training grid).
    """
    names = _class_names(classes)
    volume = load_volume(case.image)
    spacing_t = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
    cfg = PreprocessConfig(
        spacing_mm=spacing_t,
        hu_window=tuple(float(w) for w in window_hu),
        crop_foreground=bool(crop_foreground),
    )
    prepared = preprocess(volume, cfg)
    affine = np.asarray(prepared.affine, dtype=np.float64)
    if case.labeled:
        label = resample_label(load_label(case.label, like=volume), prepared)
        target = _transfer(label, case, affine, names)
    else:
        target = np.zeros((len(names), *prepared.shape), dtype=bool)
    available = case.availability(names)
    union = target[available].any(axis=0) if available.any() else np.zeros(prepared.shape, dtype=bool)
    return PreparedCase(
        name=case.name,
        image=np.asarray(prepared.array, dtype=np.float32)[None],
        target=target,
        available=available,
        affine=affine,
        foreground=np.flatnonzero(union).astype(np.int64),
    )


# ------------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class AugmentConfig:
    """Light augmentation of training patches (probabilities per sample).

    Attributes:
        flip_lr: Probability of a left/right flip (axis 0); the paired classes' channels (right/left kidney...)
            and their availability are swapped with it, so the labels stay anatomically right.
        flip_ap: Probability of an anterior/posterior flip (axis 1).
        flip_si: Probability of a superior/inferior flip (axis 2).
        intensity_prob: Probability of a random intensity scale and shift.
        intensity_scale: ``x * (1 + u)``, ``u ~ U(-s, s)`` (like MONAI RandScaleIntensity).
        intensity_shift: ``x + v``, ``v ~ U(-t, t)`` on the [0, 1] scale (like MONAI RandShiftIntensity).

    The defaults (``{}`` in a training config) flip nothing and scale/shift the intensity of half the patches.

    Raises:
        InputError: a value that is not a real number (``True`` is not one), a probability outside [0, 1]
            (``50`` for 50 % is refused: write ``0.5``) or a negative scale/shift; every bad key is named.
    """

    flip_lr: float = 0.0
    flip_ap: float = 0.0
    flip_si: float = 0.0
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            probability = name not in ("intensity_scale", "intensity_shift")
            number = isinstance(value, (int, float, np.integer, np.floating))
            real = number and not isinstance(value, (bool, np.bool_))
            if real and np.isfinite(value) and 0 <= value and (value <= 1 or not probability):
                object.__setattr__(self, name, float(value))
            else:
                allowed = "a probability in [0, 1] (write 50 % as 0.5)" if probability else "a number >= 0"
                problems.append(f"{name} is {value!r}; it must be {allowed}")
        if problems:
            raise InputError("augmentation: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AugmentConfig:
        """An :class:`AugmentConfig` from a mapping of its fields (``None``: the defaults).

        Raises:
            InputError: unknown keys (with the valid ones), or a value :class:`AugmentConfig` refuses.
        """
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(
                f"unknown augmentation keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


def paired_channel_permutation(classes: Iterable | None = None) -> np.ndarray:
    """Channel order that swaps each right/left pair among ``classes`` (identity for unpaired classes).

    >>> paired_channel_permutation(["liver", "right kidney", "left kidney"]).tolist()
    [0, 2, 1]
    """
    infos = taxonomy.resolve_classes(classes)
    pos = {c.name: i for i, c in enumerate(infos)}
    perm = np.arange(len(infos))
    for i, c in enumerate(infos):
        other = getattr(c, "paired", None)
        if other is not None and other in pos:
            perm[i] = pos[other]
    return perm


SynthesisHook = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


class PatchDataset:
    """Positive/negative-balanced random training patches from prepared cases (a map-style torch dataset).

    Sample ``i`` is a pure function of ``(seed, i)``: case visit ``i // samples_per_case`` picks a case from a
    per-epoch permutation, then a patch centre (a foreground voxel with probability ``pos / (pos + neg)``, else a
    background voxel), then the augmentation. Items are dicts with ``image`` float32 ``(1, *patch)``, ``target`` uint8
    ``(K, *patch)``, ``available`` bool ``(K,)`` and ``case`` (the index).

    Args:
        cases: Prepared cases (or a callable ``index -> PreparedCase`` with ``n_cases`` for uncached data).
        patch_size: Patch shape in voxels; images smaller than it are padded (image 0, labels 0).
        classes: The model's classes (for the left/right channel swap).
        samples_per_case: Consecutive samples drawn from one case visit.
        pos_neg_ratio: ``(pos, neg)`` weights of foreground- vs background-centred patches.
        augment: An :class:`AugmentConfig`.
        seed: Base seed.
        synthesis: Optional hook ``fn(image, target, available, classes=..., rng=...) -> (image, target,
            available)`` applied to each patch before augmentation (e.g. tumour synthesis).
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase] | Callable[[int], PreparedCase],
        patch_size: Sequence[int],
        classes: Iterable | None = None,
        samples_per_case: int = 1,
        pos_neg_ratio: Sequence[float] = (1.0, 1.0),
        augment: AugmentConfig | None = None,
        seed: int = 0,
        synthesis: SynthesisHook | None = None,
        n_cases: int | None = None,
        length: int = 2**62,
    ) -> None:
        if callable(cases) and not isinstance(cases, Sequence):
            if n_cases is None:
                raise ValueError("n_cases is needed when cases is a loader function")
            self._get = cases
            self.n_cases = int(n_cases)
        else:
            self._cases = list(cases)
            self._get = self._cases.__getitem__
            self.n_cases = len(self._cases)
        if self.n_cases == 0:
            raise InputError("no training cases: the manifest must list at least one labeled case")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.class_names = _class_names(classes)
        self.samples_per_case = max(1, int(samples_per_case))
        pos, neg = (float(x) for x in pos_neg_ratio)
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise InputError(f"pos_neg_ratio {pos_neg_ratio} must be two non-negative numbers, not both zero")
        self.pos_prob = pos / (pos + neg)
        self.augment = augment or AugmentConfig()
        self.seed = int(seed)
        self.synthesis = synthesis
        self.length = int(length)
        self._swap = paired_channel_permutation(self.class_names)

    def __len__(self) -> int:
        return self.length

    def case_index(self, i: int) -> int:
        """Which case sample ``i`` comes from (per-epoch random permutation of the cases)."""
        visit = int(i) // self.samples_per_case
        epoch, pos = divmod(visit, self.n_cases)
        perm = np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.n_cases)
        return int(perm[pos])

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        ci = self.case_index(i)
        case = self._get(ci)
        rng = np.random.default_rng([self.seed, 0xC0FFEE, int(i)])
        image, target, available = self._crop(case, rng)
        if self.synthesis is not None:
            image, target, available = self.synthesis(
                image, target, available, classes=self.class_names, rng=rng
            )
        image, target, available = self._augment(image, target, available, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.uint8)),
            "available": torch.from_numpy(np.ascontiguousarray(available, dtype=bool)),
            "case": ci,
        }

    def _crop(
        self, case: PreparedCase, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shape = np.asarray(case.shape)
        patch = np.asarray(self.patch_size)
        if case.foreground.size and rng.random() < self.pos_prob:
            flat = case.foreground[rng.integers(case.foreground.size)]
            centre = np.asarray(np.unravel_index(flat, case.shape))
        else:
            centre = self._background_centre(case, rng)
        start = np.clip(centre - patch // 2, 0, np.maximum(shape - patch, 0))
        stop = np.minimum(start + patch, shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        image = case.image[(slice(None), *sl)]
        target = case.target[(slice(None), *sl)]
        if np.any(stop - start < patch):  # image smaller than the patch: zero-pad half before, half after,
            # exactly as the sliding-window inference (MONAI) pads it, so training and inference see the same input
            missing = [int(p - (b - a)) for a, b, p in zip(start, stop, patch)]
            pad = [(0, 0)] + [(m // 2, m - m // 2) for m in missing]
            image = np.pad(image, pad)
            target = np.pad(target, pad)
        return image, target, case.available.copy()

    @staticmethod
    def _background_centre(case: PreparedCase, rng: np.random.Generator) -> np.ndarray:
        shape = np.asarray(case.shape)
        centre = rng.integers(0, shape)
        if case.foreground.size == 0:
            return centre
        union_size = case.foreground.size
        if union_size >= 0.95 * np.prod(shape):
            return centre
        # rejection sampling: a few draws almost always find background (foreground is sparse)
        for _ in range(16):
            flat = np.ravel_multi_index(tuple(centre), case.shape)
            j = np.searchsorted(case.foreground, flat)
            if j >= union_size or case.foreground[j] != flat:
                break
            centre = rng.integers(0, shape)
        return centre

    def _augment(
        self, image: np.ndarray, target: np.ndarray, available: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = self.augment
        draws = rng.random(4)  # always drawn, so the stream does not depend on the probabilities
        if draws[0] < a.flip_lr:
            image, target = image[:, ::-1], target[self._swap][:, ::-1]
            available = available[self._swap]
        if draws[1] < a.flip_ap:
            image, target = image[:, :, ::-1], target[:, :, ::-1]
        if draws[2] < a.flip_si:
            image, target = image[:, :, :, ::-1], target[:, :, :, ::-1]
        u, v = rng.uniform(-1.0, 1.0, size=2)
        if draws[3] < a.intensity_prob and (a.intensity_scale or a.intensity_shift):
            image = image * np.float32(1.0 + u * a.intensity_scale) + np.float32(v * a.intensity_shift)
        return image, target, available


# --------------------------------------------------------------------------------------------------------- phantom
def write_phantom_dataset(
    out_dir: str | os.PathLike,
    n_cases: int = 4,
    shape: Sequence[int] = (64, 64, 48),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    label_sets: Mapping[str, Sequence[str] | None] | None = None,
    seed: int = 0,
    unlabeled: int = 0,
    manifest_name: str = "manifest.json",
) -> Path:
    """Write a small partially labeled phantom dataset (NIfTI images + label maps) and its manifest.

    Cases are spread round-robin over the datasets of ``label_sets`` (dataset name → the universal classes it
    annotates; ``None`` = every class the phantom draws). Each label map keeps only its dataset's classes, with
    universal ids as label values (tumours drawn over organs), and the manifest's inline map says so (a tumour value
    also belongs to its parent organ when the dataset annotates the parent). ``unlabeled`` extra cases get no label.

    Returns:
        The path of the written manifest (``out_dir/manifest_name``).

    >>> import tempfile
    >>> p = write_phantom_dataset(tempfile.mkdtemp(), 2, (32, 32, 32), (4, 4, 4), {"liver_only": ["liver"]})
    >>> load_manifest(p).cases[0].annotated_classes()
    ('liver',)
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    label_sets = dict(label_sets or {"phantom": None})
    ds_names = list(label_sets)
    datasets: dict[str, Any] = {}
    kept: dict[str, dict[str, None]] = {}  # dataset -> classes its label files hold (ordered set)
    cases = []
    for i in range(int(n_cases) + int(unlabeled)):
        ph = make_phantom(
            shape=tuple(int(s) for s in shape), spacing=tuple(float(s) for s in spacing), seed=seed + i
        )
        name = f"case{i:03d}"
        _save_nifti(
            out / "images" / f"{name}.nii.gz", np.asarray(ph.volume.array, np.float32), ph.volume.affine
        )
        case = {"name": name, "image": f"images/{name}.nii.gz", "label": None, "dataset": "unlabeled"}
        if i < n_cases:
            ds = ds_names[i % len(ds_names)]
            keep = _write_phantom_label(out / "labels" / f"{name}.nii.gz", ph, label_sets[ds])
            kept.setdefault(ds, {}).update(dict.fromkeys(keep))
            case.update(label=f"labels/{name}.nii.gz", dataset=ds)
        cases.append(case)
    # with None: the classes drawn in *any* of the dataset's cases (not only the first case's)
    for ds, names in kept.items():
        datasets[ds] = universal_id_label_map_spec(list(names))
    if unlabeled:
        datasets.setdefault("unlabeled", {"labels": {}, "annotated": []})
    path = out / manifest_name
    atomic_write_text(
        path, json.dumps({"version": MANIFEST_VERSION, "datasets": datasets, "cases": cases}, indent=2)
    )
    return path


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, affine), str(path))


def _write_phantom_label(path: Path, ph: Phantom, wanted: Sequence[str] | None) -> list[str]:
    """Save the label map of ``wanted`` classes (``None``: all drawn) of phantom ``ph``; returns those classes."""
    keep = _class_names(wanted) if wanted is not None else _class_names(list(ph.masks))
    masks = {c: ph.masks[c] for c in keep if c in ph.masks}
    lab = np.asarray(
        taxonomy.masks_to_label_map(masks, keep) if masks else np.zeros(ph.volume.shape, np.int16)
    )
    _save_nifti(path, lab.astype(np.int16), ph.volume.affine)
    return keep


def universal_id_label_map_spec(classes: Iterable | None = None) -> dict[str, Any]:
    """Inline label map for label files that use universal ids (tumours drawn over organs) for ``classes``.

    A tumour's value also belongs to its parent organ when the parent is among ``classes``; for tumours of paired
    organs (kidney tumour and cyst, lung tumour) whose both sides are among ``classes`` the side is decided from world
    x (``split_lr``: each tumour component goes to the side of its centroid).

    >>> universal_id_label_map_spec(["liver", "liver tumor"])["labels"]["27"]
    ['liver tumor', 'liver']
    >>> universal_id_label_map_spec(["right kidney", "left kidney", "kidney tumor"])["split_lr"]
    {'26': ['right kidney', 'left kidney']}
    """
    infos = taxonomy.resolve_classes(classes)
    names = {c.name for c in infos}
    labels: dict[str, list[str]] = {}
    split: dict[str, list[str]] = {}
    for c in infos:
        members = [c.name]
        parents = [p for p in c.parent if p in names]
        if len(parents) == 2 and taxonomy.resolve_class(parents[0]).paired == parents[1]:
            right, left = sorted(parents, key=lambda p: taxonomy.resolve_class(p).side != "right")
            split[str(c.index)] = [right, left]
        else:
            members.extend(parents)
        labels[str(c.index)] = members
    spec: dict[str, Any] = {"labels": labels}
    if split:
        spec["split_lr"] = split
    spec["annotated"] = [c.name for c in infos]
    return spec
