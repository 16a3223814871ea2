"""Corrected cases as a partial-label training dataset.

A clinician corrects some classes of a segmentation (:mod:`universal.edit`) and saves the case: the CT and a label
map of the **corrected classes only** go into a local dataset folder, and the folder's manifest (the project's own
format, :mod:`universal.data`) marks exactly those classes as annotated for that case. Every other class is
unannotated, so the masked loss (:func:`universal.loss.masked_bce_dice`) gives it no gradient: fine-tuning on the
case (:mod:`universal.finetune`) learns the corrections and nothing else. Several cases accumulate in one folder::

    DATASET/
      manifest.json                      # {"datasets": {"corrections": <universal ids>}, "cases": [...]}
      cases/<name>/ct.nii.gz             # the CT on its own grid (int16 HU when integral)
      cases/<name>/labels.nii.gz         # universal ids of the corrected classes (tumours over organs)

A case folder is written whole (:func:`universal.io.atomic_folder`) before the manifest, which is rewritten
atomically; saving a case under an existing name replaces it. Case names are reduced to ``[A-Za-z0-9._-]`` (the
folder's and the manifest's ``name``), so no name leaves the folder; the name as given is stored too
(``given_name``). Two different given names that reduce to the same safe name (``"patient 1"``, ``"patient/1"``)
never replace each other: the second save is refused with an :class:`~universal.errors.InputError` that asks for
another name (an entry of an older version, without ``given_name``, is replaced as before).

>>> import tempfile
>>> from universal.phantom import make_phantom
>>> ph = make_phantom(shape=(32, 32, 24), spacing=(6.0, 6.0, 6.0))
>>> case = save_case(tempfile.mkdtemp(), ph.volume, ph.masks, ["liver"], name="demo")
>>> case.name, case.annotated
('demo', ('liver',))
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from universal import taxonomy
from universal.errors import InputError, InputWarning

__all__ = ["DATASET_KEY", "MANIFEST", "CorrectedCase", "list_cases", "save_case"]

DATASET_KEY = "corrections"  #: the manifest's dataset name of corrected cases (label values: universal ids)
MANIFEST = "manifest.json"
_LOCK = threading.Lock()  # one writer of a manifest at a time within this process (dashboard threads)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class CorrectedCase:
    """One saved case: its name, the classes annotated (the corrected ones), files, where it came from, when."""

    name: str
    annotated: tuple[str, ...]
    image: Path
    label: Path
    source: str = ""
    saved: str = ""
    voxels: Mapping[str, int] | None = None
    given_name: str = ""  #: the name as passed to :func:`save_case` (``name`` is its safe form)


def _case_name(name: str) -> str:
    clean = _UNSAFE.sub("_", str(name)).strip("._-")
    return clean[:80] or "case"


def _dataset_spec() -> dict[str, Any]:
    from universal.data import universal_id_label_map_spec

    return universal_id_label_map_spec(None)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"version": 1, "datasets": {}, "cases": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a readable manifest ({exc}); choose another dataset folder") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise InputError(f"{path} is not a dataset manifest (no 'cases' list); choose another dataset folder")
    return data


def _corrected_label_map(
    masks: Mapping[str, np.ndarray], names: list[str], shape: tuple[int, ...]
) -> np.ndarray:
    """The label map of the corrected classes, checked to give back exactly their masks (else a warning)."""
    chosen = {n: np.asarray(masks[n], dtype=bool) for n in names}
    bad = [n for n, m in chosen.items() if m.shape != shape]
    if bad:
        raise InputError(f"the masks of {bad} are not on the CT's grid {shape}; correct them on this CT")
    label = np.asarray(taxonomy.masks_to_label_map(chosen, names))
    back = taxonomy.transfer_labels(label, _label_map(), None, names)
    differ = {n: int(np.count_nonzero(back[i] != chosen[n])) for i, n in enumerate(names)}
    differ = {n: v for n, v in differ.items() if v}
    if differ:
        warnings.warn(
            f"the saved label map changes {differ} voxels of the corrected masks (a tumour outside its organ, or "
            "two corrected classes overlapping); check them in the label file",
            InputWarning,
            stacklevel=3,
        )
    return label


def _label_map():
    """The :class:`~universal.taxonomy.DatasetLabelMap` of the corrections dataset (universal ids)."""
    from universal.data import label_map_from_spec

    return label_map_from_spec(DATASET_KEY, _dataset_spec())


def save_case(
    dataset: str | os.PathLike,
    volume: Any,
    masks: Mapping[str, np.ndarray],
    corrected: Sequence[str],
    *,
    name: str | None = None,
    source: str = "",
) -> CorrectedCase:
    """Save the CT ``volume`` and the ``corrected`` classes of ``masks`` as a training case of ``dataset``.

    Args:
        dataset: The dataset folder (created when missing; its ``manifest.json`` is added to).
        volume: The CT (:class:`universal.io.Volume`; written on its own source grid).
        masks: Class name → bool mask on ``volume``'s grid (e.g. the corrected segmentation's masks).
        corrected: The classes to annotate: the corrected ones. Only they are in the label file and the
            manifest's ``annotated`` list of the case; the others stay unannotated (masked in training).
        name: Case name (default: the volume's name); an existing case of that name is replaced. Stored as given
            (``given_name``) and reduced to a safe folder name (``name``).
        source: Free text stored with the case (e.g. the model that made the masks).

    Raises:
        InputError: no corrected class, a class not in ``masks``, masks not on the CT's grid, a folder whose
            manifest is not one, a ``name`` whose safe form is already taken by a case saved under another name
            (nothing is written).
    """
    from universal.io import atomic_folder, atomic_write_text, save_label_map, save_volume

    names = [c.name for c in taxonomy.resolve_classes(list(corrected))] if corrected else []
    if not names:
        raise InputError("no corrected class to save: correct (or choose) at least one class first")
    missing = [n for n in names if n not in masks]
    if missing:
        raise InputError(f"no mask of {missing} to save; segment these classes first")
    label = _corrected_label_map(masks, names, tuple(volume.shape))
    given = str(name or getattr(volume, "name", "") or "case")
    case = _case_name(given)
    root = Path(dataset)
    manifest_path = root / MANIFEST
    with _LOCK:
        data = _read_manifest(manifest_path)  # refuse a foreign file before writing anything
        _check_name_free(data, case, given)
        with atomic_folder(root / "cases" / case) as tmp:
            save_volume(volume, tmp / "ct.nii.gz")
            save_label_map(label, volume, tmp / "labels.nii.gz")
        entry = _entry(case, given, names, source, {n: int(np.count_nonzero(masks[n])) for n in names})
        data.setdefault("version", 1)
        data.setdefault("datasets", {})[DATASET_KEY] = _dataset_spec()
        data["cases"] = [c for c in data["cases"] if not (isinstance(c, dict) and c.get("name") == case)]
        data["cases"].append(entry)
        atomic_write_text(manifest_path, json.dumps(data, indent=2) + "\n")
    image, label_path = root / entry["image"], root / entry["label"]
    return CorrectedCase(
        case, tuple(names), image, label_path, source, entry["saved"], entry["voxels"], given
    )


def _check_name_free(data: Mapping[str, Any], case: str, given: str) -> None:
    """Refuse ``given`` when its safe name ``case`` belongs to a case saved under another given name."""
    for c in data.get("cases", []):
        if not isinstance(c, dict) or c.get("name") != case or "given_name" not in c:
            continue
        if str(c["given_name"]) != given:
            raise InputError(
                f"case name {given!r} is stored as {case!r}, which already holds the case {c['given_name']!r}; "
                "save it under another name (or save under that name to replace it)"
            )


def _entry(case: str, given: str, names: list[str], source: str, voxels: dict[str, int]) -> dict[str, Any]:
    """The manifest entry of a saved case: its files, the annotated (corrected) classes, where and when."""
    return {
        "name": case,
        "given_name": given,
        "image": f"cases/{case}/ct.nii.gz",
        "label": f"cases/{case}/labels.nii.gz",
        "dataset": DATASET_KEY,
        "annotated": names,
        "source": source,
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "voxels": voxels,
    }


def list_cases(dataset: str | os.PathLike) -> list[CorrectedCase]:
    """The corrected cases saved in ``dataset`` (empty when there is no manifest yet), in saving order.

    Raises:
        InputError: the folder's manifest is not one.
    """
    from universal.data import load_manifest

    path = Path(dataset) / MANIFEST
    if not path.is_file():
        return []
    manifest = load_manifest(path)
    out = []
    for c in manifest.cases:
        if c.dataset != DATASET_KEY or c.label is None:
            continue
        voxels = c.meta.get("voxels") if isinstance(c.meta.get("voxels"), dict) else None
        source, saved = str(c.meta.get("source", "")), str(c.meta.get("saved", ""))
        given = str(c.meta.get("given_name", c.name))
        out.append(
            CorrectedCase(c.name, c.annotated_classes(), c.image, c.label, source, saved, voxels, given)
        )
    return out
