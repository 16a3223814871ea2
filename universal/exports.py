"""Output formats of a case beyond NIfTI: DICOM-SEG, RTSTRUCT, 3D Slicer ``.seg.nrrd`` and a one-page HTML report.

``Segmentation.save(outdir, formats=...)`` writes the case folder; ``Segmentation._write_files`` calls one writer
per format from :data:`WRITERS` (NIfTI: ``Segmentation._write_nifti``), each ``writer(segmentation, folder) -> Export`` (the files it wrote, the classes it
left out, notes for ``report.json``). The CLI (``universal segment --format``) and the dashboard's Download tab use
these writers; neither knows anything about the formats.

====================  ===========================  ===========================================================
format                file                         what
====================  ===========================  ===========================================================
``nifti`` (default)   ``masks/*.nii.gz``,           one mask per class, the universal label map (input grid)
                      ``labels.nii.gz``
``dicom-seg``         ``segmentation.dcm``          DICOM-SEG (highdicom), binary, one segment per non-empty
                                                   class; DICOM input only
``rtstruct``          ``rtstruct.dcm``              RT Structure Set, one ROI per non-empty class, closed planar
                                                   contours per slice; DICOM input only
``seg.nrrd``          ``segmentation.seg.nrrd``     3D Slicer segmentation (pynrrd), any input
``report``            ``report.html``               one page: key slices with overlays, volumes, mean HU,
                                                   model, timings, the research-use notice
====================  ===========================  ===========================================================

Rules shared by the segment formats: classes whose mask is empty are left out (a DICOM-SEG segment or an RTSTRUCT
ROI without a voxel is not allowed or useless) and listed in ``report.json`` ``outputs.left_out``; names, colours
and SNOMED-CT codes come from the taxonomy (:func:`universal.taxonomy.class_codes`); masks lie on the input's own
grid (the source file's voxel order and affine, as the NIfTI masks). Segments are numbered organs first, then
tumours (the order of the label map), so a reader that paints segments in number order (``load_label``) gives
``labels.nii.gz`` back.

The DICOM objects reference the source series through the headers :func:`universal.io.load_volume` keeps
(``SourceInfo.headers``): study, series, frame of reference and every SOP instance. A header with an empty
SOPInstanceUID/SOPClassUID (some anonymisers blank them) takes the file meta's MediaStorage UIDs; a series whose
StudyInstanceUID, SeriesInstanceUID or FrameOfReferenceUID was removed gets one derived from its SOP instances
(the same for every export of that series), with a note in the report.
"""

from __future__ import annotations

import base64
import copy
import html
import io as _bytes_io
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from universal import taxonomy
from universal.errors import InputError, InputWarning
from universal.io import atomic_write, atomic_write_text

__all__ = [
    "DEFAULT_FORMATS",
    "DICOM_FORMATS",
    "FILE_NAMES",
    "FORMATS",
    "WRITERS",
    "DicomReferences",
    "Export",
    "check_formats",
    "dicom_references",
    "export_bytes",
    "is_dicom_input",
    "is_dicom_volume",
    "parse_formats",
    "write_dicom_seg",
    "write_report",
    "write_rtstruct",
    "write_seg_nrrd",
]

FORMATS = ("nifti", "dicom-seg", "rtstruct", "seg.nrrd", "report")
"""The output formats, in the order they are written."""
DEFAULT_FORMATS = ("nifti",)
"""What ``universal segment`` writes without ``--format`` (report.json is always written)."""
DICOM_FORMATS = frozenset({"dicom-seg", "rtstruct"})
"""Formats that reference the source DICOM series, so they need a DICOM input."""
FILE_NAMES = {
    "nifti": ("masks", "labels.nii.gz"),
    "dicom-seg": ("segmentation.dcm",),
    "rtstruct": ("rtstruct.dcm",),
    "seg.nrrd": ("segmentation.seg.nrrd",),
    "report": ("report.html",),
}
"""Format → the entries it writes into the case folder."""
NOT_CLINICAL = "Research software, not for clinical use."
_SERIES_NUMBER = {"dicom-seg": 9901, "rtstruct": 9902}
_RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
_STUDY_REF_CLASS = (
    "1.2.840.10008.3.1.2.3.1"  # the Study reference of an RT Structure Set (Detached Study Mgmt)
)
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS+ ↔ LPS (DICOM patient coordinates, NRRD left-posterior-superior)


@dataclass(frozen=True)
class Export:
    """What one writer did: ``files`` (names in the case folder), the classes it ``left_out`` (empty masks) and
    ``notes`` (sentences for ``report.json``)."""

    files: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"files": list(self.files), "left_out": list(self.left_out), "notes": list(self.notes)}


# ------------------------------------------------------------------------------------------------ formats
def parse_formats(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Output formats from ``"nifti,dicom-seg"`` (or a sequence of names): lower case, duplicates dropped, in the
    order of :data:`FORMATS`; ``None`` or empty → :data:`DEFAULT_FORMATS`.

    Raises:
        InputError: An unknown format name (the message lists the valid ones).

    >>> parse_formats("seg.nrrd, NIFTI,nifti")
    ('nifti', 'seg.nrrd')
    """
    if value is None:
        return DEFAULT_FORMATS
    names = value.split(",") if isinstance(value, str) else list(value)
    wanted = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in wanted if n not in FORMATS]
    if unknown:
        raise InputError(
            f"unknown output format {', '.join(repr(n) for n in unknown)}: choose from {', '.join(FORMATS)} "
            "(comma-separated, e.g. --format nifti,dicom-seg)."
        )
    return tuple(f for f in FORMATS if f in wanted) or DEFAULT_FORMATS


def is_dicom_input(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is read as DICOM by :func:`universal.io.load_volume`: a folder, a ``.zip``, a ``.dcm``
    file, or a file without a known extension that starts like DICOM (the ``DICM`` preamble)."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in (".zip", ".dcm"):
        return True
    if p.suffix or not p.is_file():
        return False
    try:
        with open(p, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_volume(volume: Any) -> bool:
    """Whether ``volume`` was read from a DICOM series whose headers the DICOM writers can reference."""
    source = getattr(volume, "source", None)
    return source is not None and source.format in ("dicom", "dicom-zip") and bool(source.headers)


def check_formats(formats: Sequence[str], inputs: Iterable[Any]) -> None:
    """Refuse DICOM-only formats for inputs that are not DICOM, before any model loads: ``inputs`` are paths
    (:func:`is_dicom_input`) or Volumes (:func:`is_dicom_volume`).

    Raises:
        InputError: One line naming the formats and the inputs that are not DICOM series.
    """
    need = [f for f in formats if f in DICOM_FORMATS]
    if not need:
        return
    bad = [
        str(getattr(x, "name", x))
        for x in inputs
        if not (is_dicom_input(x) if isinstance(x, (str, os.PathLike)) else is_dicom_volume(x))
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise InputError(
            f"--format {','.join(need)} references the source DICOM series, but {shown} "
            f"{'is' if len(bad) == 1 else 'are'} not a DICOM series (folder or zip): pass the DICOM series, or "
            "choose nifti, seg.nrrd or report for these inputs."
        )


# ------------------------------------------------------------------------------------------------ helpers
def _present(seg: Any) -> tuple[list[str], tuple[str, ...]]:
    """(non-empty classes, organs first then tumours, each group in the segmentation's order; empty classes)."""
    names = [n for n, m in seg.masks.items() if np.any(m)]
    ordered = sorted(names, key=lambda n: taxonomy.resolve_class(n).is_tumor)
    return ordered, tuple(n for n in seg.masks if n not in names)


def _left_out_note(left_out: Sequence[str], what: str) -> tuple[str, ...]:
    if not left_out:
        return ()
    return (f"{what}: left out {len(left_out)} class(es) with an empty mask: {', '.join(left_out)}.",)


def _source_affine(volume: Any) -> np.ndarray:
    """Voxel → RAS+ affine of the source file's own voxel order (the volume's affine without a source)."""
    source = getattr(volume, "source", None)
    return np.asarray(source.original_affine if source is not None else volume.affine, dtype=np.float64)


def _source_mask(seg: Any, name: str) -> np.ndarray:
    """A class's mask in the source file's own voxel order (a view; see ``Volume.to_source_order``)."""
    return np.asarray(seg.volume.to_source_order(np.asarray(seg.masks[name], dtype=bool)))


def _version() -> str:
    import universal

    return str(universal.__version__)


def _algorithm_parameters(seg: Any) -> dict[str, str]:
    info = getattr(seg, "info", {}) or {}
    return {k: str(info[k]) for k in ("model", "backbone", "encoder", "template") if info.get(k) is not None}


def _rgb(name: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in taxonomy.resolve_class(name).color)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ DICOM refs
@dataclass(frozen=True)
class DicomReferences:
    """The source instances a DICOM export references, in order of their slice on the source grid.

    Attributes:
        headers: pydicom Datasets (copies, UIDs completed) of the instances that lie on a grid slice.
        slices: The source-grid slice index (third axis of the file's voxel order) of each header.
        study_uid, series_uid, frame_uid: The UIDs referenced (derived when the source lacks them).
        notes: What was completed or left out, for the report.
    """

    headers: tuple[Any, ...]
    slices: tuple[int, ...]
    study_uid: str
    series_uid: str
    frame_uid: str
    notes: tuple[str, ...] = field(default=())


def dicom_references(volume: Any) -> DicomReferences:
    """The source instances of a DICOM volume and the UIDs that exports reference (see the module docstring).

    Each note (UIDs derived because the series lacks them, slices without a source instance) is also issued as
    an :class:`~universal.errors.InputWarning`.

    Raises:
        InputError: The volume was not read from a classic DICOM series (NIfTI, NRRD, an array, an enhanced
            multi-frame file), or its instances cannot be placed on its grid.
    """

    if not is_dicom_volume(volume):
        raise InputError(
            f"{getattr(volume, 'name', 'the input')}: DICOM-SEG and RTSTRUCT reference the source DICOM series, "
            "but this CT was not read from one: load the DICOM folder or zip, or write nifti or seg.nrrd."
        )
    src = volume.source
    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in src.headers):
        raise InputError(
            f"{volume.name}: DICOM-SEG and RTSTRUCT of an enhanced multi-frame CT are not supported yet: write nifti "
            "or seg.nrrd, or export the series as single-frame slices."
        )
    headers = [copy.deepcopy(h) for h in src.headers]
    for h in headers:  # an empty SpecificCharacterSet means the default repertoire; highdicom refuses ''
        if "SpecificCharacterSet" in h and not h.SpecificCharacterSet:
            del h.SpecificCharacterSet
    uids, notes = _complete_uids(headers)
    slices, kept = _slice_indices(headers, _source_affine(volume), volume.name)
    missing = sorted(set(range(src.original_shape[2])) - set(slices))
    if missing:
        notes.append(
            f"{len(missing)} slice(s) of the grid have no source instance (interpolated where slices were missing): "
            "the DICOM exports leave them out."
        )
    for note in notes:  # said where the run is watched too (the CLI's stderr), not only in report.json
        warnings.warn(InputWarning(f"{volume.name}: {note}"), stacklevel=2)
    order = np.argsort(slices, kind="stable")
    return DicomReferences(
        headers=tuple(kept[i] for i in order),
        slices=tuple(int(slices[i]) for i in order),
        study_uid=uids["study"],
        series_uid=uids["series"],
        frame_uid=uids["frame"],
        notes=tuple(notes),
    )


def _complete_uids(headers: list[Any]) -> tuple[dict[str, str], list[str]]:
    """Fill the headers' empty SOP instance/class UIDs from their file meta, and the series' missing study, series
    and frame-of-reference UIDs with ones derived from its SOP instances; ``({"study", "series", "frame"}, notes)``."""
    from pydicom.uid import generate_uid

    notes: list[str] = []
    for h in headers:
        meta = getattr(h, "file_meta", None)
        if not str(h.get("SOPInstanceUID", "") or ""):
            h.SOPInstanceUID = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "") or generate_uid()
        if not str(h.get("SOPClassUID", "") or ""):
            h.SOPClassUID = str(getattr(meta, "MediaStorageSOPClassUID", "") or "") or _CT_IMAGE
    instances = sorted(str(h.SOPInstanceUID) for h in headers)
    uids = {}
    for kw, what in (
        ("StudyInstanceUID", "study"),
        ("SeriesInstanceUID", "series"),
        ("FrameOfReferenceUID", "frame"),
    ):
        found = next((str(h.get(kw)) for h in headers if str(h.get(kw, "") or "")), "")
        if not found:
            found = generate_uid(entropy_srcs=[what, *instances])
            notes.append(
                f"the source series has no {kw} (removed by an anonymiser?): the exports reference {found}, derived "
                "from its SOPInstanceUIDs (the same in every export of this series)."
            )
        uids[what] = found
        for h in headers:
            setattr(h, kw, found)
    return uids, notes


def _slice_indices(headers: list[Any], affine: np.ndarray, name: str) -> tuple[list[int], list[Any]]:
    """The grid slice of each header's ImagePositionPatient (from the source affine), checked to lie on it."""
    inv = np.linalg.inv(affine)
    slices, kept = [], []
    for h in headers:
        pos = np.array([float(v) for v in h.ImagePositionPatient], dtype=np.float64)
        ijk = inv @ np.r_[_LPS[:3, :3] @ pos, 1.0]
        k = int(round(ijk[2]))
        if np.abs(ijk[:2]).max() > 1e-2 or abs(ijk[2] - k) > 1e-2:
            raise InputError(
                f"{name}: the instance {h.SOPInstanceUID} does not lie on a slice of the volume's grid: the DICOM "
                "exports cannot reference it; write nifti or seg.nrrd."
            )
        slices.append(k)
        kept.append(h)
    return slices, kept


# ------------------------------------------------------------------------------------------------ writers
def _dicom_plan(seg: Any, what: str) -> tuple[DicomReferences, list[str], tuple[str, ...], tuple[str, ...]]:
    """``(references, classes to write, empty classes, notes)`` of a DICOM writer (``what``: its name in notes)."""
    refs = dicom_references(seg.volume)
    names, empty = _present(seg)
    notes = (*refs.notes, *_left_out_note(empty, what))
    if not names:
        notes = (*notes, f"{what}: no class was found, so none was written.")
    return refs, names, empty, notes


def write_dicom_seg(seg: Any, folder: str | os.PathLike[str]) -> Export:
    """``segmentation.dcm``: a binary DICOM-SEG (highdicom) referencing the source series, one segment per
    non-empty class with its name, SNOMED-CT category/type (and laterality, anatomic region), the taxonomy
    colour (CIELab) and the algorithm identification (``universal``, its version, the model and template).

    Raises:
        InputError: The input was not a classic DICOM series (:func:`dicom_references`).
    """
    import highdicom as hd

    refs, names, empty, notes = _dicom_plan(seg, "DICOM-SEG")
    if not names:
        return Export(left_out=empty, notes=notes)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="universal",
        family=_code(hd, _ai_family()),
        version=_version(),
        parameters=_algorithm_parameters(seg),
    )
    descriptions = [_segment_description(hd, i + 1, n, algorithm) for i, n in enumerate(names)]
    masks = [_source_mask(seg, n) for n in names]
    pixels = np.stack([np.stack([m[:, :, k].T for m in masks], axis=-1) for k in refs.slices]).astype(
        np.uint8
    )
    obj = hd.seg.Segmentation(
        source_images=list(refs.headers),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBER["dicom-seg"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="universal",
        manufacturer_model_name=str((getattr(seg, "info", {}) or {}).get("model") or "universal"),
        software_versions=_version(),
        device_serial_number="none",
        content_label="UNIVERSAL",
        content_description=f"universal segmentation. {NOT_CLINICAL}"[:64],
        series_description="universal segmentation (research use)",
    )
    name = FILE_NAMES["dicom-seg"][0]
    atomic_write(Path(folder) / name, lambda fh: obj.save_as(fh, enforce_file_format=True))
    return Export(files=(name,), left_out=empty, notes=notes)


def _ai_family() -> Any:
    from pydicom.sr.codedict import codes

    return codes.cid7162.ArtificialIntelligence


def _code(hd: Any, c: Any) -> Any:
    """A highdicom CodedConcept of a taxonomy :class:`~universal.taxonomy.Code` or a pydicom ``Code``."""
    scheme = getattr(c, "scheme", None) or c.scheme_designator
    return hd.sr.CodedConcept(value=c.value, scheme_designator=scheme, meaning=c.meaning)


def _segment_description(hd: Any, number: int, name: str, algorithm: Any) -> Any:
    codes = taxonomy.class_codes(name)
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name,
        segmented_property_category=_code(hd, codes.category),
        segmented_property_type=_code(hd, codes.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(),
        tracking_id=name,
        anatomic_regions=[_code(hd, codes.region)] if codes.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*_rgb(name)),
    )
    if codes.modifier is not None:
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence as DicomSequence

        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = codes.modifier.value, codes.modifier.scheme
        item.CodeMeaning = codes.modifier.meaning
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = DicomSequence(
            [item]
        )
    return desc


def write_rtstruct(seg: Any, folder: str | os.PathLike[str]) -> Export:
    """``rtstruct.dcm``: an RT Structure Set on the source series, one ROI per non-empty class (name and display
    colour from the taxonomy; ``ORGAN`` for organs), one CLOSED_PLANAR contour per connected piece and hole on each
    slice (marching squares at 0.5 on the mask, collinear points dropped; a contour inside another is a hole, the
    even-odd rule of RT planning systems), each referencing its slice's SOP instance.

    Raises:
        InputError: The input was not a classic DICOM series (:func:`dicom_references`).
    """
    refs, names, empty, notes = _dicom_plan(seg, "RTSTRUCT")
    if not names:
        return Export(left_out=empty, notes=notes)
    ds = _rtstruct_dataset(seg, refs)
    affine = _source_affine(seg.volume)
    for number, name in enumerate(names, start=1):
        _add_roi(ds, number, name, _source_mask(seg, name), refs, affine)
    name = FILE_NAMES["rtstruct"][0]
    atomic_write(Path(folder) / name, lambda fh: ds.save_as(fh, enforce_file_format=True))
    return Export(files=(name,), left_out=empty, notes=notes)


_COPIED = (  # patient and general study modules, copied from the source so a PACS files it with the study
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "IssuerOfPatientID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
    "SpecificCharacterSet",
)  # fmt: skip


def _rtstruct_dataset(seg: Any, refs: DicomReferences) -> Any:
    """The RT Structure Set without ROIs: SOP common, patient, study, RT series, equipment and the referenced
    frame of reference → study → series → every contour image."""
    import datetime

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    first = refs.headers[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = _RTSTRUCT_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    for kw in _COPIED:
        ds.add_new(kw, _vr(kw), first.get(kw, "") if kw in first else "")
    if not ds.SpecificCharacterSet:
        del ds.SpecificCharacterSet
    now = datetime.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = _RTSTRUCT_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.Modality = refs.study_uid, "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), _SERIES_NUMBER["rtstruct"]
    ds.SeriesDescription, ds.OperatorsName = "universal structures (research use)", ""
    ds.Manufacturer, ds.ManufacturerModelName = "universal", str((seg.info or {}).get("model") or "universal")
    ds.SoftwareVersions, ds.InstanceNumber = _version(), 1
    ds.FrameOfReferenceUID = refs.frame_uid
    ds.StructureSetLabel, ds.StructureSetName = "UNIVERSAL", "universal"
    ds.StructureSetDescription = NOT_CLINICAL
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.StructureSetDate, ds.StructureSetTime
    images = DicomSequence([_image_ref(h) for h in refs.headers])
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = refs.series_uid, images
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = _STUDY_REF_CLASS, refs.study_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = refs.frame_uid, DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    ds.StructureSetROISequence, ds.ROIContourSequence = DicomSequence(), DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    return ds


def _vr(keyword: str) -> str:
    from pydicom.datadict import dictionary_VR

    return dictionary_VR(keyword)


def _image_ref(h: Any) -> Any:
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
    return ref


def _add_roi(
    ds: Any, number: int, name: str, mask: np.ndarray, refs: DicomReferences, affine: np.ndarray
) -> None:
    """One ROI: its StructureSetROI, ROIContour (the contours of every slice) and RTROIObservations items."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    info = taxonomy.resolve_class(name)
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, refs.frame_uid, name
    roi.ROIGenerationAlgorithm, roi.ROIGenerationDescription = "AUTOMATIC", f"universal {_version()}"
    ds.StructureSetROISequence.append(roi)
    contours = DicomSequence()
    for h, k in zip(refs.headers, refs.slices):
        for points in _slice_contours(mask[:, :, k]):
            ijk = np.c_[points, np.full(len(points), k), np.ones(len(points))]
            lps = (ijk @ (_LPS @ affine).T)[:, :3]
            c = Dataset()
            c.ContourImageSequence = DicomSequence([_image_ref(h)])
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            c.ContourData = [f"{v:.4f}".rstrip("0").rstrip(".") for v in lps.ravel()]
            contours.append(c)
    item = Dataset()
    item.ROIDisplayColor, item.ReferencedROINumber = list(_rgb(name)), number
    item.ContourSequence = contours
    ds.ROIContourSequence.append(item)
    obs = Dataset()
    obs.ObservationNumber, obs.ReferencedROINumber, obs.ROIObservationLabel = number, number, name[:16]
    obs.RTROIInterpretedType, obs.ROIInterpreter = ("" if info.is_tumor else "ORGAN"), ""
    ds.RTROIObservationsSequence.append(obs)


def _slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed contours (N, 2) in voxel (i, j) coordinates of a 2-D mask: marching squares at 0.5 on the mask
    padded with background (so every contour closes), the repeated end point and collinear points dropped."""
    from skimage import measure

    if not mask2d.any():
        return []
    padded = np.pad(mask2d.astype(np.float32), 1)
    out = []
    for c in measure.find_contours(padded, 0.5):
        c = measure.approximate_polygon(c, tolerance=0.0)[:-1] - 1.0
        if len(c) >= 3:
            out.append(c)
    return out


def write_seg_nrrd(seg: Any, folder: str | os.PathLike[str]) -> Export:
    """``segmentation.seg.nrrd``: a 3D Slicer segmentation (pynrrd, gzip) on the source file's own grid, one
    segment per non-empty class with the header fields Slicer reads (``Segment{i}_ID/_Name/_Color/_LabelValue/
    _Layer/_Extent/_Tags`` with the SNOMED-CT terminology, ``Segmentation_*``). Overlapping classes (a tumour and
    its organ) go to separate layers (a 4-D ``list`` axis first), the others share a layer."""
    import nrrd

    names, empty = _present(seg)
    masks = [_source_mask(seg, n) for n in names]
    layer_of, label_of, layers = _assign_layers(masks)
    source = getattr(seg.volume, "source", None)
    shape = tuple(source.original_shape) if source is not None else tuple(seg.volume.shape)
    data = np.zeros((max(layers, 1), *shape), np.uint8)
    for m, layer, label in zip(masks, layer_of, label_of):
        data[layer][m] = label
    lps = _LPS @ _source_affine(seg.volume)
    header: dict[str, Any] = {
        "type": "unsigned char",
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T.tolist(),
        "space origin": lps[:3, 3].tolist(),
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    if layers > 1:
        header["space directions"] = [[np.nan] * 3, *header["space directions"]]
        header["kinds"] = ["list", *header["kinds"]]
    for i, (name, m) in enumerate(zip(names, masks)):
        header.update(_segment_fields(i, name, m, layer_of[i], label_of[i]))
    out = data if layers > 1 else data[0]
    name = FILE_NAMES["seg.nrrd"][0]
    path = Path(folder) / name
    tmp = path.with_name(f".{name}.tmp")
    try:
        nrrd.write(str(tmp), out, header, index_order="F")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Export(files=(name,), left_out=empty, notes=_left_out_note(empty, "seg.nrrd"))


def _assign_layers(masks: Sequence[np.ndarray]) -> tuple[list[int], list[int], int]:
    """Greedy layers: each mask joins the first layer none of whose masks it overlaps. Returns (layer of each mask,
    its label value within the layer (1, 2, ...), number of layers)."""
    occupied: list[np.ndarray] = []
    counts: list[int] = []
    layer_of, label_of = [], []
    for m in masks:
        layer = next((i for i, occ in enumerate(occupied) if not np.any(occ & m)), len(occupied))
        if layer == len(occupied):
            occupied.append(np.zeros_like(m))
            counts.append(0)
        occupied[layer] |= m
        counts[layer] += 1
        layer_of.append(layer)
        label_of.append(counts[layer])
    return layer_of, label_of, len(occupied)


def _segment_fields(i: int, name: str, mask: np.ndarray, layer: int, label: int) -> dict[str, str]:
    from universal.inference import mask_file_stem

    idx = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    extent = " ".join(f"{int(v[0])} {int(v[-1])}" for v in idx)
    codes = taxonomy.class_codes(name)

    def triple(c: taxonomy.Code | None) -> str:
        return f"{c.scheme}^{c.value}^{c.meaning}" if c is not None else "^^"

    region = codes.region
    tags = (
        "TerminologyEntry:Segmentation category and type - DICOM master list"
        f"~{triple(codes.category)}~{triple(codes.type)}~{triple(codes.modifier)}"
        f"~Anatomic codes - DICOM master list~{triple(region)}~^^|"
    )
    p = f"Segment{i}_"
    return {
        p + "ID": mask_file_stem(name),
        p + "Name": name,
        p + "NameAutoGenerated": "0",
        p + "Color": " ".join(f"{v / 255:.6g}" for v in _rgb(name)),
        p + "ColorAutoGenerated": "0",
        p + "Extent": extent,
        p + "Layer": str(layer),
        p + "LabelValue": str(label),
        p + "Tags": tags,
    }


# ------------------------------------------------------------------------------------------------ report
def write_report(seg: Any, folder: str | os.PathLike[str]) -> Export:
    """``report.html``: one self-contained page (no external resources): the research-use notice, the case, key
    axial/coronal/sagittal slices with the masks overlaid (embedded PNGs, taxonomy colours), a table of volumes
    (mL) and mean HU per class, the model, template, settings and timings."""
    name = FILE_NAMES["report"][0]
    atomic_write_text(Path(folder) / name, report_html(seg))
    return Export(files=(name,))


def report_html(seg: Any) -> str:
    """The HTML text of :func:`write_report` (every value escaped)."""
    e = html.escape
    info = getattr(seg, "info", {}) or {}
    case = str(getattr(seg.volume, "name", "volume"))
    rows = []
    for n in seg.masks:
        ml, hu = seg.volumes_ml.get(n), seg.mean_hu.get(n)
        found = bool(np.any(seg.masks[n]))
        swatch = "#" + "".join(f"{v:02x}" for v in _rgb(n))
        rows.append(
            f"<tr><td><span class=sw style='background:{swatch}'></span>{e(n)}</td>"
            f"<td>{_num(ml, 1) if found else '—'}</td><td>{_num(hu, 0) if found else '—'}</td>"
            f"<td>{'yes' if found else 'not found'}</td></tr>"
        )
    model = [
        (k, info.get(k)) for k in ("model", "backbone", "encoder", "template", "device", "precision", "fast")
    ]
    timings = [(k, f"{float(v):.2f} s") for k, v in (getattr(seg, "timings", {}) or {}).items()]
    figures = "".join(
        f"<figure><img alt='{e(view)} slice {k}' src='data:image/png;base64,{png}'><figcaption>{e(view)} slice "
        f"{k}</figcaption></figure>"
        for view, k, png in _key_slices(seg)
    )
    warnings_ = "".join(f"<li>{e(str(w))}</li>" for w in info.get("warnings") or [])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>universal: {e(case)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:1em auto;color:#222}}
.notice{{background:#fde2e1;border:2px solid #c0392b;padding:.5em 1em;font-weight:bold}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left}}
.sw{{display:inline-block;width:.9em;height:.9em;margin-right:.4em;vertical-align:middle}}
figure{{display:inline-block;margin:.3em}}img{{max-width:18em;height:auto}}</style></head><body>
<p class="notice">{e(NOT_CLINICAL)} The masks are an algorithm's output, not a diagnosis: a qualified reader must
check them before any use.</p>
<h1>Segmentation report: {e(case)}</h1>
<section>{figures}</section>
<h2>Classes</h2><table><tr><th>class</th><th>volume (mL)</th><th>mean HU</th><th>found</th></tr>{"".join(rows)}
</table>
<h2>Model</h2><table>{"".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in model if v is not None)}
<tr><th>universal</th><td>{e(_version())}</td></tr></table>
<h2>Timings</h2><table>{"".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in timings)}</table>
{f"<h2>Input warnings</h2><ul>{warnings_}</ul>" if warnings_ else ""}
</body></html>
"""


def _num(value: Any, ndigits: int) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "—"
    return "—" if not np.isfinite(v) else f"{v:.{ndigits}f}"


def _key_slices(seg: Any, size: int = 384) -> list[tuple[str, int, str]]:
    """(view, index, base64 PNG) of the axial, coronal and sagittal slices holding the most segmented voxels
    (the middle slices when nothing was found), masks overlaid in the taxonomy colours."""
    from PIL import Image

    from universal import viz

    masks = {n: m for n, m in seg.masks.items() if np.any(m)}
    union = np.zeros(seg.volume.shape, bool)
    for m in masks.values():
        union |= m
    out = []
    for view, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        other = tuple(a for a in range(3) if a != axis)
        counts = union.sum(axis=other)
        k = int(np.argmax(counts)) if counts.any() else seg.volume.shape[axis] // 2
        img = viz.slice_overlay(seg.volume.array, masks, view, k, spacing=seg.volume.spacing).square()
        pic = Image.fromarray(img)
        pic.thumbnail((size, size))
        buf = _bytes_io.BytesIO()
        pic.save(buf, format="PNG", optimize=True)
        out.append((view, k, base64.b64encode(buf.getvalue()).decode("ascii")))
    return out


WRITERS: dict[str, Callable[[Any, Path], Export]] = {
    "dicom-seg": write_dicom_seg,
    "rtstruct": write_rtstruct,
    "seg.nrrd": write_seg_nrrd,
    "report": write_report,
}
"""Format → its writer ``writer(segmentation, folder) -> Export`` (``nifti`` is written by
``Segmentation._write_nifti``, where it always was)."""


def export_bytes(seg: Any, fmt: str) -> bytes:
    """The bytes of one format's single file (``dicom-seg``, ``rtstruct``, ``seg.nrrd``, ``report``), written by
    its writer into a temporary folder (the dashboard's downloads).

    Raises:
        InputError: An unknown or multi-file format, a DICOM format for a non-DICOM input, or nothing written
            (every class empty).
    """
    import tempfile

    (fmt,) = parse_formats([fmt])
    if len(FILE_NAMES[fmt]) != 1 or fmt == "nifti":
        raise InputError(f"{fmt} is not a single file; choose one of dicom-seg, rtstruct, seg.nrrd, report.")
    with tempfile.TemporaryDirectory(prefix="universal-export-") as tmp:
        done = WRITERS[fmt](seg, Path(tmp))
        if not done.files:
            raise InputError(" ".join(done.notes) or f"{fmt}: nothing was written.")
        return (Path(tmp) / done.files[0]).read_bytes()
