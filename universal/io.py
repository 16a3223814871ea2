"""Reading and writing CT volumes and label maps (NIfTI, NRRD, MHA, DICOM folder/zip, DICOM-SEG) on a RAS+ grid.

Every loader returns arrays in **RAS+ voxel order** (first axis toward the patient's Right, second Anterior, third
Superior) with a (4, 4) voxel → world (RAS+, mm) affine, and remembers the file's own voxel order
(:class:`SourceInfo`) so that results can be written back on exactly the input grid:

>>> import numpy as np
>>> hu = np.full((16, 16, 12), -1000.0, np.float32); hu[4:12, 4:12, 2:10] = 40.0
>>> vol = volume_from_array(hu, spacing=(0.8, 0.8, 2.5))
>>> vol.shape, vol.spacing
((16, 16, 12), (0.8, 0.8, 2.5))

SimpleITK images are LPS+: their direction/origin are converted to a RAS+ affine by negating the first two rows.
Reorientation uses ``nibabel.orientations`` (flips and axis permutations only, never interpolation); an oblique
file gets the *nearest* RAS+ voxel order and keeps its true (oblique) affine. Nothing is clamped or resampled
silently: unusual inputs raise :class:`~universal.errors.InputError` (with a sentence saying what to do) or warn
with :class:`~universal.errors.InputWarning`.

DICOM is read with pydicom (compressed transfer syntaxes through its pixel-data plugins; enhanced multi-frame CT
through its functional groups). :func:`load_volume` documents the decisions for inputs as clinics send them: a
damaged slice is refused naming the file; missing slices are interpolated on the series' own grid with a warning
naming the gap; several series: ``series=`` (UID or number) chooses, else the largest CT series with a warning; a
gantry tilt, mixed orientations / pixel spacings, non-CT modalities and colour pixels are refused; no
RescaleSlope/Intercept warns (values below 0, taken as HU) or is refused (raw values).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import secrets
import stat
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from universal.errors import InputError, InputWarning

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SourceInfo",
    "Volume",
    "case_name",
    "check_ct",
    "checked_volume",
    "json_float",
    "label_grid",
    "load_label",
    "load_volume",
    "save_label_map",
    "save_mask",
    "save_volume",
    "source_header",
    "to_json",
    "volume_from_array",
]

DEFAULT_MAX_BYTES = 2 * 1024**3
"""Largest file / folder / archive content / in-memory float32 array that a loader accepts (2 GiB)."""
MAX_ZIP_MEMBERS = 20_000
"""Most members a ``.zip`` may hold (zip-bomb guard)."""
MAX_DICOM_FILES = 20_000
"""Most files a DICOM folder (all sub-folders together) may hold."""
THICK_SLICE_MM = 6.0
"""Voxel spacing above which :func:`check_ct` warns about thick slices."""
FEW_SLICES = 8
"""Fewer voxels than this along an axis gives a warning (fewer than 2 is an error)."""
MAX_EXTENT_MM = 2500.0
"""Largest physical size (mm) of a CT along any voxel axis: a whole-body scan covers about 2 m, so a volume that
claims more (e.g. 64 voxels of 200 mm: 12.8 m) has a wrong voxel size in its header (cm or µm written as mm)."""
MAX_ZIP_RATIO = 100.0
"""Largest ratio of a ``.zip``'s uncompressed to compressed size (zip-bomb guard; DICOM compresses 2-10×), checked
from the archive's directory before anything is extracted, once the content exceeds :data:`ZIP_RATIO_FLOOR`."""
ZIP_RATIO_FLOOR = 64 * 1024**2
"""Uncompressed size (bytes) below which :data:`MAX_ZIP_RATIO` is not applied (a small archive is harmless)."""

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip")
LABEL_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_FORMATS = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
}
_FORMAT_TITLES = {
    "nifti": "NIfTI",
    "nrrd": "NRRD",
    "mha": "MetaImage",
    "dicom": "DICOM",
    "dicom-seg": "DICOM-SEG",
}
_PICTURES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF"}
_NON_IMAGE_MODALITIES = {
    "SEG",
    "RTSTRUCT",
    "RTPLAN",
    "RTRECORD",
    "RTDOSE",
    "SR",
    "PR",
    "KO",
    "REG",
    "DOC",
    "RWV",
}
_SUPPORTED_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), a DICOM folder or a .zip of DICOM files"
_RAS_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------- data classes
@dataclass(frozen=True, eq=False)
class SourceInfo:
    """Where a volume came from, so results can be written back on the file's own grid.

    Attributes:
        path: The file or folder read.
        format: ``"nifti"``, ``"nrrd"``, ``"mha"``, ``"dicom"``, ``"dicom-zip"`` or ``"array"``.
        original_affine: (4, 4) voxel → RAS+ mm affine of the file's own voxel order.
        original_shape: Shape of the array in the file's own voxel order.
        ornt: nibabel orientation transform (3, 2) from the file's voxel order to RAS+.
        meta: Small dict of non-identifying metadata (e.g. DICOM ``series_uid``, ``modality``, ``n_slices``,
            ``warnings``: the messages of the :class:`~universal.errors.InputWarning` issued while loading).
        headers: DICOM input: the header of each source instance of the series (pydicom Datasets without pixel
            data or private tags, :func:`source_header`), which the DICOM-SEG and RTSTRUCT writers reference
            (:mod:`universal.exports`); ``()`` for other formats. Identifying data: never written to reports.
    """

    path: str
    format: str
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    ornt: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    headers: tuple[Any, ...] = ()


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in Hounsfield units on a RAS+ voxel grid.

    Attributes:
        array: float32 array (X, Y, Z) in HU, RAS+ voxel order.
        affine: (4, 4) float64 voxel → world (RAS+, mm) affine.
        name: Case name (derived from the file name).
        source: Where it came from (``None`` for arrays made in memory already in RAS+ order).
        notes: The messages of the input checks the array passed (:func:`check_ct`'s warnings: thick slices,
            a voxel size assumed for lack of one in the header...), or ``None`` when it was never checked (a Volume
            built directly, or with ``check=False``): :meth:`universal.predictor.Predictor.predict` checks such a
            volume first (:func:`checked_volume`) and reports the notes in ``report.json`` ``"warnings"``.
    """

    array: np.ndarray
    affine: np.ndarray
    name: str = "volume"
    source: SourceInfo | None = None
    notes: tuple[str, ...] | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm, in array axis order."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid and source with another array (e.g. a mask or probabilities); it is not checked yet
        (``notes`` is ``None``)."""
        if tuple(array.shape[-3:]) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume grid {self.shape}")
        return replace(self, array=array, notes=None)

    def to_source_order(self, array: np.ndarray) -> np.ndarray:
        """Map an array on this RAS+ grid (shape ``(..., X, Y, Z)``) to the source file's own voxel order.

        Only flips and axis permutations of the last three axes (a view, no interpolation, no copy), so saving the
        result with ``source.original_affine`` reproduces the input file's grid exactly. Leading (channel) axes are
        kept. Without a source the array is returned unchanged.
        """
        arr = np.asarray(array)
        if arr.ndim < 3 or tuple(arr.shape[-3:]) != self.shape:
            raise ValueError(f"array shape {arr.shape} does not end with the volume grid {self.shape}")
        if self.source is None:
            return arr
        from nibabel.orientations import ornt_transform

        return _apply_ornt(arr, ornt_transform(_RAS_ORNT, self.source.ornt))

    def __repr__(self) -> str:
        fmt = self.source.format if self.source is not None else "array"
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        return f"Volume(name={self.name!r}, shape={self.shape}, spacing=({spacing}) mm, format={fmt!r})"


# ----------------------------------------------------------------------------------------------- public API
def volume_from_array(
    array: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
    name: str = "array",
    *,
    check: bool = True,
) -> Volume:
    """Wrap an (X, Y, Z) HU array as a :class:`Volume`, validated like a file (:func:`check_ct`).

    Args:
        array: (X, Y, Z) intensities in HU (any real dtype; kept without a copy when already float32).
        spacing: Voxel size in mm (used when ``affine`` is ``None``).
        affine: Optional (4, 4) voxel → RAS+ mm affine. If its axes are not RAS+ the array is reoriented
            (flips/permutations) and the original order is kept in ``source`` (format ``"array"``).
        name: Case name.
        check: Run :func:`check_ct` (errors for non-HU data, 2-D input...). ``False`` skips it.

    >>> v = volume_from_array(np.zeros((10, 10, 10), np.float32) - 1000, spacing=(2, 2, 3))
    >>> v.spacing
    (2.0, 2.0, 3.0)
    """
    arr = _check_pixel_type(np.asarray(array), name)
    shape = _check_shape(arr.shape, name)
    if arr.shape != shape:
        arr = arr.reshape(shape)
    aff = _array_affine(spacing, affine, name)
    ornt, oblique = _orientation(aff, name)
    if np.array_equal(ornt, _RAS_ORNT):
        vol = Volume(array=np.asarray(arr, dtype=np.float32), affine=aff, name=name)
    else:
        from nibabel.orientations import inv_ornt_aff

        source = SourceInfo(
            path="", format="array", original_affine=aff, original_shape=shape, ornt=ornt, meta={}
        )
        ras = np.ascontiguousarray(_apply_ornt(arr, ornt), dtype=np.float32)
        vol = Volume(array=ras, affine=aff @ inv_ornt_aff(ornt, shape), name=name, source=source)
    if check:
        msgs = [*oblique, *check_ct(vol.array, vol.spacing, name=name, warn=False)]
        _emit(msgs)
        if vol.source is not None:
            vol.source.meta["warnings"] = msgs
        vol = replace(vol, notes=tuple(msgs))
    return vol


def _check_pixel_type(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` when it holds one real grey value per voxel, else an :class:`InputError` (RGB, complex, objects)."""
    if arr.dtype.fields is not None or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(
            f"{name} has pixel type {arr.dtype} (e.g. RGB): a CT must be one grey value (HU) per voxel; "
            "convert it to a single-channel array first."
        )
    if np.iscomplexobj(arr):
        raise InputError(f"{name} is complex-valued; pass the real HU intensities.")
    return arr


def _array_affine(spacing: Any, affine: Any, name: str) -> np.ndarray:
    """The (4, 4) affine of :func:`volume_from_array`: ``affine`` (checked against ``spacing``) or ``diag(spacing)``."""
    if affine is None:
        sp = tuple(float(s) for s in spacing)
        if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
            raise InputError(f"{name}: invalid voxel spacing {spacing}; give three positive sizes in mm.")
        return np.diag([*sp, 1.0])
    aff = np.array(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {aff.shape}")
    if tuple(spacing) != (1.0, 1.0, 1.0) and not np.allclose(
        np.linalg.norm(aff[:3, :3], axis=0), spacing, atol=1e-4
    ):
        raise ValueError(f"spacing {spacing} disagrees with the affine's voxel sizes; give only one of them")
    return aff


def load_volume(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    series: str | None = None,
    rescale: tuple[float, float] | None = None,
) -> Volume:
    """Load a CT as a float32 HU :class:`Volume` on a RAS+ grid.

    Args:
        path: A ``.nii``/``.nii.gz`` (nibabel), ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` (SimpleITK) file, a folder
            holding a DICOM series (sub-folders are searched; RescaleSlope/Intercept applied) or a ``.zip`` of DICOM
            files (extracted safely into a temporary folder that is removed afterwards).
        max_bytes: Limit for the file / folder / archive content size and for the float32 array in memory.
        series: The DICOM series to load when a folder holds several: its SeriesInstanceUID or its SeriesNumber
            (default: the CT series with the most slices, with an :class:`~universal.errors.InputWarning` listing
            the others by UID, description, slice count and number). See "DICOM" below for what is refused.
        rescale: ``(slope, intercept)`` to apply to the stored values for files exported without a HU rescale (e.g.
            ``(1, -1024)``); when given, the "not Hounsfield units" check is skipped (you vouch for the values).

    Raises:
        InputError: missing/empty/corrupt/too large file, unsupported type, picture, 2-D, RGB, 4-D, single slice,
            intensities that are not HU, no DICOM in a folder, unknown ``series``, sheared voxel axes.

    DICOM (read with pydicom; compressed transfer syntaxes through its pixel-data plugins, see requirements.txt):
    classic single-frame slices or enhanced multi-frame files (positions, orientation, spacing and rescale from
    the per-frame functional groups; such a file may also be passed by itself). Each slice gets its own
    RescaleSlope/Intercept. Decisions, so that a result never lies on a silently different grid:

    - a damaged file (unreadable header or pixel data): refused, naming the file (delete it to read the rest);
    - missing slices (an uneven gap of up to :data:`MAX_MISSING_SLICES` slices): the volume keeps the series' own
      even grid and the missing slices are linearly interpolated, with a warning naming the gap (positions,
      files, expected spacing) and ``meta["interpolated_slices"]``; a larger gap is refused;
    - drifting positions: resampled onto an even grid, with a warning; slices that the interpolation would leave
      out (a 1 mm stretch in a 2 mm series: two reconstructions) are refused, naming how many;
    - several series: ``series=`` chooses; without it the CT series with the most slices, with a warning;
    - refused: a gantry tilt (slices stacked more than :data:`MAX_TILT_DEG` degrees off their normal: a sheared
      grid), mixed image sizes, orientations or pixel spacings within the series (naming two files), two slices at
      one position, no ImagePositionPatient, a modality other than CT (Modality tag), colour (RGB) pixels, a
      transfer syntax no installed plugin decodes (naming the package to install);
    - no RescaleSlope/RescaleIntercept (HU unknown): a warning when the stored values go below 0 (signed, stored
      as HU), else refused (raw scanner values; pass ``rescale=``). LOCALIZER images are left out with a warning.

    >>> vol = load_volume("ct.nii.gz")  # doctest: +SKIP
    >>> vol.array.dtype, vol.source.format  # doctest: +SKIP
    (dtype('float32'), 'nifti')
    """
    p = Path(path)
    name = case_name(p)
    if not p.exists():
        _check_broken_link(p)
        raise InputError(f"{p} does not exist: check the path (expected {_SUPPORTED_TEXT}).")
    dicom = {"name": name, "max_bytes": max_bytes, "series": series, "rescale": rescale}
    if p.is_dir():
        return _load_dicom_dir(p, p, fmt="dicom", **dicom)
    if _is_multiframe_dicom(p):  # one enhanced multi-frame file holds a whole series
        return _load_dicom_dir(p, p, fmt="dicom", **dicom)
    suffix = _check_volume_file(p, max_bytes)
    if suffix == ".zip":
        with tempfile.TemporaryDirectory(prefix="universal-dicom-zip-") as tmp:
            n_files = _extract_zip(p, Path(tmp), max_bytes)
            return _load_dicom_dir(Path(tmp), p, fmt="dicom-zip", n_files=n_files, **dicom)
    fmt = _FORMATS[suffix]
    if fmt == "nifti":
        raw, affine, slope, inter, meta = _read_nifti(p, max_bytes)
        return _finish(raw, affine, p, fmt, name, meta, slope=slope, inter=inter, rescale=rescale, owned=True)
    img = _read_sitk(p, fmt, max_bytes)
    raw, affine = _sitk_to_numpy(img)
    notes = _nrrd_notes(p, img) if fmt == "nrrd" else []
    return _finish(raw, affine, p, fmt, name, {"_warnings": notes}, rescale=rescale, owned=False)


def _check_volume_file(p: Path, max_bytes: int) -> str:
    """The suffix of a CT file that :func:`load_volume` can read, or an :class:`InputError` saying why not."""
    size = _file_size(p)
    suffix = _suffix(p)
    if suffix == ".dcm":
        _single_dicom_error(p)
    _check_picture(p, suffix, size)
    if suffix not in _FORMATS and suffix != ".zip":
        raise InputError(
            f"{p.name}: unsupported file type {suffix or '(no extension)'!r}; supported are {_SUPPORTED_TEXT}."
        )
    _check_bytes(size, max_bytes, p.name)
    return suffix


def load_label(
    path: str | os.PathLike[str],
    like: Volume | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    role: str | None = None,
) -> np.ndarray:
    """Load a label map (integer array, X, Y, Z) on ``like``'s RAS+ grid (or on its own RAS+ grid).

    The file (NIfTI, NRRD, MHA or a DICOM-SEG ``.dcm``; segment numbers become label values) is reoriented to RAS+.
    If its grid equals ``like``'s (shape, and affine within 1e-3 mm) it is returned as is; if it differs by a
    whole-voxel offset it is cropped/padded exactly (with an :class:`~universal.errors.InputWarning` saying so
    when ``role`` names what the file is, e.g. ``"prediction"``: a score must not rest on a silent zero-padding);
    otherwise it is resampled nearest-neighbour through the affines (world coordinates) with a warning.

    Raises:
        InputError: unreadable file, not 3-D, non-integer values, or no overlap with ``like``'s field of view.
    """
    p = Path(path)
    lab, affine = _read_label_ras(p, max_bytes)
    if like is None:
        return lab
    note = None if role is None else f"the {role} {p.name}"
    return _label_onto(lab, affine, like, case_name(p), shift_note=note)


def label_grid(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> Volume:
    """A label file's own RAS+ grid as a :class:`Volume` (no HU checks).

    Its ``array`` holds the label values as float32 (not HU); ``source`` lets masks on this grid be written back
    onto the label file's grid with :func:`save_mask`. Useful when only labels exist (evaluation).
    """
    p = Path(path)
    raw, affine, fmt, meta = _read_label_raw(p, max_bytes)
    vol = _finish(raw, affine, p, fmt, case_name(p), meta, owned=True, check=False)
    return vol


def save_mask(mask: np.ndarray, like: Volume, path: str | os.PathLike[str], dtype: Any = np.uint8) -> Path:
    """Write a mask on ``like``'s RAS+ grid to a NIfTI file on the source's original grid and affine (atomic).

    Args:
        mask: (X, Y, Z) array on ``like``'s grid (bool or integer; values must fit ``dtype`` exactly).
        like: The volume the mask belongs to (its ``source`` gives the original voxel order and affine).
        path: Output file: ``.nii.gz`` (or ``.nii``; ``.nrrd``/``.mha`` are written with SimpleITK).
        dtype: Stored integer type.

    Returns:
        The path written.
    """
    arr = np.asarray(mask)
    if arr.shape != like.shape:
        raise ValueError(f"mask shape {arr.shape} does not match the volume grid {like.shape}")
    data = _cast_exact(arr, np.dtype(dtype), "mask")
    return _write_image(like.to_source_order(data), _source_affine(like), Path(path), like)


def save_label_map(label_map: np.ndarray, like: Volume, path: str | os.PathLike[str]) -> Path:
    """:func:`save_mask` for a label map: stored as uint8 when the values fit 0..255, else int16 (or int32)."""
    arr = np.asarray(label_map)
    if arr.dtype.kind not in "biu":
        raise ValueError(f"a label map must hold integers, got {arr.dtype}")
    return save_mask(arr, like, path, dtype=_int_dtype_for(arr))


def save_volume(volume: Volume, path: str | os.PathLike[str], dtype: Any = None) -> Path:
    """Write a volume (HU) to a file on its source's original grid and affine (atomic).

    Args:
        volume: The volume.
        path: ``.nii.gz``/``.nii`` (or ``.nrrd``/``.mha``).
        dtype: ``None`` → int16 when every value is an integer in the int16 range, else float32;
            ``np.int16`` rounds to the nearest integer (values outside int16 raise); ``np.float32`` keeps values.
    """
    arr = volume.array
    if dtype is None:
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        exact = -32768 <= lo and hi <= 32767 and bool(np.all(np.mod(arr, 1) == 0))
        dtype = np.int16 if exact else np.float32
    dt = np.dtype(dtype)
    data = _cast_exact(np.rint(arr) if dt.kind in "iu" else arr, dt, "volume")
    return _write_image(volume.to_source_order(data), _source_affine(volume), Path(path), volume)


def check_ct(
    array: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    name: str = "volume",
    modality: str | None = None,
    check_hu: bool = True,
    warn: bool = True,
) -> list[str]:
    """Validate a CT array; raise :class:`~universal.errors.InputError` or return (and warn) warning messages.

    Errors: not 3-D (2-D, 4-D/RGB), an axis with fewer than 2 voxels, invalid spacing, a physical size over
    :data:`MAX_EXTENT_MM` along an axis (a wrong voxel size in the header), NaN/inf values, and (with
    ``check_hu``) intensities that are not Hounsfield units: a 0–255 range (8-bit picture, mask, normalised data),
    non-negative values beyond 255 (raw scanner values without RescaleSlope/Intercept) or a range narrower than
    50 (normalised/standardised). Warnings (:class:`~universal.errors.InputWarning`): fewer than
    :data:`FEW_SLICES` voxels along an axis, spacing above :data:`THICK_SLICE_MM`, a constant image, a modality
    other than CT.

    Args:
        array: Intensities, (X, Y, Z).
        spacing: Voxel size in mm, array axis order.
        name: Used in messages.
        modality: DICOM modality if known (``"CT"``...).
        check_hu: Run the Hounsfield-unit checks.
        warn: Also issue the warnings (else only return them).

    Returns:
        The warning messages.
    """
    arr = np.asarray(array)
    shape = _check_shape(arr.shape, name)
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(
            f"{name}: invalid voxel spacing {spacing} mm; the file's geometry is damaged, re-export it."
        )
    _check_extent(shape, sp, name)
    msgs = _acquisition_warnings(shape, sp, name, modality)
    if arr.size:
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError(
                f"{name} contains NaN or infinite values: the file is damaged or came from a failed computation; "
                "re-export the CT."
            )
        if lo == hi:
            msgs.append(f"{name} has the same value ({lo:g}) in every voxel: an empty image?")
        elif check_hu:
            _check_hu(lo, hi, name)
    if warn:
        _emit(msgs)
    return msgs


def checked_volume(volume: Any) -> Volume:
    """``volume`` as a :class:`Volume` that passed the input checks, checked now unless it already was.

    A volume read by :func:`load_volume` or made by :func:`volume_from_array` was checked then (its ``notes`` are
    not ``None``) and is returned as it is, without a second pass over the array. Anything else -- a ``Volume``
    built directly, one made with ``check=False``, an object with ``array`` and ``affine`` -- is checked like a file
    (:func:`check_ct`: pixel type, 3-D, spacing, physical size, NaN/inf, Hounsfield units; a degenerate affine; an
    array that is not in RAS+ voxel order) and returned as a ``Volume`` sharing its array (no copy), with the
    warnings in ``notes`` (also issued as :class:`~universal.errors.InputWarning`).

    Raises:
        InputError: what :func:`check_ct` refuses, a damaged or sheared affine, or an array that is not RAS+.
    """
    if isinstance(volume, Volume) and volume.notes is not None:
        return volume
    name = str(getattr(volume, "name", "volume"))
    arr = _check_pixel_type(np.asarray(volume.array), name)
    aff = np.asarray(volume.affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise InputError(f"{name}: the affine must be a (4, 4) voxel -> world matrix, got shape {aff.shape}.")
    shape = _check_shape(arr.shape, name)
    if arr.shape != shape:
        arr = arr.reshape(shape)
    ornt, oblique = _orientation(aff, name)
    if not np.array_equal(ornt, _RAS_ORNT):
        from nibabel.orientations import ornt2axcodes

        raise InputError(
            f"{name}: the array is in {''.join(ornt2axcodes(ornt))} voxel order, not RAS+ (the order the model "
            "reads): build the volume with universal.io.volume_from_array(array, affine=affine), which reorients it."
        )
    spacing = tuple(float(s) for s in np.linalg.norm(aff[:3, :3], axis=0))
    msgs = [*oblique, *check_ct(arr, spacing, name=name, warn=False)]
    _emit(msgs)
    return Volume(array=arr, affine=aff, name=name, source=getattr(volume, "source", None), notes=tuple(msgs))


def _check_extent(shape: tuple[int, int, int], sp: tuple[float, ...], name: str) -> None:
    """An :class:`InputError` when the volume claims to be larger than :data:`MAX_EXTENT_MM` along an axis."""
    extent = [n * s for n, s in zip(shape, sp)]
    if max(extent) > MAX_EXTENT_MM:
        size = " x ".join(f"{e / 1000:.3g}" for e in extent)
        raise InputError(
            f"{name} claims to be {size} m across (shape {shape}, voxel spacing {_fmt_spacing(sp)} mm): no CT "
            f"covers more than {MAX_EXTENT_MM / 1000:g} m, so the voxel size in the header is wrong (cm or µm "
            "written as mm?); fix the header's spacing (pixdim) or export the scan again."
        )


def _acquisition_warnings(
    shape: tuple[int, int, int], sp: tuple[float, ...], name: str, modality: str | None
) -> list[str]:
    """Warnings of :func:`check_ct` about the modality, very few voxels along an axis and thick slices."""
    msgs: list[str] = []
    if modality and modality.upper() != "CT":
        msgs.append(
            f"{name} is modality {modality}, not CT: the model segments CT in Hounsfield units, "
            "so results on other modalities are meaningless."
        )
    few = [(ax, n) for ax, n in enumerate(shape) if n < FEW_SLICES]
    if few:
        desc = ", ".join(f"{n} along axis {ax}" for ax, n in few)
        msgs.append(
            f"{name} has very few voxels ({desc}; shape {shape}); expect poor results near the edges."
        )
    thick = max(sp)
    if thick > THICK_SLICE_MM:
        msgs.append(
            f"{name} has {thick:.1f} mm thick slices (spacing {_fmt_spacing(sp)} mm); the model works at 1.5 mm, "
            "so small structures will be coarse. Use a thinner reconstruction if there is one."
        )
    return msgs


def case_name(path: str | os.PathLike[str]) -> str:
    """Case name of a path: the file name without its known extension (``.nii.gz`` stripped fully), or the folder name.

    >>> case_name("/data/case_001.nii.gz"), case_name("scan.v2.nrrd"), case_name("/data/patient7/")
    ('case_001', 'scan.v2', 'patient7')
    """
    p = Path(path)
    n = p.name or Path(os.path.abspath(p)).name
    low = n.lower()
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip", ".dcm"):
        if low.endswith(ext) and len(n) > len(ext):
            return n[: -len(ext)]
    return n


# ----------------------------------------------------------------------------------------------- checks
def _check_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    """Squeeze trailing singleton axes beyond the third; raise for 2-D, 4-D/RGB and single-slice shapes."""
    shp = tuple(int(s) for s in shape)
    while len(shp) > 3 and shp[-1] == 1:
        shp = shp[:-1]
    if len(shp) < 3:
        raise InputError(
            f"{name} is {len(shp)}-D (shape {shp}), a single image, not a CT volume: pass the whole 3-D scan "
            "(a NIfTI/NRRD volume, or the folder / .zip holding all DICOM slices of the series)."
        )
    if len(shp) > 3:
        raise InputError(
            f"{name} is {len(shp)}-D (shape {shp}): an RGB/colour image, a time series or a multi-channel image, "
            "not one CT volume; export a single 3-D grey-value CT in HU (e.g. one phase)."
        )
    flat = [ax for ax, n in enumerate(shp) if n < 2]
    if flat:
        raise InputError(
            f"{name} has a single slice along axis {flat[0]} (shape {shp}); a CT volume needs at least 2 slices "
            "in every direction: pass the whole series, not one slice."
        )
    return shp  # type: ignore[return-value]


def _check_hu(lo: float, hi: float, name: str) -> None:
    hint = "or pass rescale=(slope, intercept) to load_volume (or convert the array) if you know how the values map to HU"
    if lo >= 0 and hi <= 255:
        raise InputError(
            f"{name}: intensities span {lo:g} to {hi:g}, which looks like an 8-bit picture, a mask or normalised "
            f"data, not Hounsfield units (CT air is about -1000 HU); load the original CT in HU, {hint}."
        )
    if lo >= 0:
        raise InputError(
            f"{name}: intensities span {lo:g} to {hi:g} with nothing below 0 (no air at -1000 HU): this looks like "
            "raw scanner values, not Hounsfield units; export with RescaleSlope/Intercept applied, "
            f"{hint} (often rescale=(1, -1024))."
        )
    if hi - lo < 50:
        raise InputError(
            f"{name}: intensities span only {lo:g} to {hi:g}: this looks normalised or standardised, not "
            f"Hounsfield units; load the original CT in HU, {hint}."
        )


def _check_bytes(n: int, max_bytes: int, what: str, kind: str = "") -> None:
    if n > max_bytes:
        raise InputError(
            f"{what}{kind} is {_fmt_bytes(n)}, over the limit of {_fmt_bytes(max_bytes)}: crop or downsample the "
            "scan, or pass a larger max_bytes= to load_volume if this machine has the memory."
        )


def _check_broken_link(p: Path) -> None:
    """An :class:`InputError` naming the missing target when ``p`` is a symbolic link to nothing."""
    if p.is_symlink():
        raise InputError(
            f"{p} is a symbolic link to {os.readlink(p)!r}, which does not exist (a moved or unmounted file?): "
            "point the link at the file, or pass the file itself."
        )


def _file_size(p: Path) -> int:
    size = p.stat().st_size
    if size == 0:
        raise InputError(
            f"{p.name} is empty (0 bytes): the download or export did not finish; export the file again."
        )
    return size


def _check_picture(p: Path, suffix: str, size: int) -> None:
    kind = None
    if suffix in _PICTURES:
        kind = suffix[1:].upper()
    else:
        with open(p, "rb") as fh:
            head = fh.read(8)
        kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    if kind is not None:
        raise InputError(
            f"{p.name} is a {kind} picture (2-D, 8-bit), not a CT volume in Hounsfield units: export the scan as "
            f"{_SUPPORTED_TEXT}."
        )


def _single_dicom_error(p: Path) -> None:
    modality = ""
    with contextlib.suppress(Exception):
        import pydicom

        modality = str(
            pydicom.dcmread(str(p), stop_before_pixels=True, force=True).get("Modality", "")
        ).strip()
    if modality == "SEG":
        raise InputError(
            f"{p.name} is a DICOM-SEG segmentation, not a CT: read it with load_label(path, like=ct)."
        )
    raise InputError(
        f"{p.name} is a single DICOM file (one slice): pass the folder that holds all slices of the series "
        f"(e.g. {str(p.parent)!r}) or a .zip of it."
    )


def _emit(msgs: list[str]) -> None:
    """Issue InputWarnings attributed to the first caller outside this module."""
    if not msgs:
        return
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    for m in msgs:
        warnings.warn(m, InputWarning, stacklevel=level)


# ----------------------------------------------------------------------------------------------- orientation
def _orientation(affine: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    """nibabel orientation transform (file voxel order → RAS+) and warnings for oblique axes.

    Raises:
        InputError: a non-finite or degenerate matrix, or sheared axes (columns not perpendicular, |UᵀU − I| >
            1e-3 for the unit columns U), which ITK refuses as well.
    """
    from nibabel.orientations import io_orientation

    rzs = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(rzs)) < 1e-12:
        raise InputError(
            f"{name} has an invalid (degenerate) orientation matrix; the file's geometry is damaged: re-export it."
        )
    unit = rzs / np.linalg.norm(rzs, axis=0)
    shear = float(np.abs(unit.T @ unit - np.eye(3)).max())
    if shear > 1e-3:  # a sheared (non-orthogonal) grid: ITK refuses it too; resampling would treat it as straight
        off = float(np.degrees(np.arcsin(min(shear, 1.0))))
        raise InputError(
            f"{name} has sheared voxel axes (not perpendicular: up to {off:.1f}° off a right angle), which this tool "
            "does not resample (like ITK, it needs an orthogonal grid): resample the file to an orthogonal grid "
            "(e.g. 3D Slicer's Resample Scalar Volume, or nibabel.processing.resample_to_output) and load that."
        )
    ornt = io_orientation(affine)
    cos = np.abs(unit).max(axis=0)
    angle = float(np.degrees(np.arccos(np.clip(cos.min(), -1.0, 1.0))))
    msgs = []
    if angle > 0.1:
        msgs.append(
            f"{name} has oblique voxel axes (up to {angle:.1f}° from the patient axes); the array uses the "
            "nearest RAS+ voxel order and the affine keeps the true geometry (results go back on the original grid)."
        )
    return ornt, msgs


def _apply_ornt(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """``nibabel.orientations.apply_orientation`` on the *last three* axes (views only)."""
    lead = arr.ndim - 3
    out = arr
    for ax, flip in enumerate(ornt[:, 1]):
        if flip == -1:
            out = np.flip(out, axis=lead + ax)
    perm = np.argsort(ornt[:, 0]) + lead
    return out.transpose(*range(lead), *perm.tolist())


def _finish(
    raw: np.ndarray,
    affine: np.ndarray,
    path: Path,
    fmt: str,
    name: str,
    meta: dict[str, Any],
    *,
    slope: float = 1.0,
    inter: float = 0.0,
    rescale: tuple[float, float] | None = None,
    owned: bool,
    check: bool = True,
    modality: str | None = None,
) -> Volume:
    """File-order array + file affine → RAS+ float32 :class:`Volume` (one copy at most), checked."""
    from nibabel.orientations import inv_ornt_aff

    ornt, msgs = _orientation(affine, name)
    ras = _apply_ornt(raw, ornt)
    # one pass: reorder + convert to float32 C-contiguous; a view into a foreign buffer (SimpleITK) is always copied
    arr = np.ascontiguousarray(ras, dtype=np.float32) if owned else np.array(ras, dtype=np.float32, order="C")
    if slope != 1.0:
        arr *= np.float32(slope)
    if inter != 0.0:
        arr += np.float32(inter)
    if rescale is not None:
        s, i = (float(v) for v in rescale)
        if s != 1.0:
            arr *= np.float32(s)
        if i != 0.0:
            arr += np.float32(i)
    ras_affine = affine @ inv_ornt_aff(ornt, raw.shape)
    if check:
        spacing = tuple(float(s) for s in np.linalg.norm(ras_affine[:3, :3], axis=0))
        msgs = [
            *meta.pop("_warnings", []),
            *msgs,
            *check_ct(arr, spacing, name=name, modality=modality, check_hu=rescale is None, warn=False),
        ]
        _emit(msgs)
        meta["warnings"] = msgs
    meta.pop("_warnings", None)
    source = SourceInfo(
        path=str(path),
        format=fmt,
        original_affine=np.asarray(affine, dtype=np.float64),
        original_shape=tuple(int(s) for s in raw.shape),  # type: ignore[arg-type]
        ornt=ornt,
        meta=meta,
        headers=meta.pop("_headers", ()),
    )
    notes = tuple(msgs) if check else None
    return Volume(array=arr, affine=ras_affine, name=name, source=source, notes=notes)


# ----------------------------------------------------------------------------------------------- readers
def _suffix(p: Path) -> str:
    low = p.name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else p.suffix.lower()


def _reason(exc: BaseException) -> str:
    """A one-line reason from an exception (ITK/SimpleITK messages stripped of source locations)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Exception thrown in"):
        lines = lines[1:]
    text = " ".join(lines) or type(exc).__name__
    text = re.sub(r"^(?:sitk::ERROR:|ITK ERROR:|itk::ERROR:)\s*(?:\w+\(0x[0-9a-f]+\):\s*)?", "", text)
    return text[:300]


def _read_error(p: Path, fmt: str, exc: BaseException) -> InputError:
    title = _FORMAT_TITLES.get(fmt, fmt)
    return InputError(
        f"{p.name} could not be read as {title}: {_reason(exc)}. The file is probably truncated or not really "
        f"{title}: download or export it again."
    )


def _read_nifti(p: Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray, float, float, dict[str, Any]]:
    """File-order unscaled array, affine, scl_slope/inter, header codes."""
    import nibabel as nib
    from nibabel.imageglobals import LoggingOutputSuppressor

    try:
        with LoggingOutputSuppressor():  # nibabel logs its header fixes (zero pixdim); _nifti_notes says them
            img = nib.load(str(p))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise ValueError(f"not a NIfTI image ({type(img).__name__})")
        dtype = img.get_data_dtype()
    except Exception as exc:
        raise _read_error(p, "nifti", exc) from exc
    if dtype.fields is not None:
        raise InputError(
            f"{p.name} stores RGB/colour voxels ({dtype}): a CT must hold one grey value (HU) per voxel; "
            "export the original CT, not a rendered picture."
        )
    if dtype.kind == "c":
        raise InputError(f"{p.name} is complex-valued: export the real HU intensities.")
    shape = _check_shape(img.shape, p.name)
    _check_bytes(int(np.prod(shape)) * 4, max_bytes, p.name, " as float32 in memory")
    try:
        raw = np.asarray(img.dataobj.get_unscaled()).reshape(shape)
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    except Exception as exc:
        raise _read_error(p, "nifti", exc) from exc
    hdr = img.header
    meta: dict[str, Any] = {"qform_code": int(hdr["qform_code"]), "sform_code": int(hdr["sform_code"])}
    if slope != 1.0 or inter != 0.0:
        meta["rescale"] = (slope, inter)
    affine, notes = _nifti_geometry(p, img, meta)
    notes = [*_nifti_notes(p, img), *notes]
    if notes:
        meta["_warnings"] = notes
    return raw, affine, slope, inter, meta


NIFTI_UNITS_MM = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 1e-3}
"""Millimetres per unit of a NIfTI header's spatial ``xyzt_units`` (unknown: mm, as NIfTI readers assume)."""


def _nifti_geometry(p: Path, img: Any, meta: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """The image's affine in mm (scaled by the header's spatial unit: metres and microns become mm) and a warning
    when the qform and sform (both coded) disagree by more than 1e-3 mm; the sform is used, as nibabel and ITK do.
    When both are coded, the qform (in mm) is kept as ``meta["qform"]`` so that masks written back carry it."""
    hdr = img.header
    scale = NIFTI_UNITS_MM.get(hdr.get_xyzt_units()[0], 1.0)
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    affine[:3] *= scale
    if meta["qform_code"] == 0 or meta["sform_code"] == 0:
        return affine, []
    qform = np.asarray(hdr.get_qform(), dtype=np.float64).copy()
    qform[:3] *= scale
    meta["qform"] = qform.tolist()
    diff = float(np.abs(qform - affine).max())
    if diff <= 1e-3:
        return affine, []
    return affine, [
        f"{p.name}: the header's qform and sform disagree (by up to {diff:.3g} mm in the voxel-to-patient "
        "matrix): read with the sform, as nibabel and ITK do (a qform-only viewer places the CT elsewhere); check "
        "that the orientation and position are right, and fix the header (nibabel set_qform) if not."
    ]


def _nifti_notes(p: Path, img: Any) -> list[str]:
    """Warnings about what a NIfTI header leaves out: no voxel size (pixdim 0, which nibabel silently reads as
    1 mm) and no orientation (qform and sform codes 0). An sform gives both, so it silences both."""
    hdr = img.header
    if int(hdr["sform_code"]) > 0:
        return []
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(p)) as fh:  # the header as stored, before nibabel's fixes
            stored = type(hdr).from_fileobj(fh, check=False)
        pixdim = [float(v) for v in stored["pixdim"][1:4]]
    except Exception:  # the header was read once already; nothing more to say
        return []
    msgs = []
    missing = [ax for ax, v in enumerate(pixdim[: len(img.shape)]) if not (math.isfinite(v) and v != 0)]
    if missing:
        axes = ", ".join(str(ax) for ax in missing)
        msgs.append(
            f"{p.name}: the header gives no voxel size along axis {axes} (pixdim {_fmt_spacing(pixdim)}, no "
            "sform): assumed 1 mm there, so the resampling and the volumes in mL rest on this guess; set the "
            "real spacing in the header (pixdim or sform) and run again."
        )
    if int(hdr["qform_code"]) == 0:
        msgs.append(
            f"{p.name}: the header has no orientation (qform_code and sform_code are 0): read with NIfTI's "
            "ANALYZE fallback (first axis from right to left), so left and right may be swapped; set the "
            "header's qform or sform if you know the orientation."
        )
    return msgs


def _detached_data_file(p: Path) -> tuple[str, Path] | None:
    """``(the header's text naming it, its path)`` of the voxel data file that a detached header (``.mhd``:
    ``ElementDataFile``; ``.nhdr``: ``data file``) points to, or ``None`` (data inside, a list or a pattern)."""
    suffix = _suffix(p)
    if suffix not in (".mhd", ".nhdr"):
        return None
    with open(p, "rb") as fh:
        head = fh.read(65536).decode("latin-1")
    pattern = r"^\s*ElementDataFile\s*=\s*(.+?)\s*$" if suffix == ".mhd" else r"^\s*data ?file\s*:\s*(.+?)\s*$"
    match = re.search(pattern, head, re.M | re.I)
    if match is None:
        return None
    value = match.group(1)
    if value.upper() == "LOCAL" or value.upper().startswith("LIST") or "%" in value:
        return None
    target = Path(value)
    return value, target if target.is_absolute() else p.parent / target


def _check_data_file(p: Path, fmt: str) -> None:
    """An :class:`InputError` naming the data file of a detached header when it is missing or empty."""
    found = _detached_data_file(p)
    if found is None:
        return
    value, data = found
    title = _FORMAT_TITLES.get(fmt, fmt)
    if not data.is_file():
        raise InputError(
            f"{p.name} is a {title} header whose voxel data is in the separate file {value!r}, which does not exist "
            f"({data}): copy {data.name} next to {p.name}, or pass a single-file image (.mha, .nrrd, .nii.gz)."
        )
    if data.stat().st_size == 0:
        raise InputError(
            f"{data.name}, the voxel data of {p.name}, is empty (0 bytes): copy or export it again."
        )


def _read_sitk(p: Path, fmt: str, max_bytes: int) -> Any:
    import SimpleITK as sitk

    _check_data_file(p, fmt)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except Exception as exc:
        raise _read_error(p, fmt, exc) from exc
    ncomp = reader.GetNumberOfComponents()
    if ncomp > 1:
        raise InputError(
            f"{p.name} has {ncomp} values per voxel (an RGB/vector image): a CT must hold one grey value (HU) per "
            "voxel; export the original CT, not a rendered picture."
        )
    shape = _check_shape(tuple(reader.GetSize()), p.name)
    _check_bytes(int(np.prod(shape)) * 4, max_bytes, p.name, " as float32 in memory")
    try:
        with _quiet_itk():
            return reader.Execute()
    except Exception as exc:
        raise _read_error(p, fmt, exc) from exc


_NRRD_PATIENT_SPACES = ("left-posterior-superior", "right-anterior-superior", "left-anterior-superior")


def _nrrd_notes(p: Path, img: Any) -> list[str]:
    """A warning when a NRRD header names no patient axes (``space`` missing, or ``scanner-xyz``,
    ``3D-right-handed``...), which ITK reads as LPS: like a NIfTI without orientation."""
    key = "NRRD_space"  # ITK's NRRD reader gives the patient spaces as left-posterior-superior
    space = img.GetMetaData(key) if img.HasMetaDataKey(key) else ""
    if space.removesuffix("-time") in _NRRD_PATIENT_SPACES:
        return []
    said = f"space {space!r}" if space else "no space field"
    return [
        f"{p.name}: the NRRD header gives no patient orientation ({said}): read as left-posterior-superior "
        "(ITK's convention), so left and right may be swapped; set the header's space to left-posterior-superior "
        "(or right-anterior-superior) if you know the orientation."
    ]


def _sitk_to_numpy(img: Any) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image → (file-order (i, j, k) view into its buffer, RAS+ affine). Keep ``img`` alive meanwhile."""
    import SimpleITK as sitk

    dim = img.GetDimension()
    arr = sitk.GetArrayViewFromImage(img)  # (..., k, j, i)
    if dim == 4:  # (1, k, j, i): a trailing singleton 4th dimension (checked by _check_shape)
        arr = arr[0]
    arr = arr.transpose(2, 1, 0)
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.array(img.GetSpacing(), dtype=np.float64)[:3]
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = np.array(img.GetOrigin(), dtype=np.float64)[:3]
    return arr, _LPS_TO_RAS @ lps


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's stderr warnings (we report what matters as InputWarning)."""
    import SimpleITK as sitk

    old = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(old)


# ----------------------------------------------------------------------------------------------- DICOM
UNIFORM_GAP_TOLERANCE = 0.05
"""Slice gaps within this fraction of the series' spacing count as even (scanners round positions)."""
MAX_MISSING_SLICES = 4
"""Most consecutive missing slices a DICOM series may lack and still be filled by interpolation (more: an error)."""
MAX_TILT_DEG = 0.5
"""Largest angle (degrees) between the slice stacking direction and the slices' normal (a gantry tilt) accepted."""
_LOSSY_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                   "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}  # fmt: skip
_JPEG = "python-gdcm (or: pip install pylibjpeg pylibjpeg-libjpeg)"
_J2K = "pylibjpeg pylibjpeg-openjpeg (or: pip install python-gdcm)"
_DECODER_PACKAGES = {
    **dict.fromkeys(["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                     "1.2.840.10008.1.2.4.70"], _JPEG),  # fmt: skip
    **dict.fromkeys(["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"], "python-gdcm (or: pip install pyjpegls)"),
    **dict.fromkeys(["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                     "1.2.840.10008.1.2.4.93"], _J2K),  # fmt: skip
    **dict.fromkeys(["1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"],
                    "pylibjpeg pylibjpeg-openjpeg"),  # fmt: skip
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}
"""Transfer syntax → the packages (``pip install ...``) that give pydicom a decoder for it."""
_IMAGE_SOP_CLASSES = {f"1.2.840.10008.5.1.4.1.1.{s}" for s in ("2", "2.1", "2.2", "4", "4.1", "128", "130", "7")}
"""SOP classes of images (CT, enhanced / legacy converted CT, MR, enhanced MR, PET, secondary capture)."""
_GEOMETRY_TAGS = (("pos", "ImagePositionPatient"), ("iop", "ImageOrientationPatient"), ("spacing", "PixelSpacing"))


@dataclass(eq=False)
class _DicomFile:
    """What the series scan keeps of one DICOM image file (header only; pixels are decoded later)."""

    path: str
    shown: str
    uid: str
    number: int | None
    modality: str
    description: str
    study: str
    rows: int
    cols: int
    samples: int
    photometric: str
    syntax: str
    sop_class: str
    localizer: bool
    lossy: bool
    tilt: float
    frames: list[dict[str, Any]]  # per frame: pos (3,) | None, iop (6,) | None, spacing (2,) | None, rescale | None
    header: Any = None  # source_header() of the file, kept by _decode (the DICOM writers reference it)


@dataclass(eq=False)
class _DicomSeries:
    """One DICOM series (files sharing SeriesInstanceUID) of a folder."""

    uid: str
    number: int | None
    modality: str
    description: str
    files: list[_DicomFile]

    @property
    def n(self) -> int:
        return sum(len(f.frames) for f in self.files)

    def info(self) -> dict[str, Any]:
        return {"uid": self.uid, "number": self.number, "modality": self.modality,
                "description": self.description, "n_slices": self.n}  # fmt: skip


def _dicom_series(root: Path, display: str) -> tuple[list[_DicomSeries], list[_DicomSeries], int]:
    """(image series, non-image series, number of files) under ``root`` (a folder, sub-folders included, or one
    file); a damaged DICOM file is an :class:`InputError` naming it (never silently left out of a series)."""
    paths: list[Path] = []
    if root.is_file():
        paths = [root]
    else:
        for base, dirs, files in os.walk(root):
            dirs.sort()
            paths += [Path(base) / f for f in sorted(files) if not f.startswith(".")]
            if len(paths) > MAX_DICOM_FILES:
                raise InputError(
                    f"{display} holds more than {MAX_DICOM_FILES} files: pass the folder of a single DICOM series."
                )
    images: dict[tuple[str, ...], _DicomSeries] = {}
    others: dict[tuple[str, ...], _DicomSeries] = {}
    with _quiet_pydicom():
        for path in paths:
            shown = _shown_name(path, root)
            ds, damaged = _read_dicom_header(path)
            if damaged:
                raise _damaged(display, shown, damaged)
            if ds is None:
                continue  # not DICOM (a readme, a thumbnail...)
            try:
                entry = _dicom_file(ds, str(path), shown)
            except Exception as exc:  # a header whose values do not parse
                raise _damaged(display, shown, _reason(exc)) from exc
            image = entry.rows > 0 and entry.modality not in _NON_IMAGE_MODALITIES
            claims_image = entry.sop_class in _IMAGE_SOP_CLASSES or (
                entry.modality != "" and entry.modality not in _NON_IMAGE_MODALITIES
            )
            if entry.rows == 0 and claims_image:
                raise _damaged(display, shown, "an image file without Rows/Columns")
            key = (entry.uid,) if entry.uid else ("", entry.study, str(entry.number))
            group = images if image else others
            if key not in group:
                group[key] = _DicomSeries(entry.uid, entry.number, entry.modality, entry.description, [])
            group[key].files.append(entry)
    return list(images.values()), list(others.values()), len(paths)


def _is_multiframe_dicom(p: Path) -> bool:
    """Whether ``p`` is one DICOM file with several frames (an enhanced multi-frame CT, loaded like a folder)."""
    if not p.is_file() or _suffix(p) in _FORMATS or _suffix(p) == ".zip":
        return False
    with contextlib.suppress(Exception), _quiet_pydicom():
        import pydicom

        ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=["NumberOfFrames", "Modality"])
        return int(ds.get("NumberOfFrames", 1) or 1) > 1 and str(ds.get("Modality", "")).upper() != "SEG"
    return False


def _shown_name(path: Path, root: Path) -> str:
    """A file's name for messages: its path under the folder read (without the prefix a zip extraction adds)."""
    rel = path.name if root.is_file() else str(path.relative_to(root))
    return re.sub(r"^\d{6}_", "", rel) if root.name.startswith("universal-dicom-zip-") else rel


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's own warnings (odd values it tolerates) are not the user's concern: what matters is reported."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
        yield


def _read_dicom_header(path: Path) -> tuple[Any, str | None]:
    """``(dataset without pixels, None)``; ``(None, reason)`` for a damaged DICOM file (one with the ``DICM``
    preamble or a ``.dcm`` name); ``(None, None)`` for a file that is not DICOM."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        return None, _reason(exc)
    magic = head[128:132] == b"DICM"
    claimed = magic or path.suffix.lower() == ".dcm"
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=not magic)
        meta = getattr(ds, "file_meta", None)
        found = any(t in ds for t in ("SOPClassUID", "Modality", "Rows", "SeriesInstanceUID")) or (
            meta is not None and "MediaStorageSOPClassUID" in meta  # a DICOMDIR, say: DICOM, but no image
        )
    except Exception as exc:
        return None, (_reason(exc) if claimed else None)
    if not found:
        return None, ("not a DICOM data set" if claimed else None)
    return ds, None


def _damaged(display: str, shown: str, reason: str) -> InputError:
    return InputError(
        f"{display}: the DICOM file {shown} is damaged ({reason}); loading the series without it would give a "
        "different grid. Export the series again, or delete that file to load the rest (the gap is then reported "
        "and filled by interpolation)."
    )


def _dicom_file(ds: Any, path: str, shown: str) -> _DicomFile:
    """The header facts of one DICOM file (classic single-frame, or enhanced multi-frame with functional groups)."""

    def text(kw: str) -> str:
        return str(ds.get(kw, "") or "").strip()

    number = ds.get("SeriesNumber")
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])] if "ImageType" in ds else []
    tilt = ds.get("GantryDetectorTilt")
    entry = _DicomFile(
        path=path,
        shown=shown,
        uid=text("SeriesInstanceUID"),
        number=int(number) if number not in (None, "") else None,
        modality=text("Modality").upper(),
        description=text("SeriesDescription"),
        study=text("StudyInstanceUID"),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        photometric=text("PhotometricInterpretation").upper(),
        syntax=syntax,
        sop_class=text("SOPClassUID") or str((meta or {}).get("MediaStorageSOPClassUID", "") or ""),
        localizer="LOCALIZER" in image_type,
        lossy=syntax in _LOSSY_SYNTAXES or text("LossyImageCompression") == "01",
        tilt=float(tilt) if tilt not in (None, "") else 0.0,
        frames=[],
    )
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        entry.frames = _enhanced_frames(ds, n_frames)
    elif n_frames > 1:
        entry.frames = [dict.fromkeys(("pos", "iop", "spacing", "rescale")) for _ in range(n_frames)]
    else:
        entry.frames = [_geometry(ds)]
    return entry


def _floats(value: Any, n: int) -> np.ndarray | None:
    """``n`` finite numbers from a DICOM multi-value, else ``None`` (absent, empty, wrong count, not numbers)."""
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _rescale_of(item: Any) -> tuple[float, float] | None:
    slope, inter = item.get("RescaleSlope"), item.get("RescaleIntercept")
    if slope in (None, "") or inter in (None, ""):
        return None
    return float(slope), float(inter)


def _geometry(item: Any) -> dict[str, Any]:
    """Position, orientation, pixel spacing and rescale of a classic (single-frame) image."""
    return {
        "pos": _floats(item.get("ImagePositionPatient"), 3),
        "iop": _floats(item.get("ImageOrientationPatient"), 6),
        "spacing": _floats(item.get("PixelSpacing"), 2),
        "rescale": _rescale_of(item),
    }


def _enhanced_frames(ds: Any, n_frames: int) -> list[dict[str, Any]]:
    """Per-frame geometry of an enhanced multi-frame image: each frame's functional groups, else the shared ones."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per = ds.get("PerFrameFunctionalGroupsSequence") or []

    def item(i: int, seq: str) -> Any:
        for group in (per[i] if i < len(per) else None, shared):
            if group is not None and group.get(seq):
                return group[seq].value[0]
        return None

    out = []
    for i in range(n_frames):
        pos, iop, meas, value = (
            item(i, s)
            for s in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                      "PixelValueTransformationSequence")  # fmt: skip
        )
        out.append(
            {
                "pos": _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None,
                "iop": _floats(iop.get("ImageOrientationPatient"), 6) if iop is not None else None,
                "spacing": _floats(meas.get("PixelSpacing"), 2) if meas is not None else None,
                "rescale": _rescale_of(value if value is not None else ds),
            }
        )
    return out


def _describe(s: _DicomSeries) -> str:
    uid = s.uid or "(no SeriesInstanceUID)"
    desc = f", {s.description!r}" if s.description else ""
    number = f", series number {s.number}" if s.number is not None else ""
    return f"{uid} ({s.modality or '?'}{desc}, {s.n} slices){number}"


def _load_dicom_dir(
    folder: Path,
    source_path: Path,
    *,
    name: str,
    fmt: str,
    max_bytes: int,
    series: str | None,
    rescale: tuple[float, float] | None,
    n_files: int | None = None,
) -> Volume:
    """A DICOM folder (or one enhanced multi-frame file, or an extracted zip) → :class:`Volume` (see
    :func:`load_volume` for the rules on several series, damaged files, gaps, tilt and mixed slices)."""
    display = source_path.name or str(source_path)
    images, others, n_seen = _dicom_series(folder, display)
    if not images:
        raise _no_image_series(display, others, n_seen if n_files is None else n_files)
    chosen, pre_warnings = _choose_series(images, series, display)
    _check_ct_series(chosen, display)
    pre_warnings += _drop_localizers(chosen, display)
    files = chosen.files
    _check_bytes(sum(os.path.getsize(f.path) for f in files), max_bytes, display, " (DICOM files of the series)")
    frames = [(f, i, g) for f in files for i, g in enumerate(f.frames)]
    geo = _series_geometry(frames, display)
    _check_bytes(files[0].rows * files[0].cols * len(geo["grid"]) * 4, max_bytes, display, " as float32 in memory")
    slices, rescaled, rescale_msgs = _series_pixels(frames, geo["order"], display, rescale)
    raw = _on_grid(slices, geo)
    pre_warnings += [*geo["warnings"], *rescale_msgs]
    lossy = sorted({_syntax_name(f.syntax) if f.syntax in _LOSSY_SYNTAXES else "LossyImageCompression 01"
                    for f in files if f.lossy})  # fmt: skip
    if lossy:
        pre_warnings.append(
            f"{display}: the series was lossy-compressed ({', '.join(lossy)}): its HU values are approximate."
        )
    meta: dict[str, Any] = {
        "series_uid": chosen.uid,
        "series_number": chosen.number,
        "series_description": chosen.description,
        "modality": chosen.modality,
        "n_slices": len(frames),
        "n_files": len(files),
        "enhanced": any(len(f.frames) > 1 for f in files),
        "transfer_syntax": sorted({_syntax_name(f.syntax) for f in files if f.syntax}),
        "rescaled": rescaled,
        "series": [s.info() for s in images],
        "_warnings": pre_warnings,
        "_headers": tuple(f.header for f in files if f.header is not None),
    }
    if geo["filled"]:
        meta["interpolated_slices"] = geo["filled"]
    if others or len(images) > 1:
        meta["other_series"] = [s.uid for s in [*images, *others] if s is not chosen]
    return _finish(raw, geo["affine"], source_path, fmt, name, meta, rescale=rescale, owned=True,
                   modality=chosen.modality or None)  # fmt: skip


def _no_image_series(display: str, others: list[_DicomSeries], n_files: int) -> InputError:
    extra = ""
    if others:
        kinds = sorted({s.modality or "?" for s in others})
        extra = f" (only non-image DICOM objects: {', '.join(kinds)}; read a DICOM-SEG with load_label)"
    return InputError(
        f"{display} holds no DICOM image series{extra} among its {n_files} files: pass a folder (or .zip) "
        f"with the .dcm slices of one CT series, or another supported file ({_SUPPORTED_TEXT})."
    )


def _choose_series(
    images: list[_DicomSeries], series: str | None, display: str
) -> tuple[_DicomSeries, list[str]]:
    """The series to load: ``series`` (a SeriesInstanceUID or a SeriesNumber), else the CT series with the most
    slices, with a warning naming the others."""
    listed = "; ".join(_describe(s) for s in images)
    if series is not None:
        key = str(series).strip()
        match = [s for s in images if s.uid == key]
        if not match and re.fullmatch(r"[+-]?\d+", key):
            match = [s for s in images if s.number == int(key)]
        if not match:
            raise InputError(
                f"{display} has no DICOM series {series!r} (give a SeriesInstanceUID or a series number); "
                f"its image series are: {listed}."
            )
        if len(match) > 1:
            raise InputError(
                f"{display}: series number {key} names {len(match)} series ({'; '.join(_describe(s) for s in match)}); "
                "give the SeriesInstanceUID instead."
            )
        return match[0], []
    ct = [s for s in images if s.modality in ("CT", "")] or images
    chosen = max(ct, key=lambda s: s.n)
    rest = [s for s in images if s is not chosen]
    if not rest:
        return chosen, []
    return chosen, [
        f"{display} holds {len(images)} DICOM image series; took {_describe(chosen)}, the CT series with the most "
        f"slices; the others: {'; '.join(_describe(s) for s in rest)}. Choose one with --series UID|number "
        "(series= in load_volume)."
    ]


def _check_ct_series(s: _DicomSeries, display: str) -> None:
    """Refuse a series that is not one grey-value CT: another modality, colour pixels."""
    if s.modality and s.modality != "CT":
        raise InputError(
            f"{display}: series {_describe(s)} is modality {s.modality}, not CT (Modality tag): the model segments "
            "CT in Hounsfield units; pass a CT series."
        )
    colour = next((f for f in s.files if f.samples > 1 or f.photometric.startswith(("RGB", "YBR", "PALETTE"))), None)
    if colour is not None:
        kind = colour.photometric or f"{colour.samples} samples per pixel"
        raise InputError(
            f"{display}: {colour.shown} is a colour image ({kind}, e.g. a secondary capture or screenshot), not a "
            "CT in HU; pass the original CT series."
        )


def _drop_localizers(s: _DicomSeries, display: str) -> list[str]:
    """Leave out LOCALIZER (scout) images that share the series with the axial slices, saying so."""
    scouts = [f for f in s.files if f.localizer]
    if not scouts or len(scouts) == len(s.files):
        return []
    s.files = [f for f in s.files if not f.localizer]
    return [f"{display}: left out {len(scouts)} LOCALIZER image(s) of the series ({scouts[0].shown}...)."]


def _series_geometry(frames: list[tuple[_DicomFile, int, dict[str, Any]]], display: str) -> dict[str, Any]:
    """Check that the frames form one stack and place them: sort order, output grid, LPS affine, warnings.

    Refused (naming files): differing image sizes, orientations or pixel spacings, a missing position or
    orientation, two slices at one position, a gantry tilt, a gap of more than :data:`MAX_MISSING_SLICES` slices.
    Uneven gaps (missing slices) are filled by linear interpolation on the series' own spacing, with a warning.
    """
    f0, _, g0 = frames[0]

    def where(f: _DicomFile, i: int) -> str:
        return f.shown if len(f.frames) == 1 else f"{f.shown} (frame {i + 1})"

    for f, i, g in frames:
        if (f.rows, f.cols) != (f0.rows, f0.cols):
            raise InputError(
                f"{display}: the slices differ in size: {f0.shown} is {f0.rows}×{f0.cols} but {f.shown} is "
                f"{f.rows}×{f.cols} pixels; the folder mixes series: pass one series (remove the odd files)."
            )
        for key, tag in _GEOMETRY_TAGS:
            if g[key] is None:
                raise InputError(
                    f"{display}: {where(f, i)} has no (valid) {tag}: the slices cannot be placed in space; export "
                    "the series again with its geometry (an enhanced multi-frame file needs its functional groups)."
                )
        if np.abs(g["iop"] - g0["iop"]).max() > 1e-4:
            raise InputError(
                f"{display}: the slices do not share one orientation: {where(f0, 0)} has ImageOrientationPatient "
                f"{_fmt_list(g0['iop'])} but {where(f, i)} has {_fmt_list(g['iop'])}; pass one series with one "
                "orientation (remove the odd files)."
            )
        if np.abs(g["spacing"] - g0["spacing"]).max() > 1e-4 * max(float(g0["spacing"].max()), 1.0):
            raise InputError(
                f"{display}: the slices do not share one pixel spacing: {where(f0, 0)} has PixelSpacing "
                f"{_fmt_list(g0['spacing'])} mm but {where(f, i)} has {_fmt_list(g['spacing'])} mm; pass one "
                "series with one reconstruction (remove the odd files)."
            )
    row, col = g0["iop"][:3], g0["iop"][3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1) > 1e-3:
        raise InputError(
            f"{display}: ImageOrientationPatient {_fmt_list(g0['iop'])} of {f0.shown} is not two perpendicular "
            "unit vectors: the geometry is damaged; export the series again."
        )
    pos = np.array([g["pos"] for _, _, g in frames])
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    z = proj[order]
    names = [where(frames[k][0], frames[k][1]) for k in order]
    gaps = np.diff(z)
    if len(gaps) and gaps.min() < 1e-2:
        k = int(np.argmin(gaps))
        raise InputError(
            f"{display}: {names[k]} and {names[k + 1]} lie at the same position ({z[k]:.2f} mm along the slice "
            "normal): duplicated slices or two stacks (phases, reconstructions) in one series; remove the "
            "duplicates or pass one stack."
        )
    _check_tilt(pos[order], normal, display, max((f.tilt for f, _, _ in frames), key=abs))
    grid, filled, msgs = _slice_grid(z, names, display)
    ps = g0["spacing"]
    dz = (z[-1] - z[0]) / (len(grid) - 1) if len(grid) > 1 else 1.0
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * ps[1], col * ps[0], normal * dz
    lps[:3, 3] = pos[order[0]]
    return {"order": order, "z": z, "grid": grid, "filled": filled, "warnings": msgs, "affine": _LPS_TO_RAS @ lps}


def _fmt_list(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"


def _check_tilt(pos: np.ndarray, normal: np.ndarray, display: str, tag: float) -> None:
    """Refuse slices stacked at an angle to their own planes (a gantry tilt: a sheared grid)."""
    if len(pos) < 2:
        return
    d = pos[-1] - pos[0]
    along = float(d @ normal)
    across = float(np.linalg.norm(d - along * normal))
    angle = math.degrees(math.atan2(across, abs(along)))
    if angle > MAX_TILT_DEG:
        told = f", GantryDetectorTilt {tag:g}°" if tag else ""
        raise InputError(
            f"{display}: the slices are stacked at {angle:.1f}° to their own planes (a gantry tilt{told}): that is a "
            "sheared grid, which this loader does not resample; export a tilt-corrected reconstruction (or convert "
            "with a tool that corrects gantry tilt, e.g. dcm2niix) and load that."
        )


def _slice_grid(z: np.ndarray, names: list[str], display: str) -> tuple[np.ndarray, list[int], list[str]]:
    """The output slice positions along the normal: the sorted slices themselves when evenly spaced; else an even
    grid at the series' own spacing (the median gap) with the missing slices to be interpolated (a warning).

    Positions whose gaps are each even but add up to a drift from a straight line (more than
    :data:`UNIFORM_GAP_TOLERANCE` of a gap) are resampled onto an even grid of as many slices (a warning).

    Raises:
        InputError: a gap of more than :data:`MAX_MISSING_SLICES` missing slices, or slices between the points of
            the grid that the interpolation would (nearly) leave out (closer slices mixed in: two reconstructions).
    """
    if len(z) < 3:
        return z, [], []
    gaps = np.diff(z)
    step = float(np.median(gaps))
    if np.abs(gaps - step).max() <= UNIFORM_GAP_TOLERANCE * step:
        drift = z - np.linspace(z[0], z[-1], len(z))
        if np.abs(drift).max() <= UNIFORM_GAP_TOLERANCE * step:
            return z, [], []
        return _drift_grid(z, drift, names, display)
    big = int(np.argmax(gaps))
    if gaps[big] > (MAX_MISSING_SLICES + 1.5) * step:
        raise InputError(
            f"{display}: a gap of {gaps[big]:.2f} mm between {names[big]} ({z[big]:.2f} mm) and {names[big + 1]} "
            f"({z[big + 1]:.2f} mm) in a series spaced {step:.2f} mm: about {round(gaps[big] / step) - 1} slices "
            f"are missing, more than the {MAX_MISSING_SLICES} that may be interpolated; export the whole series."
        )
    n = int(round((z[-1] - z[0]) / step)) + 1
    grid = np.linspace(z[0], z[-1], n)
    _check_left_out(z, grid, names, display)
    filled = _off_slices(z, grid)
    odd = np.flatnonzero(np.abs(gaps - step) > UNIFORM_GAP_TOLERANCE * step)
    where = "; ".join(
        f"{gaps[k]:.2f} mm between {names[k]} ({z[k]:.2f} mm) and {names[k + 1]} ({z[k + 1]:.2f} mm)" for k in odd[:3]
    )
    more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
    return grid, filled, [
        f"{display}: slices missing or unevenly spaced in a series spaced {step:.2f} mm: gap(s) of {where}{more}; "
        f"the volume keeps the series' own grid ({n} slices, {(z[-1] - z[0]) / (n - 1):.2f} mm), with {len(filled)} "
        "slice(s) linearly interpolated between their neighbours."
    ]


def _off_slices(z: np.ndarray, grid: np.ndarray) -> list[int]:
    """Indices of the grid points that fall on no slice (to be interpolated)."""
    step = (z[-1] - z[0]) / (len(grid) - 1)
    near = np.abs(grid[:, None] - z[None, :]).min(axis=1)
    return [int(k) for k in np.flatnonzero(near > 1e-3 * step)]


def _drift_grid(
    z: np.ndarray, drift: np.ndarray, names: list[str], display: str
) -> tuple[np.ndarray, list[int], list[str]]:
    """An even grid of ``len(z)`` slices from the first slice to the last, for positions that drift from it, and
    the warning saying so (the slices are linearly interpolated at the grid points)."""
    grid = np.linspace(z[0], z[-1], len(z))
    _check_left_out(z, grid, names, display)
    filled = _off_slices(z, grid)
    k = int(np.argmax(np.abs(drift)))
    dz = (z[-1] - z[0]) / (len(z) - 1)
    return grid, filled, [
        f"{display}: the slice positions drift from an even spacing (each gap is close to {dz:.2f} mm, but "
        f"{names[k]} lies {drift[k]:+.2f} mm from the even grid): the volume is resampled onto an even grid "
        f"({len(z)} slices, {dz:.2f} mm), with {len(filled)} slice(s) linearly interpolated between their neighbours."
    ]


def _check_left_out(z: np.ndarray, grid: np.ndarray, names: list[str], display: str) -> None:
    """Refuse slices that the interpolation onto ``grid`` (:func:`_on_grid`) would leave out or nearly (weight
    below 0.25 in every output slice): slices between the grid points, e.g. a 1 mm stretch in a 2 mm series."""
    i = np.clip(np.searchsorted(z, grid, side="right") - 1, 0, len(z) - 2)
    w = (grid - z[i]) / (z[i + 1] - z[i])
    used = np.zeros(len(z))
    np.maximum.at(used, i, 1 - w)
    np.maximum.at(used, i + 1, w)
    out = np.flatnonzero(used < 0.25)
    if not len(out):
        return
    k = int(out[0])
    dz = (z[-1] - z[0]) / (len(grid) - 1)
    raise InputError(
        f"{display}: {len(out)} of the {len(z)} slices (e.g. {names[k]} at {z[k]:.2f} mm) lie between the points "
        f"of the series' even {dz:.2f} mm grid and would be left out: the series mixes slice spacings (two "
        "reconstructions in one series?); pass one stack with one spacing (remove the other slices)."
    )


def _series_pixels(
    frames: list[tuple[_DicomFile, int, dict[str, Any]]],
    order: np.ndarray,
    display: str,
    rescale: tuple[float, float] | None,
) -> tuple[np.ndarray, bool, list[str]]:
    """Decode the frames into a float32 (columns, rows, slices) array in ``order``, each with its own
    RescaleSlope/Intercept; ``(array, whether the series had a rescale, warnings)``."""
    have = [g["rescale"] is not None for _, _, g in frames]
    if any(have) and not all(have):
        f_with = frames[have.index(True)][0].shown
        f_without = frames[have.index(False)][0].shown
        raise InputError(
            f"{display}: {f_with} has RescaleSlope/RescaleIntercept but {f_without} has none: HU unknown for part "
            "of the series; export the series again."
        )
    f0 = frames[0][0]
    out = np.empty((f0.cols, f0.rows, len(frames)), np.float32)
    slot = np.empty(len(frames), int)
    slot[order] = np.arange(len(frames))
    k = 0
    for f in dict.fromkeys(f for f, _, _ in frames):  # the files in frame order, each decoded once
        pixels = _decode(f, display)
        for i, g in enumerate(f.frames):
            sl = out[:, :, slot[k]]
            sl[...] = pixels[i].T
            slope, inter = g["rescale"] or (1.0, 0.0)
            if slope != 1.0:
                sl *= np.float32(slope)
            if inter != 0.0:
                sl += np.float32(inter)
            k += 1
    msgs: list[str] = []
    if not all(have) and rescale is None:
        lo, hi = float(out.min()), float(out.max())
        if lo >= 0:
            raise InputError(
                f"{display}: the series has no RescaleSlope/RescaleIntercept, so its Hounsfield units are unknown, "
                f"and its stored values span {lo:g} to {hi:g} with nothing below 0 (raw scanner values, not HU); "
                "export it with the rescale, or pass rescale=(slope, intercept) to load_volume (often (1, -1024))."
            )
        msgs.append(
            f"{display}: the series has no RescaleSlope/RescaleIntercept (HU unknown); its stored values "
            f"({lo:g} to {hi:g}) are taken as HU because they go below 0; check the result."
        )
    return out, all(have), msgs


def _decode(f: _DicomFile, display: str) -> np.ndarray:
    """The frames of one file, (frames, rows, columns) stored values, through pydicom's pixel-data plugins."""
    import pydicom

    _check_decoder(f.syntax, f.shown, display)
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(f.path, force=True)
            if "TransferSyntaxUID" not in ds.file_meta:
                implicit = (getattr(ds, "original_encoding", None) or (True,))[0]
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
                )
            if "PhotometricInterpretation" not in ds and f.samples == 1:  # grey; pydicom needs it said
                ds.PhotometricInterpretation = "MONOCHROME2"
            pixels = np.asarray(ds.pixel_array)
    except Exception as exc:
        text = str(exc)
        if re.search(r"missing (required )?dependenc|no (pixel data )?(handlers|decoders)|unable to decode", text, re.I):
            raise _no_decoder(f.syntax, f.shown, display) from exc
        raise _damaged(display, f.shown, f"its pixel data could not be decoded: {_reason(exc)[:160]}") from exc
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape != (len(f.frames), f.rows, f.cols):
        expected = (len(f.frames), f.rows, f.cols)
        raise _damaged(display, f.shown, f"pixel data of shape {pixels.shape}, expected {expected}")
    f.header = source_header(ds)
    return pixels


def source_header(ds: Any) -> Any:
    """A copy of a DICOM dataset's header for writing objects that reference it (DICOM-SEG, RTSTRUCT): its
    public elements and file meta, without pixel data, overlays or private tags (a few kB per slice)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    out = Dataset()
    for elem in ds:
        group = elem.tag.group
        if elem.tag.is_private or group == 0x7FE0 or 0x6000 <= group <= 0x60FF:
            continue
        out.add(copy.deepcopy(elem))
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = FileMetaDataset(copy.deepcopy(meta))
    return out


def _syntax_name(syntax: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(syntax).name
    except Exception:
        name = ""
    return name if name and name != syntax else syntax


def _check_decoder(syntax: str, shown: str, display: str) -> None:
    """A one-line :class:`InputError` naming the transfer syntax and the package to install when pydicom (3.x)
    has no decoder for it."""
    if not syntax:
        return
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom 2.x: a missing handler is recognised from its error instead
        return
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise _no_decoder(syntax, shown, display)


def _no_decoder(syntax: str, shown: str, display: str) -> InputError:
    packages = _DECODER_PACKAGES.get(syntax)
    how = f"pip install {packages}" if packages else "pydicom does not support it; re-export the series uncompressed"
    return InputError(
        f"{display}: {shown} is compressed as {_syntax_name(syntax)} (transfer syntax {syntax}), which no installed "
        f"pydicom pixel-data plugin decodes: {how}."
    )


def _on_grid(slices: np.ndarray, geo: dict[str, Any]) -> np.ndarray:
    """The sorted slices on the output grid: themselves, or with the missing ones linearly interpolated."""
    z, grid = geo["z"], geo["grid"]
    if len(grid) == len(z) and not geo["filled"]:
        return slices
    out = np.empty((*slices.shape[:2], len(grid)), np.float32)
    for k, g in enumerate(grid):
        i = int(np.clip(np.searchsorted(z, g, side="right") - 1, 0, len(z) - 2))
        w = float((g - z[i]) / (z[i + 1] - z[i]))
        if w <= 1e-6:
            out[:, :, k] = slices[:, :, i]
        elif w >= 1 - 1e-6:
            out[:, :, k] = slices[:, :, i + 1]
        else:
            out[:, :, k] = (1 - w) * slices[:, :, i] + w * slices[:, :, i + 1]
    return out


def _extract_zip(path: Path, dest: Path, max_bytes: int) -> int:
    """Extract a zip into ``dest`` safely; returns the number of files written.

    Every member is checked before anything is written: absolute paths, ``..`` components, drive letters,
    symbolic links, encryption, member count, total uncompressed size (also enforced while streaming, per member
    against the directory's sizes), compression ratio (:data:`MAX_ZIP_RATIO`) and the free space of ``dest``.

    Members are written under generated flat names, so no archive path is ever used on disk.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(
            f"{path.name} could not be read as a zip archive: {_reason(exc)}. Re-create the archive."
        ) from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise InputError(
                f"{path.name} has {len(infos)} members, over the limit of {MAX_ZIP_MEMBERS}: zip one series only."
            )
        total = 0
        for info in infos:
            member = info.filename
            parts = [q for q in re.split(r"[\\/]+", member) if q]
            if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member) or ".." in parts:
                raise InputError(
                    f"{path.name} contains the member {member!r}, whose path escapes the archive (absolute or '..'); "
                    "refusing to extract anything from it. Re-create the zip with relative paths only."
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                raise InputError(
                    f"{path.name} contains the symbolic link {member!r}; refusing to extract it. "
                    "Re-create the zip from the DICOM files themselves."
                )
            if info.flag_bits & 0x1:
                raise InputError(
                    f"{path.name} is encrypted ({member!r}); zip the DICOM files without a password."
                )
            total += info.file_size
        _check_bytes(total, max_bytes, path.name, " uncompressed")
        _check_zip_ratio(path, total, sum(info.compress_size for info in infos))
        _check_free_space(dest, total, path.name)
        written = n = 0
        try:
            for i, info in enumerate(infos):
                parts = [q for q in re.split(r"[\\/]+", info.filename) if q]
                if info.is_dir() or not parts or parts[-1].startswith(".") or "__MACOSX" in parts:
                    continue
                safe = re.sub(r"[^A-Za-z0-9._-]", "_", parts[-1])[-80:]
                member = 0
                with zf.open(info) as src, open(dest / f"{i:06d}_{safe}", "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        member += len(chunk)
                        _check_bytes(written, max_bytes, path.name, " uncompressed")
                        if member > info.file_size:  # the directory lied about the size
                            raise InputError(
                                f"{path.name}: the member {info.filename!r} holds more data than the archive's "
                                f"directory says ({info.file_size} bytes): a damaged or malicious zip; "
                                "re-create the archive."
                            )
                        dst.write(chunk)
                n += 1
        except InputError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InputError(
                f"{path.name} could not be read as a zip archive: {_reason(exc)}. Re-create the archive."
            ) from exc
    return n


def _check_zip_ratio(path: Path, total: int, compressed: int) -> None:
    """An :class:`InputError` for an archive that expands more than :data:`MAX_ZIP_RATIO` times (a zip bomb)."""
    if total <= ZIP_RATIO_FLOOR:
        return
    ratio = total / max(1, compressed)
    if ratio > MAX_ZIP_RATIO:
        raise InputError(
            f"{path.name} would expand from {_fmt_bytes(compressed)} to {_fmt_bytes(total)} ({ratio:.0f} times; "
            f"DICOM compresses less than {MAX_ZIP_RATIO:.0f} times): a zip bomb or not a DICOM series; nothing "
            "was extracted. Zip the DICOM files of one series."
        )


def _check_free_space(dest: Path, total: int, what: str) -> None:
    """An :class:`InputError` when the folder ``dest`` lies on a disk without room for ``total`` bytes."""
    import shutil

    try:
        free = shutil.disk_usage(dest).free
    except OSError:
        return
    if total + 16 * 1024**2 > free:
        raise InputError(
            f"{what} needs {_fmt_bytes(total)} to extract, but the temporary folder {dest.parent} has only "
            f"{_fmt_bytes(free)} free; nothing was extracted. Free some space, or point TMPDIR at a larger disk."
        )


# ----------------------------------------------------------------------------------------------- labels
def _read_label_raw(p: Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """File-order integer label array, file affine (RAS+), format, meta."""
    if not p.exists():
        _check_broken_link(p)
        raise InputError(f"{p} does not exist: check the label path.")
    if p.is_dir():
        raise InputError(
            f"{p} is a folder: a label map must be one file (NIfTI, NRRD, MHA or a DICOM-SEG .dcm)."
        )
    size = _file_size(p)
    suffix = _suffix(p)
    if suffix not in LABEL_SUFFIXES:
        raise InputError(
            f"{p.name}: unsupported label file type {suffix or '(no extension)'!r}; supported are NIfTI (.nii, "
            ".nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and DICOM-SEG (.dcm)."
        )
    _check_bytes(size, max_bytes, p.name)
    meta: dict[str, Any] = {}
    if suffix == ".dcm":
        raw, affine = _read_dicom_seg(p)
        fmt = "dicom-seg"
    elif _FORMATS[suffix] == "nifti":
        raw, affine, slope, inter, meta = _read_nifti(p, max_bytes)
        if slope != 1.0 or inter != 0.0:
            raw = raw * np.float32(slope) + np.float32(inter)
        fmt = "nifti"
    else:
        fmt = _FORMATS[suffix]
        img = _read_sitk(p, fmt, max_bytes)
        view, affine = _sitk_to_numpy(img)
        raw = np.array(view)  # own the buffer
    return _as_labels(raw, p.name), affine, fmt, meta


def _as_labels(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind != "f":
        raise InputError(
            f"{name} has pixel type {arr.dtype}, not integer labels: pass a label map (0 = background)."
        )
    if not np.all(np.isfinite(arr)) or not np.all(np.mod(arr, 1) == 0):
        bad = arr[np.isfinite(arr) & (np.mod(arr, 1) != 0)]
        example = f" (e.g. {float(bad.flat[0]):g})" if bad.size else ""
        raise InputError(
            f"{name} holds non-integer values{example}: it looks like a probability map or a CT, not a label map; "
            "threshold it into integer labels first."
        )
    return arr.astype(_int_dtype_for(arr))


def _int_dtype_for(arr: np.ndarray) -> np.dtype:
    if arr.size == 0:
        return np.dtype(np.uint8)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _read_label_ras(p: Path, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    from nibabel.orientations import inv_ornt_aff

    raw, affine, _, _ = _read_label_raw(p, max_bytes)
    _check_shape(raw.shape, p.name)
    ornt, _ = _orientation(affine, p.name)
    lab = np.ascontiguousarray(_apply_ornt(raw, ornt))
    return lab, affine @ inv_ornt_aff(ornt, raw.shape)


def _label_onto(
    lab: np.ndarray, affine: np.ndarray, like: Volume, name: str, shift_note: str | None = None
) -> np.ndarray:
    """A RAS+ label array (with its affine) on ``like``'s grid: as is, exact crop/pad, or nearest resampling.

    ``shift_note`` (what the label is, e.g. ``"the prediction pred.nii.gz"``): also warn about an exact crop/pad.
    """
    if lab.shape == like.shape and np.allclose(affine, like.affine, atol=1e-3):
        return lab
    m = np.linalg.inv(affine) @ like.affine  # like voxel -> label voxel
    rot, t = m[:3, :3], m[:3, 3]
    shift = np.round(t).astype(int)
    exact = np.abs(rot - np.eye(3)).max() * max(like.shape) < 1e-2 and np.abs(t - shift).max() < 1e-2
    if exact:
        out = np.zeros(like.shape, lab.dtype)
        src, dst = [], []
        for o, n_lab, n_like in zip(shift, lab.shape, like.shape):
            a, b = max(0, o), min(n_lab, o + n_like)
            src.append(slice(a, max(a, b)))
            dst.append(slice(a - o, max(a, b) - o))
        out[tuple(dst)] = lab[tuple(src)]
        if shift_note is not None:
            _emit([_shift_message(shift_note, lab, out, like, tuple(int(v) for v in shift))])
    else:
        from scipy import ndimage

        _emit(
            [
                f"label {name} lies on another grid than the CT {like.name} (label shape {lab.shape}, spacing "
                f"{_fmt_spacing(np.linalg.norm(affine[:3, :3], axis=0))} mm; CT shape {like.shape}, spacing "
                f"{_fmt_spacing(like.spacing)} mm): resampled it nearest-neighbour through the affines onto the CT grid."
            ]
        )
        out = ndimage.affine_transform(
            lab, m, output_shape=like.shape, order=0, mode="grid-constant", cval=0, prefilter=False
        )
    if not out.any() and lab.any():
        raise InputError(
            f"label {name} does not overlap the field of view of {like.name}: they are probably not the same case "
            "(or one of the files has a wrong orientation); check the pairing."
        )
    return out


def _shift_message(what: str, lab: np.ndarray, out: np.ndarray, like: Volume, shift: tuple[int, ...]) -> str:
    """The warning of an exact crop/pad of a label grid onto ``like``'s: how the grids were aligned, what it did."""
    cut = int(np.count_nonzero(lab)) - int(np.count_nonzero(out))
    dropped = f"; {cut} labelled voxels of it outside that grid were dropped" if cut else ""
    return (
        f"{what} (shape {lab.shape}) is not on the grid of {like.name} (shape {like.shape}): both have the same "
        f"spacing and axes, so it was placed by a whole-voxel shift of {shift} voxels (from the two affines); "
        f"the voxels of {like.name} outside it count as background (0){dropped}. Check that both belong to the "
        "same scan and were not cropped by mistake."
    )


def _read_dicom_seg(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM-SEG → (file-order label array (columns, rows, slices), RAS+ affine); segment number = label value."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(p))
        modality = str(ds.get("Modality", "")).strip()
    except Exception as exc:
        raise _read_error(p, "dicom", exc) from exc
    if modality != "SEG":
        raise InputError(
            f"{p.name} is a DICOM file of modality {modality or '?'}, not a DICOM-SEG: a label file must be NIfTI, "
            "NRRD, MHA or a DICOM-SEG (.dcm)."
        )
    meta = getattr(ds, "file_meta", None)
    _check_decoder(str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else "", p.name, p.name)
    try:
        frames, iop, ps, measures, pos, segs = _seg_frames(ds)
    except Exception as exc:
        raise _read_error(p, "dicom-seg", exc) from exc
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    proj = pos @ normal
    levels = np.unique(np.round(proj, 3))
    dz = float(measures.get("SpacingBetweenSlices", 0) or 0)
    if dz <= 0:
        dz = (
            float(np.diff(levels).min()) if len(levels) > 1 else float(measures.get("SliceThickness", 1) or 1)
        )
    out = _stack_seg_frames(frames, np.round((proj - proj.min()) / dz).astype(int), segs, p.name)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * ps[1], col * ps[0], normal * dz
    lps[:3, 3] = pos[int(np.argmin(proj))]
    return out, _LPS_TO_RAS @ lps


def _seg_frames(ds: Any) -> tuple[np.ndarray, np.ndarray, list[float], Any, np.ndarray, list[int]]:
    """The frames of a DICOM-SEG dataset and their geometry (per-frame groups, else the shared ones).

    Returns ``(frames (F, rows, cols), ImageOrientationPatient (6,), PixelSpacing (row, column) mm, the
    PixelMeasures item, ImagePositionPatient (F, 3) mm, segment number of each frame)``.
    """
    frames = np.asarray(ds.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        frames = frames > float(ds.get("MaximumFractionalValue", 255)) / 2
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per = ds.PerFrameFunctionalGroupsSequence

    def item(i: int, seq: str) -> Any:
        fg = per[i]
        if seq in fg:
            return fg[seq].value[0]
        if shared is not None and seq in shared:
            return shared[seq].value[0]
        raise ValueError(f"frame {i} lacks {seq}")

    iop = np.array([float(v) for v in item(0, "PlaneOrientationSequence").ImageOrientationPatient])
    measures = item(0, "PixelMeasuresSequence")
    ps = [float(v) for v in measures.PixelSpacing]
    n = len(frames)
    pos = np.array(
        [[float(v) for v in item(i, "PlanePositionSequence").ImagePositionPatient] for i in range(n)]
    )
    segs = [int(item(i, "SegmentIdentificationSequence").ReferencedSegmentNumber) for i in range(n)]
    return frames, iop, ps, measures, pos, segs


def _stack_seg_frames(frames: np.ndarray, k: np.ndarray, segs: list[int], name: str) -> np.ndarray:
    """Paint frame ``f`` (rows, cols) with its segment number into slice ``k[f]`` of a (cols, rows, slices) map."""
    dtype = np.uint8 if max(segs, default=0) <= 255 else np.uint16
    out = np.zeros((frames.shape[2], frames.shape[1], int(k.max()) + 1), dtype)
    overlap = False
    for f in range(len(frames)):
        m = frames[f].T.astype(bool)
        sl = out[:, :, k[f]]
        overlap = overlap or bool((sl[m] != 0).any())
        sl[m] = segs[f]
    if overlap:
        _emit([f"{name}: segments overlap; the label map keeps the higher-numbered segment where they do."])
    return out


# ----------------------------------------------------------------------------------------------- writers
def _source_affine(like: Volume) -> np.ndarray:
    return like.source.original_affine if like.source is not None else like.affine


def _cast_exact(arr: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Cast without clamping or wrapping: raise when values do not fit ``dtype``."""
    if arr.dtype == dtype:
        return arr
    if arr.dtype == bool or dtype.kind == "f":
        return arr.astype(dtype)
    if dtype.kind in "iu" and arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        info = np.iinfo(dtype)
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < info.min or hi > info.max:
            raise ValueError(f"{what} values {lo:g}..{hi:g} do not fit {dtype}; pass a wider dtype")
        if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
            raise ValueError(
                f"{what} holds non-integer values; threshold or round it before saving as {dtype}"
            )
    return arr.astype(dtype)


def _write_image(arr: np.ndarray, affine: np.ndarray, path: Path, like: Volume) -> Path:
    """Write ``arr`` (file voxel order) with ``affine`` (RAS+) atomically (temp file in the same folder + replace)."""
    suffix = _suffix(path)
    if suffix not in (".nii", ".nii.gz", ".nrrd", ".mha"):
        raise ValueError(f"cannot write {path.name!r}: use a .nii.gz (or .nii, .nrrd, .mha) file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        if suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            img = nib.Nifti1Image(arr, affine)
            # the source's codes as they were (both 0: no orientation, so readers place the mask like the CT) and
            # its own qform when it differs from the sform (a qform reader then finds the mask on the CT)
            meta = like.source.meta if like.source is not None and like.source.format == "nifti" else {}
            qcode, scode = int(meta.get("qform_code", 1)), int(meta.get("sform_code", 1))
            qform = np.asarray(meta["qform"], dtype=np.float64) if "qform" in meta else affine
            img.set_qform(qform, code=qcode)
            img.set_sform(affine, code=scode)
            img.header.set_xyzt_units("mm")
            img.set_data_dtype(arr.dtype)
            nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
            lps = _LPS_TO_RAS @ affine
            spacing = np.linalg.norm(lps[:3, :3], axis=0)
            img.SetSpacing([float(s) for s in spacing])
            img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
            img.SetOrigin([float(v) for v in lps[:3, 3]])
            sitk.WriteImage(img, str(tmp), True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


# ----------------------------------------------------------------------------------------------- JSON
def json_float(value: Any, ndigits: int | None = None) -> float | None:
    """A number as a JSON-safe float: ``None`` for ``None``, NaN and ±inf; rounded to ``ndigits`` when given.

    >>> json_float(np.float32(0.123456), 3), json_float(float("nan")), json_float(None), json_float(2)
    (0.123, None, None, 2.0)
    """
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        return None
    return round(v, ndigits) if ndigits is not None else v


def to_json(value: Any, *, ndigits: int | None = None, default: Any = None) -> Any:
    """``value`` as plain JSON values (what ``json.dumps(..., allow_nan=False)`` accepts); the input is not changed.

    Mappings become dicts with ``str`` keys, tuples/lists/arrays lists, numpy scalars Python numbers (``np.bool_``
    → ``bool``), floats go through :func:`json_float` (NaN/inf → ``None``, rounded to ``ndigits``), paths ``str``.

    Args:
        value: Nested dicts, lists, tuples, numpy arrays and scalars, numbers, strings, paths, ``None``.
        ndigits: Round every float to this many decimals (``None`` keeps full precision).
        default: Called on any other object (like ``json.dumps``'s ``default``), e.g. ``str``; its result is
            converted too. ``None`` raises a :class:`TypeError` naming the type.

    >>> to_json({"a": (1, np.float32(0.5)), 2: [float("inf"), np.int64(3), np.bool_(True)], "p": Path("x")})
    {'a': [1, 0.5], '2': [None, 3, True], 'p': 'x'}
    >>> to_json(np.array([0.12345, np.nan]), ndigits=2)
    [0.12, None]
    """

    def conv(x: Any) -> Any:
        if x is None or isinstance(x, str):
            return x
        if isinstance(x, (bool, np.bool_)):
            return bool(x)
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)):
            return json_float(x, ndigits)
        if isinstance(x, Mapping):
            return {str(k): conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, np.ndarray):
            return conv(x.tolist())
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        if default is None:
            raise TypeError(
                f"{type(x).__name__} is not a JSON value (use numbers, strings, lists, dicts or None)"
            )
        return conv(default(x))

    return conv(value)


# ----------------------------------------------------------------------------------------------- formatting
def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _fmt_spacing(sp: Any) -> str:
    return "(" + ", ".join(f"{float(s):.3g}" for s in sp) + ")"


# ------------------------------------------------------------------------------------------------ atomic writes
def _file_mode() -> int:
    umask = os.umask(0)  # read once at import (os.umask can only be read by setting it)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike[str], write: Any, *, binary: bool = True) -> Path:
    """Write a file atomically: ``write(fh)`` fills a temporary file in the same folder, which then replaces
    ``path`` (an interruption never leaves a half-written file). Parent folders are created.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write(d / "a.txt", lambda fh: fh.write("hi"), binary=False).read_text()
    'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the file the mode open() would have given it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a whole folder atomically: ``with atomic_folder(path) as tmp:`` fills ``tmp``, a hidden temporary
    sibling of ``path`` (``.<name>.<random>.tmp``, same file system); on success it is renamed into place.

    An existing folder at ``path`` is replaced as a whole (renamed aside to ``.<name>.<random>.old``, the new one
    renamed in, the old one deleted), so the folder holds either the complete old or the complete new content, never a
    mixture. On any exception, ``KeyboardInterrupt`` included, the temporary folder is deleted and ``path`` is left as
    it was. SIGINT and SIGTERM that arrive during the renames are held back and delivered right after them. Whether
    an existing ``path`` may be replaced is the caller's decision (see ``Segmentation.check_outdir``).

    Raises:
        NotADirectoryError: ``path`` (or a parent) exists and is not a folder.
        OSError: The parent cannot be created or written (read-only, full, ...).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_folder(d / "case") as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> sorted(p.name for p in d.iterdir()), (d / "case" / "a.txt").read_text()
    (['case'], 'new')
    """
    import errno
    import shutil

    path = Path(os.path.abspath(path))  # "." and "x/.." have no name of their own
    if path.is_symlink():  # replace the folder it points to, not the link
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        with _signals_deferred():
            tmp = _new_sibling(path, ".tmp")
        yield tmp
        with _signals_deferred():
            _swap_folder(tmp, path)
    except BaseException:
        if tmp is not None:
            with _signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_sibling(path: Path, suffix: str) -> Path:
    """Create the empty hidden folder ``.<name>.<random><suffix>`` beside ``path`` (mode as ``mkdir`` gives it)."""
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.mkdir(candidate)
        except FileExistsError:  # pragma: no cover - 1 in 4 billion
            continue
        return candidate


def _swap_folder(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is renamed aside first and deleted after (restored on error)."""
    import shutil

    if not os.path.lexists(path):
        os.rename(new, path)
        return
    old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
    try:
        cwd = os.getcwd()
    except OSError:  # pragma: no cover - the working folder was deleted already
        cwd = None
    inside = cwd is not None and (cwd == str(path) or cwd.startswith(str(path) + os.sep))
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    if inside:  # the process worked inside the replaced folder: follow it to the new one (same name)
        with contextlib.suppress(OSError):
            os.chdir(cwd if os.path.isdir(cwd) else path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a few file-system calls; one that arrives meanwhile is re-raised after them
    under the handler that was in place (main thread only: elsewhere Python runs no signal handlers anyway)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is None:
            continue
        old = signal.getsignal(sig)
        if old in (signal.SIG_IGN, None):
            continue  # ignored (or not set from Python): leave it as it is
        try:
            signal.signal(sig, lambda signum, frame: caught.append(signum))
        except (ValueError, OSError):  # pragma: no cover - e.g. a sub-interpreter
            continue
        previous[sig] = old
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)
