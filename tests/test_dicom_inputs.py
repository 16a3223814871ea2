"""DICOM inputs as clinics send them (``universal.io.load_volume`` on folders, zips and multi-frame files):
compressed transfer syntaxes (exact round trips), enhanced multi-frame CT, several series (``series=``,
``--series``, the dashboard's choice), damaged and missing slices, gantry tilt, mixed slices, other modalities,
colour pixels and a missing rescale.

The inputs are made here from the real 20-slice series in ``../shared/data/ts_dicom_series/dicom`` (decoded once,
subsampled to the central 64 × 64 pixels (every 4th of 256) with the geometry kept exact); the makers are shared with
``tests/test_bad_inputs_dicom.py``.
"""

from __future__ import annotations

import copy
import functools
import math
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from badinput import tiny_checkpoint

from universal.errors import InputError, InputWarning
from universal.io import load_volume

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ts_dicom_series" / "dicom"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1000"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2000"
SECOND_UID = "1.2.826.0.1.3680043.8.498.3000"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
STEP = 4  # subsampling of the slices (pixel spacing × 4, positions exact)
CROP = slice(
    128, 384
)  # the central 256 × 256 pixels (250 mm) of the 512 × 512 slices: a quick sliding window

Edit = Callable[[int, Any], Any]


# ------------------------------------------------------------------------------------------------ makers
def _need_source() -> Path:
    if not SOURCE.is_dir():
        pytest.skip(f"{SOURCE} is absent: the DICOM tests need ../shared beside the project")
    return SOURCE


@functools.lru_cache(maxsize=2)
def _decoded(step: int) -> tuple[Any, ...]:
    """The real slices, decoded, with UIDs set, cropped to :data:`CROP` and subsampled by ``step`` (geometry kept
    exact: the position of the first pixel moved, the pixel spacing multiplied)."""
    import pydicom

    out = []
    for i, f in enumerate(sorted(_need_source().iterdir())):
        ds = pydicom.dcmread(str(f))
        ds.decompress()
        pixels = ds.pixel_array[CROP, CROP][::step, ::step]
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
        iop = np.array(ds.ImageOrientationPatient, float)
        first = np.array(ds.ImagePositionPatient, float) + CROP.start * (iop[:3] * col_mm + iop[3:] * row_mm)
        ds.ImagePositionPatient = [float(v) for v in first]
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [row_mm * step, col_mm * step]
        ds.SOPClassUID = CT_IMAGE
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        ds.StudyInstanceUID = STUDY_UID
        ds.SeriesInstanceUID = SERIES_UID
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        out.append(ds)
    return tuple(out)


def slices(step: int = STEP) -> list[Any]:
    """Fresh copies of the (subsampled) real slices, in file order (positions descending)."""
    return [copy.deepcopy(ds) for ds in _decoded(step)]


def _gdcm_transcode(path: Path, syntax: str) -> None:
    """Re-encode a file in place with GDCM (pydicom has no JPEG-lossless / JPEG-LS encoder)."""
    gdcm = pytest.importorskip("gdcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), path
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), path


def encode(path: Path, ds: Any, syntax: str | None) -> Path:
    """Save ``ds`` at ``path`` in transfer syntax ``syntax`` (``None``: as it is)."""
    from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    ds.save_as(str(path), enforce_file_format=True)
    if syntax not in (None, RLELossless, JPEG2000Lossless):
        _gdcm_transcode(path, syntax)
    return path


def write_series(
    folder: Path,
    edit: Edit | None = None,
    *,
    step: int = STEP,
    uid: str = SERIES_UID,
    number: int | None = 2,
    description: str | None = None,
    syntax: str | None = None,
    prefix: str = "s",
) -> Path:
    """The series as files ``{prefix}00.dcm``... in ``folder``; ``edit(i, ds)`` may change a slice or return
    ``None`` to leave it out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(slices(step)):
        ds.SeriesInstanceUID = uid
        if number is None:
            del ds.SeriesNumber
        else:
            ds.SeriesNumber = number
        if description is not None:
            ds.SeriesDescription = description
        if edit is not None and (ds := edit(i, ds)) is None:
            continue
        encode(folder / f"{prefix}{i:02d}.dcm", ds, syntax)
    return folder


def _item(**kw: Any) -> Any:
    from pydicom.dataset import Dataset

    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def enhanced(
    path: Path, *, step: int = STEP, per_frame_orientation: bool = False, positions: bool = True
) -> Path:
    """One Enhanced CT Image file holding the series' slices as frames (shared and per-frame functional groups)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dss = slices(step)
    first = dss[0]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = STUDY_UID, generate_uid(), 7
    ds.Modality, ds.SeriesDescription = "CT", "enhanced"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = (
        first.Rows,
        first.Columns,
        1,
        "MONOCHROME2",
    )
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, first.BitsStored, first.HighBit
    ds.PixelRepresentation, ds.NumberOfFrames = first.PixelRepresentation, len(dss)
    shared = _item(
        PixelMeasuresSequence=Sequence(
            [_item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)]
        ),
        PixelValueTransformationSequence=Sequence(
            [
                _item(
                    RescaleIntercept=first.RescaleIntercept, RescaleSlope=first.RescaleSlope, RescaleType="HU"
                )
            ]
        ),
    )
    if not per_frame_orientation:
        shared.PlaneOrientationSequence = Sequence(
            [_item(ImageOrientationPatient=first.ImageOrientationPatient)]
        )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for i, d in enumerate(dss):
        fg = _item(FrameContentSequence=Sequence([_item(InStackPositionNumber=i + 1)]))
        if positions:
            fg.PlanePositionSequence = Sequence([_item(ImagePositionPatient=d.ImagePositionPatient)])
        if per_frame_orientation:
            fg.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=d.ImageOrientationPatient)])
        per.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = np.stack([d.pixel_array for d in dss]).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def setting(**values: Any) -> Edit:
    """An edit setting DICOM attributes on every slice."""

    def edit(i: int, ds: Any) -> Any:
        for k, v in values.items():
            setattr(ds, k, v)
        return ds

    return edit


def on_slice(k: int, **values: Any) -> Edit:
    """An edit setting DICOM attributes on slice ``k`` only."""
    change = setting(**values)
    return lambda i, ds: change(i, ds) if i == k else ds


def dropping(*ks: int) -> Edit:
    return lambda i, ds: None if i in ks else ds


def without_rescale(i: int, ds: Any) -> Any:
    del ds.RescaleSlope, ds.RescaleIntercept
    return ds


def stored_as_hu(i: int, ds: Any) -> Any:
    """Signed pixels holding HU themselves, and no rescale (an export that applied it and dropped the tags)."""
    hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
    ds.PixelRepresentation = 1
    ds.PixelData = hu.astype(np.int16).tobytes()
    return without_rescale(i, ds)


def as_rgb(i: int, ds: Any) -> Any:
    grey = (ds.pixel_array // 10).clip(0, 255).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.stack([grey] * 3, -1).tobytes()
    return ds


def tilted(deg: float = 15.0) -> Edit:
    """Slices tilted about the patient's left-right axis while their positions still step along z (a gantry tilt)."""
    a = math.radians(deg)
    return setting(ImageOrientationPatient=[1, 0, 0, 0, math.cos(a), -math.sin(a)], GantryDetectorTilt=deg)


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def scramble_header(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[132:1500] = bytes((i * 37) % 256 for i in range(1368))
    path.write_bytes(bytes(data))
    return path


def scramble_dataset(path: Path) -> Path:
    """Garbage right after an intact file meta group (the data set itself damaged)."""
    data = bytearray(path.read_bytes())
    start = 132 + 12 + int.from_bytes(data[140:144], "little")  # after (0002,0000) UL and the group it counts
    data[start : start + 1200] = bytes((i * 37) % 256 for i in range(1200))
    path.write_bytes(bytes(data))
    return path


def two_series(folder: Path) -> Path:
    """The series (number 2, 20 slices) and a second one (number 3, 'thin subset', the first 6 slices)."""
    write_series(folder, prefix="a")
    write_series(
        folder, dropping(*range(6, 20)), uid=SECOND_UID, number=3, description="thin subset", prefix="b"
    )
    return folder


def zip_folder(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"export/{f.relative_to(folder)}")
    return dest


def load_quiet(path: Path, **kw: Any):
    """``load_volume`` and the InputWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = load_volume(path, **kw)
    return vol, [str(w.message) for w in caught if issubclass(w.category, InputWarning)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return write_series(tmp_path_factory.mktemp("plain") / "ct")


@pytest.fixture(scope="module")
def reference(plain: Path):
    vol, msgs = load_quiet(plain)
    assert msgs == []
    return vol


# ------------------------------------------------------------------------------------------------ compression
@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.5",  # RLE Lossless (pydicom's own codec / pylibjpeg-rle)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (python-gdcm)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless process 14 (python-gdcm)
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless (python-gdcm)
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless (pylibjpeg-openjpeg)
    ],
    ids=["rle", "jpeg-lossless-sv1", "jpeg-lossless", "jpeg-ls", "jpeg2000"],
)
def test_compressed_series_load_to_the_same_hu(syntax: str, reference, tmp_path: Path) -> None:
    import pydicom

    folder = write_series(tmp_path / "c", syntax=syntax)
    assert str(pydicom.dcmread(str(folder / "s00.dcm")).file_meta.TransferSyntaxUID) == syntax
    vol, msgs = load_quiet(folder)
    assert msgs == []
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_array_equal(vol.affine, reference.affine)
    assert vol.source.meta["transfer_syntax"] == [pydicom.uid.UID(syntax).name]


def test_real_jpeg2000_series_matches_its_decoded_copy(tmp_path: Path) -> None:
    """The shared series is itself JPEG 2000 (no SeriesInstanceUID): decoded and re-saved, it is the same HU."""
    import pydicom

    decoded = tmp_path / "raw"
    decoded.mkdir()
    for f in sorted(_need_source().iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.decompress()
        ds.save_as(str(decoded / f.name))
    original, msgs = load_quiet(SOURCE)
    assert (
        msgs == []
        and original.shape == (512, 512, 20)
        and original.spacing == pytest.approx((0.9765625,) * 2 + (2.0,))
    )
    again, _ = load_quiet(decoded)
    np.testing.assert_array_equal(again.array, original.array)
    np.testing.assert_array_equal(again.affine, original.affine)


def test_missing_decoder_is_one_line_naming_syntax_and_package(
    plain: Path, tmp_path: Path, monkeypatch
) -> None:
    import pydicom.pixels

    folder = write_series(tmp_path / "jll", syntax="1.2.840.10008.1.2.4.70")

    class Missing:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Missing())
    with pytest.raises(InputError) as info:
        load_volume(folder)
    text = str(info.value)
    assert "\n" not in text
    assert "JPEG Lossless" in text and "1.2.840.10008.1.2.4.70" in text and "pip install python-gdcm" in text


def test_missing_decoder_recognised_from_pydicom_error(tmp_path: Path, monkeypatch) -> None:
    """pydicom 2.x has no ``get_decoder``: its 'missing dependencies' error gives the same message."""
    import pydicom.dataset

    from universal import io

    folder = write_series(tmp_path / "j2k", syntax="1.2.840.10008.1.2.4.90")
    monkeypatch.setattr(io, "_check_decoder", lambda *a: None)

    def fail(self):
        raise RuntimeError("The following handlers are available to decode the pixel data however they are "
                           "missing required dependencies: pylibjpeg")  # fmt: skip

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(fail))
    with pytest.raises(InputError, match=r"JPEG 2000.*pip install pylibjpeg pylibjpeg-openjpeg"):
        load_volume(folder)


# ------------------------------------------------------------------------------------------------ multi-frame
@pytest.mark.parametrize(
    "per_frame_orientation", [False, True], ids=["shared-orientation", "per-frame-orientation"]
)
def test_enhanced_multiframe_file_and_folder(per_frame_orientation: bool, reference, tmp_path: Path) -> None:
    path = enhanced(tmp_path / "mf" / "ct.dcm", per_frame_orientation=per_frame_orientation)
    for source in (path, path.parent):
        vol, msgs = load_quiet(source)
        assert msgs == []
        np.testing.assert_array_equal(vol.array, reference.array)
        np.testing.assert_array_equal(vol.affine, reference.affine)
        assert vol.source.meta["enhanced"] is True and vol.source.meta["n_files"] == 1
    assert vol.source.meta["n_slices"] == 20 and vol.source.meta["series_number"] == 7


def test_enhanced_without_positions_is_refused(tmp_path: Path) -> None:
    path = enhanced(tmp_path / "mf" / "ct.dcm", positions=False)
    with pytest.raises(InputError, match=r"ct\.dcm \(frame 1\) has no \(valid\) ImagePositionPatient"):
        load_volume(path)


# ------------------------------------------------------------------------------------------------ damaged, missing
@pytest.mark.parametrize(
    "damage",
    [truncate, scramble_header, scramble_dataset],
    ids=["truncated", "scrambled-header", "scrambled-dataset"],
)
def test_damaged_slice_is_refused_naming_the_file(damage, tmp_path: Path) -> None:
    folder = write_series(tmp_path / "ct")
    damage(folder / "s07.dcm")
    with pytest.raises(
        InputError, match=r"the DICOM file s07\.dcm is damaged.*different grid.*delete that file"
    ):
        load_volume(folder)


def test_damaged_slice_in_a_zip_is_named_as_in_the_archive(tmp_path: Path) -> None:
    folder = write_series(tmp_path / "ct")
    truncate(folder / "s03.dcm")
    with pytest.raises(InputError, match=r"case\.zip: the DICOM file s03\.dcm is damaged"):
        load_volume(zip_folder(folder, tmp_path / "case.zip"))


def test_missing_slice_keeps_the_series_grid_with_a_warning(reference, tmp_path: Path) -> None:
    vol, msgs = load_quiet(write_series(tmp_path / "ct", dropping(9)))
    assert vol.shape == reference.shape and vol.spacing == pytest.approx(reference.spacing)
    np.testing.assert_array_equal(vol.affine, reference.affine)
    [msg] = msgs
    assert "series spaced 2.00 mm" in msg and "4.00 mm between s10.dcm" in msg and "and s08.dcm" in msg
    assert "20 slices, 2.00 mm" in msg and "1 slice(s) linearly interpolated" in msg
    [k] = vol.source.meta["interpolated_slices"]
    assert k == 10  # file order runs from head to feet: s09 is the 11th slice from the feet
    # the RAS+ array runs feet to head along z: slice k is the mean of its neighbours, every other slice is exact
    np.testing.assert_allclose(
        vol.array[:, :, k], (reference.array[:, :, k - 1] + reference.array[:, :, k + 1]) / 2
    )
    others = [i for i in range(20) if i != k]
    np.testing.assert_array_equal(vol.array[:, :, others], reference.array[:, :, others])


def test_too_large_a_gap_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"gap of 16\.00 mm between s12\.dcm.*about 7 slices are missing"):
        load_volume(write_series(tmp_path / "ct", dropping(*range(5, 12))))


def test_duplicate_position_is_refused(tmp_path: Path) -> None:
    pos = slices()[4].ImagePositionPatient
    with pytest.raises(InputError, match=r"s0[45]\.dcm and s0[45]\.dcm lie at the same position"):
        load_volume(write_series(tmp_path / "ct", on_slice(5, ImagePositionPatient=pos)))


# ------------------------------------------------------------------------------------------------ geometry
def test_gantry_tilt_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"stacked at 15\.0° .*gantry tilt, GantryDetectorTilt 15°.*sheared"):
        load_volume(write_series(tmp_path / "ct", tilted(15.0)))


def test_oblique_but_untilted_series_loads(reference, tmp_path: Path) -> None:
    """Slices tilted *and* positioned along their own normal are an oblique volume, not a gantry tilt."""
    a = math.radians(10)
    normal = np.array([0.0, math.sin(a), math.cos(a)])  # row (1, 0, 0) × column (0, cos, -sin)
    origin = np.array(slices()[-1].ImagePositionPatient, float)

    def edit(i: int, ds: Any) -> Any:
        ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(a), -math.sin(a)]
        ds.ImagePositionPatient = list(origin + (19 - i) * 2.0 * normal)
        return ds

    vol, msgs = load_quiet(write_series(tmp_path / "ct", edit))
    assert vol.shape == reference.shape and any("oblique" in m for m in msgs)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            on_slice(5, PixelSpacing=[3.0, 3.0]),
            r"do not share one pixel spacing: s00\.dcm has .* but s05\.dcm has \[3, 3\]",
        ),
        (
            on_slice(5, ImageOrientationPatient=[1, 0, 0, 0, 0.9848078, -0.1736482]),
            r"do not share one orientation: s00\.dcm has ImageOrientationPatient \[1, 0, 0, 0, 1, 0\] but s05\.dcm",
        ),
        (
            lambda i, ds: (delattr(ds, "ImagePositionPatient"), ds)[1],
            r"s00\.dcm has no \(valid\) ImagePositionPatient",
        ),
    ],
    ids=["pixel-spacing", "orientation", "no-position"],
)
def test_mixed_or_missing_geometry_is_refused_naming_files(edit: Edit, match: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=match):
        load_volume(write_series(tmp_path / "ct", edit))


def test_mixed_image_sizes_are_refused(tmp_path: Path) -> None:
    folder = write_series(tmp_path / "ct", dropping(5))
    write_series(tmp_path / "small", lambda i, ds: ds if i == 5 else None, step=8)
    shutil.copy(tmp_path / "small" / "s05.dcm", folder / "s05.dcm")
    with pytest.raises(InputError, match=r"differ in size: s00\.dcm is 64×64 but s05\.dcm is 32×32"):
        load_volume(folder)


def test_localizer_in_the_series_is_left_out(reference, tmp_path: Path) -> None:
    folder = write_series(tmp_path / "ct")
    scout = slices()[0]
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    encode(folder / "scout.dcm", scout, None)
    vol, msgs = load_quiet(folder)
    np.testing.assert_array_equal(vol.array, reference.array)
    assert any("left out 1 LOCALIZER image(s) of the series (scout.dcm" in m for m in msgs)


def test_non_dicom_files_and_subfolders(reference, tmp_path: Path) -> None:
    """A readme and a split of the series over two sub-folders (as DICOMDIR exports do) read as one series."""
    folder = tmp_path / "export"
    write_series(folder / "A", lambda i, ds: ds if i < 10 else None)
    write_series(folder / "B", lambda i, ds: ds if i >= 10 else None)
    (folder / "README.txt").write_text("exported by PACS")
    vol, msgs = load_quiet(folder)
    assert msgs == []
    np.testing.assert_array_equal(vol.array, reference.array)


def test_dicomdir_and_files_without_preamble(reference, tmp_path: Path) -> None:
    """A DICOMDIR beside the slices is no image; slices saved without preamble / file meta (old ACR-NEMA-style
    exports) still read, in the encoding they were written in."""
    from pydicom.dataset import Dataset, FileMetaDataset

    folder = tmp_path / "export"
    folder.mkdir()
    for i, ds in enumerate(slices()):
        del ds.file_meta
        ds.save_as(
            str(folder / f"IM{i:04d}"), enforce_file_format=False, implicit_vr=i % 2 == 0, little_endian=True
        )
    dicomdir = Dataset()
    dicomdir.FileSetID = "EXPORT"
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.5000"
    dicomdir.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    dicomdir.save_as(str(folder / "DICOMDIR"), enforce_file_format=True)
    vol, msgs = load_quiet(folder)
    assert msgs == []
    np.testing.assert_array_equal(vol.array, reference.array)


def test_lossy_flag_warns_and_missing_photometric_is_grey(reference, tmp_path: Path) -> None:
    def edit(i: int, ds: Any) -> Any:
        ds.LossyImageCompression = "01"
        del ds.PhotometricInterpretation
        return ds

    vol, msgs = load_quiet(write_series(tmp_path / "ct", edit))
    np.testing.assert_array_equal(vol.array, reference.array)
    assert msgs == [
        "ct: the series was lossy-compressed (LossyImageCompression 01): its HU values are approximate."
    ]


# ------------------------------------------------------------------------------------------------ series
def test_several_series_default_warns_with_number_description_and_count(tmp_path: Path) -> None:
    vol, msgs = load_quiet(two_series(tmp_path / "two"))
    assert vol.shape[2] == 20 and vol.source.meta["series_uid"] == SERIES_UID
    [msg] = msgs
    assert f"took {SERIES_UID} (CT, 'CT Body 3.0', 20 slices), series number 2" in msg
    assert f"{SECOND_UID} (CT, 'thin subset', 6 slices), series number 3" in msg and "--series" in msg
    assert [s["n_slices"] for s in vol.source.meta["series"]] == [20, 6]


@pytest.mark.parametrize("series", [SECOND_UID, "3", " 3 "])
def test_series_chosen_by_uid_or_number(series: str, tmp_path: Path) -> None:
    vol, msgs = load_quiet(two_series(tmp_path / "two"), series=series)
    assert vol.shape == (64, 64, 6) and vol.source.meta["series_uid"] == SECOND_UID
    assert not any("DICOM image series" in m for m in msgs)


def test_unknown_or_ambiguous_series_is_refused_listing_them(tmp_path: Path) -> None:
    folder = two_series(tmp_path / "two")
    with pytest.raises(
        InputError, match=r"no DICOM series '9'.*20 slices\), series number 2; .*6 slices\), series number 3"
    ):
        load_volume(folder, series="9")
    write_series(folder, dropping(*range(3, 20)), uid="1.2.826.0.1.3680043.8.498.4000", number=3, prefix="c")
    with pytest.raises(InputError, match=r"series number 3 names 2 series.*give the SeriesInstanceUID"):
        load_volume(folder, series="3")


def test_ct_series_preferred_over_a_larger_mr_series(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_series(folder, setting(Modality="MR"), uid=SECOND_UID, number=5, prefix="m")
    write_series(folder, dropping(*range(10, 20)), prefix="c")
    vol, msgs = load_quiet(folder)
    assert vol.shape[2] == 10 and vol.source.meta["modality"] == "CT"
    assert any(
        "the CT series with the most slices" in m and "(MR, 'CT Body 3.0', 20 slices)" in m for m in msgs
    )
    with pytest.raises(InputError, match=r"is modality MR, not CT \(Modality tag\)"):
        load_volume(folder, series="5")


# ------------------------------------------------------------------------------------------------ not CT, HU
@pytest.mark.parametrize("modality", ["MR", "PT", "OT"])
def test_other_modalities_are_refused(modality: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=rf"is modality {modality}, not CT"):
        load_volume(write_series(tmp_path / "ct", setting(Modality=modality)))


def test_rgb_series_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"s00\.dcm is a colour image \(RGB"):
        load_volume(write_series(tmp_path / "ct", as_rgb))


def test_missing_rescale(reference, tmp_path: Path) -> None:
    raw = write_series(tmp_path / "raw", without_rescale)
    with pytest.raises(
        InputError, match=r"no RescaleSlope/RescaleIntercept, so its Hounsfield units are unknown.*span 0 to"
    ):
        load_volume(raw)
    vol, msgs = load_quiet(raw, rescale=(1, -1024))  # the user vouches for the mapping: no warning
    np.testing.assert_array_equal(vol.array, reference.array)
    assert msgs == [] and vol.source.meta["rescaled"] is False
    vol, msgs = load_quiet(write_series(tmp_path / "hu", stored_as_hu))
    np.testing.assert_array_equal(vol.array, reference.array)
    assert any("no RescaleSlope/RescaleIntercept (HU unknown)" in m and "taken as HU" in m for m in msgs)


def test_rescale_of_each_slice_is_applied(reference, tmp_path: Path) -> None:
    def edit(i: int, ds: Any) -> Any:  # the same HU stored with another intercept on odd slices
        if i % 2:
            ds.PixelData = (ds.pixel_array.astype(np.int32) + 24).astype(np.uint16).tobytes()
            ds.RescaleIntercept = -1048
        return ds

    vol, _ = load_quiet(write_series(tmp_path / "ct", edit))
    np.testing.assert_array_equal(vol.array, reference.array)


def test_partly_missing_rescale_is_refused(tmp_path: Path) -> None:
    edit = lambda i, ds: without_rescale(i, ds) if i == 4 else ds  # noqa: E731
    with pytest.raises(InputError, match=r"s00\.dcm has RescaleSlope/RescaleIntercept but s04\.dcm has none"):
        load_volume(write_series(tmp_path / "ct", edit))


# ------------------------------------------------------------------------------------------------ CLI, dashboard
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", ["liver", "spleen"])


def test_cli_series_option(tiny_ckpt: Path, tmp_path: Path) -> None:
    import nibabel as nib
    from badinput import run_cli

    folder = two_series(tmp_path / "two")
    rc, out, err = run_cli(
        ["segment", str(folder), "-o", str(tmp_path / "out"), "--weights", str(tiny_ckpt), "--series", "3"]
    )
    assert rc == 0, err
    [mask] = sorted((tmp_path / "out").rglob("*liver*.nii.gz"))
    assert nib.load(str(mask)).shape == (64, 64, 6)
    rc, out, err = run_cli(
        ["segment", str(folder), "-o", str(tmp_path / "bad"), "--weights", str(tiny_ckpt), "--series", "nope"]
    )
    assert rc == 2 and "no DICOM series 'nope'" in err and "Traceback" not in err


def test_dashboard_series_choice(tmp_path: Path) -> None:
    from universal import app_logic as al
    from universal import dashboard as dash

    folder = two_series(tmp_path / "two")
    ref = dash.InputRef("path", str(folder))
    record = dash.load_input(ref, al.SessionFolder(), 100, lambda k: None)
    assert record.error is None and record.volume.shape[2] == 20
    assert any("2 DICOM image series" in w for w in record.warnings)
    options, index, label = dash.series_choices(record, ref)
    assert options == [SERIES_UID, SECOND_UID] and index == 0
    assert label(SECOND_UID) == "#3 · thin subset · 6 slices"
    assert dash.with_series(ref, record, SERIES_UID).id == record.id  # the series shown: no second read
    picked = dash.with_series(ref, record, SECOND_UID)
    assert picked.id != record.id
    second = dash.load_input(picked, al.SessionFolder(), 100, lambda k: None)
    assert second.volume.shape[2] == 6
    assert dash.series_choices(second, picked)[1] == 1
    assert dash.with_series(picked, second, SECOND_UID).id == second.id
    assert (
        dash.series_choices(record, dash.InputRef("path", str(tmp_path))) is None
    )  # another input: no choice
    store = {"viewer_slice_axial": 54, "classes": ["liver"]}
    assert dash.after_new_input(store, second, picked) is True and store == {"classes": ["liver"]}
    one = dash.InputRef("path", str(write_series(tmp_path / "one")))
    assert dash.series_choices(dash.load_input(one, al.SessionFolder(), 100, lambda k: None), one) is None


@pytest.mark.app
def test_app_offers_the_series_of_a_folder(tmp_path: Path) -> None:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    folder = two_series(tmp_path / "two")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300).run()
    at.radio(key="source").set_value("Path on the server").run()
    at.text_input(key="server_path").input(str(folder)).run()
    assert not at.exception, [e.value for e in at.exception]
    [box] = [s for s in at.selectbox if s.label == "DICOM series"]
    assert box.options == ["#2 · CT Body 3.0 · 20 slices", "#3 · thin subset · 6 slices"] and box.index == 0
    box.set_value(SECOND_UID).run()
    assert at.session_state["state"].input.volume.shape == (64, 64, 6)
    [box] = [s for s in at.selectbox if s.label == "DICOM series"]
    assert box.value == SECOND_UID
