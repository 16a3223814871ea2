"""The universal label space: 32 classes, the FLARE 2023 view, dataset label maps and label transfer.

Everything here is data from ``universal/resources/taxonomy.json`` (one file, validated when it is first loaded);
this module only loads, checks and applies it. Class identity is the canonical lower-case **name**
(``"liver tumor"``); the universal index (1..32) is used only where a file format needs an integer.

Masks are **one-vs-all**: a tumour voxel also belongs to its parent organ, so classes may overlap.
Arrays are ``(X, Y, Z)`` on a RAS+ grid or any grid with an affine; "right" means the patient's right, which is
the *larger* world x in RAS+ coordinates.

>>> resolve_class("IVC").name
'inferior vena cava'
>>> resolve_class("Arota").index  # the official prompt's typo still resolves
8
>>> dataset("MSD Liver").labels[2]
('liver tumor', 'liver')
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from universal.errors import ClassNameError, InputError

__all__ = [
    "TAXONOMY_PATH",
    "ClassInfo",
    "CLASSES",
    "NUM_CLASSES",
    "class_names",
    "resolve_class",
    "resolve_classes",
    "colormap",
    "Flare23View",
    "FLARE23",
    "FLARE23_LESION_CLASSES",
    "flare23_classes",
    "flare23_tolerances_mm",
    "flare23_label_map",
    "DatasetLabelMap",
    "dataset",
    "list_datasets",
    "transfer_labels",
    "masks_to_label_map",
    "world_x_mm",
    "TaxonomyFileError",
    "DatasetNameError",
    "Code",
    "ClassCodes",
    "class_codes",
]

TAXONOMY_PATH = Path(__file__).resolve().parent / "resources" / "taxonomy.json"


class TaxonomyFileError(InputError):
    """The taxonomy JSON file is missing, unreadable or inconsistent."""


class DatasetNameError(ClassNameError):
    """An unknown dataset name; the message lists the closest known datasets."""


# ----------------------------------------------------------------------------------------------------------------
# data classes


@dataclass(frozen=True)
class ClassInfo:
    """One universal class.

    Attributes:
        index: Universal index 1..32 (official order).
        name: Canonical lower-case name, e.g. ``"inferior vena cava"``.
        aliases: Other accepted names (lower case), including legacy official typos such as ``"arota"``.
        prompt_name: Title-case, correctly spelled text used in prompts, e.g. ``"Inferior Vena Cava"``.
        color: Display colour, RGB ints 0-255.
        kind: ``"organ"`` or ``"tumor"`` (tumours and cysts, drawn over their organ).
        parent: Candidate parent organs of a tumour, e.g. ``("right kidney", "left kidney")``; ``()`` for organs.
        paired: For left/right organs the name of the other side, else ``None``.
        side: ``"right"``, ``"left"`` or ``None``.
        official_prompt: The exact class text of the official release's prompts (e.g. ``"Arota"``, ``"Postcava"``).
    """

    index: int
    name: str
    aliases: tuple[str, ...]
    prompt_name: str
    color: tuple[int, int, int]
    kind: str
    parent: tuple[str, ...] = ()
    paired: str | None = None
    side: str | None = None
    official_prompt: str = ""

    @property
    def is_tumor(self) -> bool:
        """True for tumours and cysts (classes drawn over their parent organ)."""
        return self.kind == "tumor"


@dataclass(frozen=True, eq=False)
class DatasetLabelMap:
    """How one public dataset's label values map onto universal classes.

    Attributes:
        name: Canonical dataset name, e.g. ``"msd_liver"``.
        full_name: Human-readable name.
        labels: Source label value → universal classes its voxels belong to (one-vs-all), e.g. MSD Liver
            ``2 → ("liver tumor", "liver")``. A value listed in ``split_lr`` may map to ``()`` here.
        split_lr: Source value labelling both sides of a paired structure → ``(right class, left class)``;
            the side of each connected component is decided by world x (see :func:`transfer_labels`).
        annotated: Universal classes the dataset annotates (in universal index order).
        source_names: Source label value → the dataset's own label name.
        unmapped: Source label value → why it is not mapped to a universal class.
        aliases: Other accepted dataset names.
        notes: Caveats about the label definitions.
        max_label: Largest valid source value; values up to it without a mapping have no universal counterpart
            (e.g. TotalSegmentator's bones) and are ignored silently.
    """

    name: str
    full_name: str
    labels: Mapping[int, tuple[str, ...]]
    split_lr: Mapping[int, tuple[str, str]]
    annotated: tuple[str, ...]
    source_names: Mapping[int, str]
    unmapped: Mapping[int, str]
    aliases: tuple[str, ...] = ()
    notes: str = ""
    max_label: int = 0

    def availability(self, classes: Iterable[str | int | ClassInfo] | None = None) -> np.ndarray:
        """Which of ``classes`` (default all 32, index order) this dataset annotates: bool array (K,).

        >>> dataset("msd_lung").availability(["lung tumor", "right lung"]).tolist()
        [True, False]
        """
        wanted = resolve_classes(classes)
        have = set(self.annotated)
        return np.array([c.name in have for c in wanted], dtype=bool)

    def annotates(self, name: str | int | ClassInfo) -> bool:
        """True when the dataset annotates the class ``name``."""
        return resolve_class(name).name in self.annotated

    def values_for(self, name: str | int | ClassInfo) -> tuple[int, ...]:
        """Source label values whose voxels may belong to the class ``name`` (including split values)."""
        target = resolve_class(name).name
        values = {v for v, cls in self.labels.items() if target in cls}
        values |= {v for v, pair in self.split_lr.items() if target in pair}
        return tuple(sorted(values))

    def __repr__(self) -> str:
        return f"DatasetLabelMap({self.name!r}, annotated={list(self.annotated)})"


@dataclass(frozen=True, eq=False)
class Flare23View:
    """The FLARE 2023 label space (ids 1..13 organs, 14 lesion) and its evaluation constants.

    Attributes:
        classes: FLARE id → universal class name (14 → ``"lesion"``).
        tolerances_mm: FLARE id → NSD tolerance in mm.
        lesion_classes: Universal tumour classes merged into the FLARE lesion class.
        z_cropped: Classes cropped to the reference's z-range before scoring (aorta, IVC, esophagus).
    """

    classes: Mapping[int, str]
    tolerances_mm: Mapping[int, float]
    lesion_classes: tuple[str, ...]
    z_cropped: tuple[str, ...]
    notes: str = ""

    @property
    def lesion_id(self) -> int:
        return next(i for i, n in self.classes.items() if n == "lesion")


@dataclass(frozen=True, eq=False)
class _Taxonomy:
    classes: tuple[ClassInfo, ...]
    lookup: Mapping[str, ClassInfo]
    datasets: Mapping[str, DatasetLabelMap]
    dataset_lookup: Mapping[str, str]
    flare23: Flare23View
    path: str
    codes: Mapping[str, ClassCodes] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Code:
    """A coded concept: coding ``scheme`` (e.g. ``"SCT"``, SNOMED-CT), code ``value`` and ``meaning``."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class ClassCodes:
    """The SNOMED-CT codes of a class in DICOM objects (DICOM-SEG segments, RTSTRUCT ROIs, 3D Slicer terminology).

    Attributes:
        category: Segmented property category (CID 7150): Anatomical Structure for organs, Morphologically Abnormal
            Structure for tumours and cysts.
        type: Segmented property type (CID 7151), e.g. Liver, Kidney, Neoplasm, Cyst.
        modifier: Type modifier (laterality: Right / Left) or ``None``.
        region: Anatomic region of a tumour or cyst (e.g. Liver for a liver tumour), else ``None``.
    """

    category: Code
    type: Code
    modifier: Code | None = None
    region: Code | None = None


# ----------------------------------------------------------------------------------------------------------------
# loading and validation


def _norm(text: str) -> str:
    """Normalise a class name: lower case, ``_``/``-`` as spaces, single spaces."""
    return " ".join(str(text).lower().replace("_", " ").replace("-", " ").split())


def _norm_dataset(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def _fail(path: Path, problem: str) -> TaxonomyFileError:
    return TaxonomyFileError(
        f"The taxonomy file {path} is invalid: {problem}. Restore it from the universal package "
        "(reinstall) or fix the entry named."
    )


def _int_keys(path: Path, where: str, mapping: Any) -> dict[int, Any]:
    if not isinstance(mapping, dict):
        raise _fail(path, f"{where} must be an object")
    out: dict[int, Any] = {}
    for key, value in mapping.items():
        try:
            ivalue = int(key)
        except (TypeError, ValueError):
            raise _fail(path, f"{where} has a non-integer key {key!r}") from None
        if ivalue < 0:
            raise _fail(path, f"{where} has a negative key {key!r}")
        out[ivalue] = value
    return out


def _load_taxonomy(path: str | Path) -> _Taxonomy:
    """Read and validate a taxonomy JSON file (not cached; :func:`_taxonomy` caches the packaged one)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(path, "the file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"it cannot be read as JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _fail(path, "the top level must be an object")
    for key in ("classes", "datasets", "flare23"):
        if key not in raw:
            raise _fail(path, f"the key {key!r} is missing")

    classes = _parse_classes(path, raw["classes"])
    by_name = {c.name: c for c in classes}
    lookup = _build_lookup(path, classes)
    flare = _parse_flare23(path, raw["flare23"], by_name)
    datasets, dataset_lookup = _parse_datasets(path, raw["datasets"], by_name)
    return _Taxonomy(
        classes=classes,
        lookup=MappingProxyType(lookup),
        datasets=MappingProxyType(datasets),
        dataset_lookup=MappingProxyType(dataset_lookup),
        flare23=flare,
        path=str(path),
        codes=MappingProxyType(_parse_codes(path, raw.get("codes", {}), by_name)),
    )


def _parse_codes(path: Path, entries: Any, by_name: Mapping[str, ClassInfo]) -> dict[str, ClassCodes]:
    """The taxonomy's ``codes``: class name → ``{"category", "type", "modifier"?, "region"?}`` of
    ``[scheme, value, meaning]`` triples; every class needs one (checked)."""
    if not isinstance(entries, dict):
        raise _fail(path, "'codes' must be an object: class name -> codes")
    unknown = sorted(set(entries) - set(by_name))
    if unknown:
        raise _fail(path, f"'codes' names unknown classes {unknown}")
    missing = [n for n in by_name if n not in entries]
    if entries and missing:
        raise _fail(path, f"'codes' lacks the classes {missing}")

    def code(name: str, key: str, value: Any) -> Code | None:
        if value is None and key in ("modifier", "region"):
            return None
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) and v for v in value)):
            raise _fail(path, f"codes of {name!r}: {key} must be [scheme, value, meaning] strings, got {value!r}")
        return Code(*value)

    out = {}
    for name, e in entries.items():
        if not isinstance(e, dict) or not {"category", "type"} <= set(e) or set(e) - set(ClassCodes.__annotations__):
            raise _fail(path, f"codes of {name!r} must hold category, type and optionally modifier, region")
        out[name] = ClassCodes(**{k: code(name, k, e.get(k)) for k in ClassCodes.__annotations__})
    return out


def _parse_classes(path: Path, entries: Any) -> tuple[ClassInfo, ...]:
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "'classes' must be a non-empty list")
    out = tuple(_parse_class(path, f"classes[{i}]", e) for i, e in enumerate(entries))
    indices = [c.index for c in out]
    if sorted(indices) != list(range(1, len(out) + 1)) or indices != sorted(indices):
        raise _fail(path, f"class indices must be 1..{len(out)}, unique and in order (got {indices})")
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(path, f"duplicate class names {dupes}")
    by_name = {c.name: c for c in out}
    for c in out:
        _check_class_relations(path, c, by_name)
    return out


def _parse_class(path: Path, where: str, e: Any) -> ClassInfo:
    """One validated entry of the taxonomy's ``classes`` list."""
    if not isinstance(e, dict):
        raise _fail(path, f"{where} must be an object")
    for key in ("index", "name", "prompt_name", "kind", "color"):
        if key not in e:
            raise _fail(path, f"{where} lacks {key!r}")
    name = e["name"]
    if not isinstance(name, str) or name != _norm(name) or not name:
        raise _fail(path, f"{where} name {name!r} must be a non-empty lower-case name with single spaces")
    index = e["index"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise _fail(path, f"class {name!r} has a non-integer index {index!r}")
    if e["kind"] not in ("organ", "tumor"):
        raise _fail(path, f"class {name!r} has kind {e['kind']!r} (expected 'organ' or 'tumor')")
    color = e["color"]
    if (
        not isinstance(color, list)
        or len(color) != 3
        or not all(isinstance(v, int) and 0 <= v <= 255 for v in color)
    ):
        raise _fail(path, f"class {name!r} colour {color!r} must be three ints 0-255")
    side = e.get("side")
    if side not in (None, "right", "left"):
        raise _fail(path, f"class {name!r} has side {side!r}")
    aliases = tuple(_norm(a) for a in (*e.get("aliases", []), *e.get("legacy_aliases", [])))
    return ClassInfo(
        index=index,
        name=name,
        aliases=aliases,
        prompt_name=str(e["prompt_name"]),
        color=tuple(color),  # type: ignore[arg-type]
        kind=e["kind"],
        parent=tuple(e.get("parent") or ()),
        paired=e.get("paired"),
        side=side,
        official_prompt=str(e.get("official_prompt", e["prompt_name"])),
    )


def _check_class_relations(path: Path, c: ClassInfo, by_name: Mapping[str, ClassInfo]) -> None:
    """A class's parent organs and its left/right partner exist and agree with it."""
    for p in c.parent:
        if p not in by_name:
            raise _fail(path, f"class {c.name!r} has an unknown parent {p!r}")
        if by_name[p].kind != "organ":
            raise _fail(path, f"class {c.name!r} has a parent {p!r} that is not an organ")
    if c.kind == "tumor" and not c.parent:
        raise _fail(path, f"tumour class {c.name!r} needs a parent organ")
    if c.kind == "organ" and c.parent:
        raise _fail(path, f"organ class {c.name!r} must not have a parent")
    if c.paired is not None:
        other = by_name.get(c.paired)
        if other is None:
            raise _fail(path, f"class {c.name!r} is paired with an unknown class {c.paired!r}")
        if other.paired != c.name:
            raise _fail(path, f"classes {c.name!r} and {c.paired!r} are not paired with each other")
        if c.side is None or other.side is None or c.side == other.side:
            raise _fail(path, f"paired classes {c.name!r} and {c.paired!r} need opposite sides")


def _build_lookup(path: Path, classes: tuple[ClassInfo, ...]) -> dict[str, ClassInfo]:
    lookup: dict[str, ClassInfo] = {}
    for c in classes:
        for key in (c.name, *c.aliases, _norm(c.prompt_name), _norm(c.official_prompt)):
            if not key:
                raise _fail(path, f"class {c.name!r} has an empty alias")
            prev = lookup.get(key)
            if prev is not None and prev.name != c.name:
                raise _fail(path, f"the name/alias {key!r} is used by both {prev.name!r} and {c.name!r}")
            lookup[key] = c
    return lookup


def _check_class_list(
    path: Path, where: str, names: Any, by_name: Mapping[str, ClassInfo]
) -> tuple[str, ...]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _fail(path, f"{where} must be a list of class names")
    for n in names:
        if n not in by_name:
            raise _fail(path, f"{where} targets an unknown class {n!r}")
    if len(set(names)) != len(names):
        raise _fail(path, f"{where} repeats a class")
    return tuple(names)


def _parse_flare23(path: Path, raw: Any, by_name: Mapping[str, ClassInfo]) -> Flare23View:
    if not isinstance(raw, dict):
        raise _fail(path, "'flare23' must be an object")
    classes = _int_keys(path, "flare23.classes", raw.get("classes"))
    tolerances = _int_keys(path, "flare23.tolerances_mm", raw.get("tolerances_mm"))
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise _fail(path, "flare23.classes must have ids 1..N")
    if set(tolerances) != set(classes):
        raise _fail(path, "flare23.tolerances_mm must give one tolerance per FLARE id")
    for i, n in classes.items():
        if n != "lesion" and n not in by_name:
            raise _fail(path, f"flare23 id {i} targets an unknown class {n!r}")
    if list(classes.values()).count("lesion") != 1:
        raise _fail(path, "flare23.classes needs exactly one 'lesion' id")
    for i, t in tolerances.items():
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t <= 0:
            raise _fail(path, f"flare23 tolerance of id {i} must be a positive number of mm")
    lesion = _check_class_list(path, "flare23.lesion_classes", raw.get("lesion_classes"), by_name)
    if any(by_name[n].kind != "tumor" for n in lesion):
        raise _fail(path, "flare23.lesion_classes must be tumour classes")
    z_cropped = _check_class_list(path, "flare23.z_cropped", raw.get("z_cropped", []), by_name)
    return Flare23View(
        classes=MappingProxyType({i: classes[i] for i in sorted(classes)}),
        tolerances_mm=MappingProxyType({i: float(tolerances[i]) for i in sorted(tolerances)}),
        lesion_classes=lesion,
        z_cropped=z_cropped,
        notes=str(raw.get("notes", "")),
    )


def _parse_datasets(
    path: Path, raw: Any, by_name: Mapping[str, ClassInfo]
) -> tuple[dict[str, DatasetLabelMap], dict[str, str]]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "'datasets' must be a non-empty object")
    datasets: dict[str, DatasetLabelMap] = {}
    lookup: dict[str, str] = {}
    for dname, e in raw.items():
        dlm = _parse_dataset(path, dname, e, by_name)
        datasets[dname] = dlm
        for key in (dname, *dlm.aliases):
            k = _norm_dataset(key)
            if lookup.get(k, dname) != dname:
                raise _fail(path, f"the dataset name/alias {key!r} is used by {lookup[k]!r} and {dname!r}")
            lookup[k] = dname
    return datasets, lookup


def _parse_dataset(path: Path, dname: str, e: Any, by_name: Mapping[str, ClassInfo]) -> DatasetLabelMap:
    """One validated entry of the taxonomy's ``datasets`` object."""
    where = f"dataset {dname!r}"
    if not isinstance(e, dict):
        raise _fail(path, f"{where} must be an object")
    labels_raw = _int_keys(path, f"{where} labels", e.get("labels"))
    if not labels_raw:
        raise _fail(path, f"{where} has no labels")
    if 0 in labels_raw:
        raise _fail(path, f"{where} maps label 0 (background)")
    labels = {
        v: _check_class_list(path, f"{where} label {v}", cls, by_name)
        for v, cls in sorted(labels_raw.items())
    }
    split = _parse_split_lr(path, where, e.get("split_lr", {}), labels, by_name)
    for v, cls in labels.items():
        if not cls and v not in split:
            raise _fail(path, f"{where} label {v} maps to no class (list it under 'unmapped' instead)")
    annotated = _check_annotated(path, where, e.get("annotated"), labels, split, by_name)
    source_names = {
        k: str(s) for k, s in _int_keys(path, f"{where} source_names", e.get("source_names", {})).items()
    }
    unmapped = {k: str(s) for k, s in _int_keys(path, f"{where} unmapped", e.get("unmapped", {})).items()}
    if set(unmapped) & set(labels):
        raise _fail(path, f"{where} lists values both as mapped and unmapped")
    highest = max((*labels, *unmapped, *source_names))
    max_label = e.get("max_label", highest)
    if not isinstance(max_label, int) or isinstance(max_label, bool) or max_label < highest:
        raise _fail(path, f"{where} max_label must be an integer >= {highest}")
    return DatasetLabelMap(
        name=dname,
        full_name=str(e.get("full_name", dname)),
        labels=MappingProxyType(labels),
        split_lr=MappingProxyType(split),
        annotated=tuple(sorted(annotated, key=lambda n: by_name[n].index)),
        source_names=MappingProxyType(dict(sorted(source_names.items()))),
        unmapped=MappingProxyType(dict(sorted(unmapped.items()))),
        aliases=tuple(e.get("aliases", [])),
        notes=str(e.get("notes", "")),
        max_label=max_label,
    )


def _parse_split_lr(
    path: Path, where: str, raw: Any, labels: Mapping[int, tuple[str, ...]], by_name: Mapping[str, ClassInfo]
) -> dict[int, tuple[str, str]]:
    """A dataset's ``split_lr``: source value → (right class, left class) of a paired structure."""
    split: dict[int, tuple[str, str]] = {}
    for v, pair in sorted(_int_keys(path, f"{where} split_lr", raw).items()):
        pair = _check_class_list(path, f"{where} split_lr {v}", pair, by_name)
        if v not in labels:
            raise _fail(path, f"{where} split_lr value {v} is not in its labels")
        if len(pair) != 2:
            raise _fail(path, f"{where} split_lr {v} must be [right class, left class]")
        right, left = (by_name[n] for n in pair)
        if right.paired != left.name or right.side != "right" or left.side != "left":
            raise _fail(path, f"{where} split_lr {v} must be a [right, left] pair, got {list(pair)}")
        if set(pair) & set(labels[v]):
            raise _fail(path, f"{where} label {v} lists a class that it also splits")
        split[v] = (pair[0], pair[1])
    return split


def _check_annotated(
    path: Path,
    where: str,
    raw: Any,
    labels: Mapping[int, tuple[str, ...]],
    split: Mapping[int, tuple[str, str]],
    by_name: Mapping[str, ClassInfo],
) -> tuple[str, ...]:
    """A dataset's ``annotated`` list, checked against its labels (and their one-vs-all parents)."""
    derived = {n for cls in labels.values() for n in cls} | {n for p in split.values() for n in p}
    annotated = _check_class_list(path, f"{where} annotated", raw, by_name)
    if set(annotated) != derived:
        missing = sorted(derived - set(annotated))
        extra = sorted(set(annotated) - derived)
        raise _fail(
            path,
            f"{where} 'annotated' disagrees with its labels (not claimed: {missing}; claimed, unused: {extra})",
        )
    # one-vs-all: a tumour label also sets its parent organ whenever the dataset annotates that organ
    for v, cls in labels.items():
        targets = set(cls) | set(split.get(v, ()))
        for n in cls:
            info = by_name[n]
            annotated_parents = [p for p in info.parent if p in derived]
            if info.kind == "tumor" and annotated_parents and not targets & set(info.parent):
                raise _fail(
                    path,
                    f"{where} label {v} ({n}) must also set its annotated parent organ "
                    f"({' or '.join(annotated_parents)}): masks are one-vs-all",
                )
    return annotated


@functools.cache
def _taxonomy() -> _Taxonomy:
    """The packaged taxonomy, loaded and validated once."""
    return _load_taxonomy(TAXONOMY_PATH)


# ----------------------------------------------------------------------------------------------------------------
# classes

CLASSES: tuple[ClassInfo, ...] = _taxonomy().classes
NUM_CLASSES: int = len(CLASSES)


def class_codes(name: str | int | ClassInfo) -> ClassCodes:
    """The SNOMED-CT codes of a class (any name :func:`resolve_class` accepts) for DICOM and 3D Slicer exports.

    Raises:
        ClassNameError: An unknown class.

    >>> c = class_codes("right kidney")
    >>> c.type.meaning, c.modifier.meaning, class_codes("liver tumor").region.meaning
    ('Kidney', 'Right', 'Liver')
    """
    return _taxonomy().codes[resolve_class(name).name]


def class_names() -> list[str]:
    """The canonical class names in universal index order.

    >>> class_names()[:3]
    ['spleen', 'right kidney', 'left kidney']
    """
    return [c.name for c in CLASSES]


def _suggest(name: str) -> str:
    tax = _taxonomy()
    keys = difflib.get_close_matches(_norm(name), list(tax.lookup), n=8, cutoff=0.5)
    best: list[str] = []
    for k in keys:
        canonical = tax.lookup[k].name
        if canonical not in best:
            best.append(canonical)
    if best:
        return "Did you mean " + ", ".join(repr(b) for b in best[:4]) + "?"
    return "Valid names: " + ", ".join(class_names()) + "."


def resolve_class(name: str | int | ClassInfo) -> ClassInfo:
    """Look up a universal class by name, alias, official prompt spelling, index (1..32) or :class:`ClassInfo`.

    Names are case-insensitive and ``_``/``-`` count as spaces (``"kidney_right"``, ``"Right-Kidney"``).

    Raises:
        ClassNameError: for an unknown name or an index outside 1..32; the message lists the closest names.

    >>> resolve_class("gall_bladder").name
    'gallbladder'
    >>> resolve_class(27).name
    'liver tumor'
    """
    if isinstance(name, ClassInfo):
        if 1 <= name.index <= NUM_CLASSES and CLASSES[name.index - 1].name == name.name:
            return CLASSES[name.index - 1]
        return resolve_class(name.name)
    if isinstance(name, (bool, np.bool_)):
        raise ClassNameError(f"{name!r} is not a class; give a class name or an index 1..{NUM_CLASSES}.")
    if isinstance(name, (int, np.integer)):
        if 1 <= int(name) <= NUM_CLASSES:
            return CLASSES[int(name) - 1]
        raise ClassNameError(
            f"Class index {int(name)} is out of range: universal indices are 1..{NUM_CLASSES} "
            "(see universal.taxonomy.class_names())."
        )
    if not isinstance(name, str):
        raise ClassNameError(
            f"{name!r} ({type(name).__name__}) is not a class; give a class name or an index 1..{NUM_CLASSES}."
        )
    info = _taxonomy().lookup.get(_norm(name))
    if info is None:
        raise ClassNameError(
            f"Unknown class name {name!r}. {_suggest(name)} "
            "(universal.taxonomy.class_names() lists all classes; aliases are accepted.)"
        )
    return info


def resolve_classes(
    names: Iterable[str | int | ClassInfo] | str | int | ClassInfo | None = None,
) -> list[ClassInfo]:
    """Resolve several classes: ``None`` → all 32 in index order; duplicates are dropped, order kept.

    >>> [c.name for c in resolve_classes(["IVC", "liver", "Liver"])]
    ['inferior vena cava', 'liver']
    """
    if names is None:
        return list(CLASSES)
    if isinstance(names, (str, int, np.integer, ClassInfo)):
        names = [names]
    out: list[ClassInfo] = []
    seen: set[str] = set()
    for n in names:
        info = resolve_class(n)
        if info.name not in seen:
            seen.add(info.name)
            out.append(info)
    return out


def colormap() -> np.ndarray:
    """RGB lookup table ``(NUM_CLASSES + 1, 3)`` uint8 indexed by universal id (row 0, background, is black)."""
    lut = np.zeros((NUM_CLASSES + 1, 3), dtype=np.uint8)
    for c in CLASSES:
        lut[c.index] = c.color
    return lut


# ----------------------------------------------------------------------------------------------------------------
# FLARE 2023 view

FLARE23: Flare23View = _taxonomy().flare23
FLARE23_LESION_CLASSES: tuple[str, ...] = FLARE23.lesion_classes


def flare23_classes() -> dict[int, str]:
    """FLARE 2023 ids → universal class names (1..13 organs; 14 → ``"lesion"``).

    >>> flare23_classes()[6]
    'inferior vena cava'
    """
    return dict(FLARE23.classes)


def flare23_tolerances_mm() -> dict[int, float]:
    """FLARE 2023 id → NSD tolerance in mm (5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3, 2 for ids 1..14)."""
    return dict(FLARE23.tolerances_mm)


def flare23_label_map(masks: Mapping[str, np.ndarray]) -> np.ndarray:
    """Universal masks (name → bool array) → FLARE 2023 label map (uint8), the lesion drawn over organs.

    Organs missing from ``masks`` stay 0; the lesion is the union of :data:`FLARE23_LESION_CLASSES` present.
    """
    masks = {resolve_class(k).name: np.asarray(v) for k, v in masks.items()}
    if not masks:
        raise InputError("flare23_label_map needs at least one mask.")
    shape = next(iter(masks.values())).shape
    out = np.zeros(shape, dtype=np.uint8)
    for i, n in FLARE23.classes.items():
        if n in masks:
            out[masks[n].astype(bool)] = i
    lesion = np.zeros(shape, dtype=bool)
    for n in FLARE23.lesion_classes:
        if n in masks:
            lesion |= masks[n].astype(bool)
    out[lesion] = FLARE23.lesion_id
    return out


# ----------------------------------------------------------------------------------------------------------------
# datasets


def list_datasets() -> list[str]:
    """Canonical names of the datasets with a label map.

    >>> "totalsegmentator_v2" in list_datasets()
    True
    """
    return sorted(_taxonomy().datasets)


def dataset(name: str | DatasetLabelMap) -> DatasetLabelMap:
    """The label map of a dataset by name or alias (case, spaces, ``_`` and ``-`` ignored).

    Raises:
        DatasetNameError: (a :class:`~universal.errors.ClassNameError`) for an unknown dataset.

    >>> dataset("KiTS23").split_lr[1]
    ('right kidney', 'left kidney')
    """
    if isinstance(name, DatasetLabelMap):
        return name
    tax = _taxonomy()
    key = tax.dataset_lookup.get(_norm_dataset(name))
    if key is None:
        close = difflib.get_close_matches(_norm_dataset(name), list(tax.dataset_lookup), n=4, cutoff=0.5)
        names = list(dict.fromkeys(tax.dataset_lookup[c] for c in close))
        hint = f"Did you mean {', '.join(map(repr, names))}? " if names else ""
        raise DatasetNameError(
            f"Unknown dataset {name!r}. {hint}Known datasets: {', '.join(list_datasets())}."
        )
    return tax.datasets[key]


# ----------------------------------------------------------------------------------------------------------------
# label transfer


def world_x_mm(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World (RAS+) x in mm of voxel coordinates ``ijk`` (N, 3) under the (4, 4) voxel → RAS+ ``affine``.

    Larger x is the patient's right. The one place that decides sides from the affine (labels and post-processing).

    >>> world_x_mm(np.diag([-2.0, 1.0, 1.0, 1.0]), np.array([[0.0, 0, 0], [3, 0, 0]])).tolist()
    [0.0, -6.0]
    """
    return ijk @ affine[0, :3] + affine[0, 3]


def _image_mid_x(affine: np.ndarray, shape: tuple[int, ...]) -> float:
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1).T
    xs = world_x_mm(affine, corners.astype(float))
    return float((xs.min() + xs.max()) / 2)


def _split_sides(
    label: np.ndarray,
    values: list[int],
    organ_values: list[int],
    affine: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Split the structure ``isin(label, values)`` into (right, left) bool masks by connected components.

    Each component goes to the side of its centroid's world x relative to the midline (the mean world x of the
    whole structure when it has ≥2 components, else the centre of the image's x range). A component with no
    ``organ_values`` voxel (a detached tumour) goes to the side of the nearest organ voxel when there is one.
    """
    from scipy import ndimage

    struct = np.isin(label, values)
    right = np.zeros(label.shape, dtype=bool)
    left = np.zeros(label.shape, dtype=bool)
    if not struct.any():
        return right, left
    comps, n = ndimage.label(struct, structure=ndimage.generate_binary_structure(3, 3))
    idx = np.arange(1, n + 1)
    sizes = np.asarray(ndimage.sum_labels(struct, comps, idx), dtype=float)
    centroids = np.asarray(ndimage.center_of_mass(struct, comps, idx), dtype=float).reshape(n, 3)
    cx = world_x_mm(affine, centroids)
    midline = float(np.average(cx, weights=sizes)) if n >= 2 else _image_mid_x(affine, label.shape)
    is_right = cx > midline

    organ = np.isin(label, organ_values) if organ_values else np.zeros(label.shape, dtype=bool)
    has_organ = np.asarray(ndimage.maximum(organ, comps, idx), dtype=bool).reshape(n)
    if organ_values and has_organ.any() and not has_organ.all():
        # detached tumour components: the side of the nearest organ voxel (distances in mm inside the bbox)
        right_org = np.isin(comps, idx[has_organ & is_right])
        left_org = np.isin(comps, idx[has_organ & ~is_right])
        bbox = ndimage.find_objects(struct.astype(np.uint8))[0]
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        inf = np.full(comps[bbox].shape, np.inf)
        d_right = (
            ndimage.distance_transform_edt(~right_org[bbox], sampling=spacing) if right_org.any() else inf
        )
        d_left = ndimage.distance_transform_edt(~left_org[bbox], sampling=spacing) if left_org.any() else inf
        sub = comps[bbox]
        for k in idx[~has_organ]:
            sel = sub == k
            is_right[k - 1] = d_right[sel].min() < d_left[sel].min()
    lut = np.zeros(n + 1, dtype=np.int8)
    lut[1:] = np.where(is_right, 1, 2)
    side = lut[comps]
    return side == 1, side == 2


def transfer_labels(
    label: np.ndarray,
    label_map: DatasetLabelMap | str,
    affine: np.ndarray | None = None,
    classes: Iterable[str | int | ClassInfo] | None = None,
) -> np.ndarray:
    """A dataset's label map (X, Y, Z) → one-vs-all universal masks, bool ``(K, X, Y, Z)`` in the order of ``classes``.

    Every source value sets all universal classes it belongs to (MSD Liver ``2`` sets ``liver tumor`` *and*
    ``liver``). A value that labels both sides of a paired structure (KiTS kidney, WORD adrenal) is split into
    right/left: connected components (26-connectivity) of the union of the values that split into the same pair,
    each assigned by its centroid's world x (``affine`` maps voxels to RAS+ mm; larger x = patient's right)
    relative to the midline — the structure's mean world x when it has ≥2 components, else the centre of the
    image's x range. Tumour values of such a dataset (KiTS tumour, cyst) set the kidney of their side: the
    kidney component they touch, else the nearest kidney. Classes the dataset does not annotate come out empty:
    combine with :meth:`DatasetLabelMap.availability`.

    Args:
        label: Integer label map (X, Y, Z) of the dataset.
        label_map: A :class:`DatasetLabelMap` or a dataset name (see :func:`list_datasets`).
        affine: (4, 4) voxel → world (RAS+ mm) affine of ``label``; ``None`` = identity.
        classes: Universal classes to return (default: all 32 in index order).

    >>> lab = np.zeros((4, 4, 4), np.int16); lab[1, 1, 1] = 2
    >>> m = transfer_labels(lab, "msd_liver", np.eye(4), ["liver", "liver tumor", "spleen"])
    >>> m.reshape(3, -1).sum(1).tolist()
    [1, 1, 0]
    """
    dlm = dataset(label_map)
    label = _integer_labels(label)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise InputError(f"affine must be a (4, 4) matrix, got shape {affine.shape}.")
    wanted = resolve_classes(classes)
    pos = {c.name: i for i, c in enumerate(wanted)}
    out = np.zeros((len(wanted), *label.shape), dtype=bool)

    present_set = {int(v) for v in np.unique(label)}
    unknown = sorted(
        v for v in present_set - set(dlm.labels) - set(dlm.unmapped) if v < 0 or v > dlm.max_label
    )
    if unknown:
        warnings.warn(
            f"label values {unknown[:10]} are not in the {dlm.name!r} label map and were ignored; "
            "is this the right dataset?",
            UserWarning,
            stacklevel=2,
        )
    for c in wanted:
        values = [v for v, cls in dlm.labels.items() if c.name in cls and v in present_set]
        if values:
            out[pos[c.name]] = np.isin(label, values)
    _transfer_split_values(out, pos, label, dlm, present_set, affine)
    return out


def _integer_labels(label: Any) -> np.ndarray:
    """``label`` as a 3-D integer array (bool → uint8, integral floats → int64), else an :class:`InputError`."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise InputError(f"transfer_labels expects a 3-D label map (X, Y, Z), got shape {label.shape}.")
    if np.issubdtype(label.dtype, np.integer):
        return label
    if label.dtype == bool:
        return label.astype(np.uint8)
    rounded = np.rint(label)
    if not np.allclose(rounded, label):
        raise InputError("The label map has non-integer values; give the dataset's integer label file.")
    return rounded.astype(np.int64)


def _transfer_split_values(
    out: np.ndarray,
    pos: Mapping[str, int],
    label: np.ndarray,
    dlm: DatasetLabelMap,
    present: set[int],
    affine: np.ndarray,
) -> None:
    """Add the right/left halves of the ``split_lr`` values present in ``label`` to the rows of ``out`` (in place)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for v, pair in dlm.split_lr.items():
        if v in present:
            groups.setdefault(pair, []).append(v)
    for pair, values in groups.items():
        if pair[0] not in pos and pair[1] not in pos:
            continue
        organ_values = [v for v in values if not any(resolve_class(n).is_tumor for n in dlm.labels[v])]
        right, left = _split_sides(label, values, organ_values, affine)
        if pair[0] in pos:
            out[pos[pair[0]]] |= right
        if pair[1] in pos:
            out[pos[pair[1]]] |= left


def masks_to_label_map(
    masks: Mapping[str | int | ClassInfo, np.ndarray] | np.ndarray,
    classes: Iterable[str | int | ClassInfo] | None = None,
) -> np.ndarray:
    """One-vs-all masks → an int16 label map of universal ids, organs first and tumours drawn over them.

    Args:
        masks: ``{class: bool array (X, Y, Z)}`` or an array ``(K, X, Y, Z)`` whose rows follow ``classes``.
        classes: For an array: the class of each row (default all 32 when K == 32). For a dict: optional subset.

    >>> m = {"liver": np.ones((2, 2, 2), bool), "liver tumor": np.eye(2, dtype=bool)[:, :, None].repeat(2, 2)}
    >>> masks_to_label_map(m)[:, :, 0].tolist()
    [[27, 6], [6, 27]]
    """
    if isinstance(masks, Mapping):
        items = [(resolve_class(k), np.asarray(v)) for k, v in masks.items()]
        if classes is not None:
            keep = {c.name for c in resolve_classes(classes)}
            items = [(c, m) for c, m in items if c.name in keep]
    else:
        arr = np.asarray(masks)
        if arr.ndim < 2:
            raise InputError(f"masks must be (K, X, Y, Z) or a dict of arrays, got shape {arr.shape}.")
        if classes is None:
            if arr.shape[0] != NUM_CLASSES:
                raise InputError(
                    f"masks has {arr.shape[0]} rows; pass `classes` (one per row) unless all {NUM_CLASSES} are given."
                )
            infos = list(CLASSES)
        else:
            infos = [resolve_class(c) for c in classes]
            if len(infos) != arr.shape[0]:
                raise InputError(f"masks has {arr.shape[0]} rows but {len(infos)} classes were given.")
        items = list(zip(infos, arr))
    if not items:
        raise InputError("masks_to_label_map needs at least one mask.")
    shape = items[0][1].shape
    for c, m in items:
        if m.shape != shape:
            raise InputError(f"mask of {c.name!r} has shape {m.shape}, expected {shape}.")
    out = np.zeros(shape, dtype=np.int16)
    for c, m in sorted(items, key=lambda cm: (cm[0].is_tumor, cm[0].index)):
        out[m.astype(bool)] = c.index
    return out
