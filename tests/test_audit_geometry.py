"""Audit of how CT geometry is read and written back (universal.io): each test FAILS today and names its bug.

House rule under test: a tool may refuse an input, never answer wrongly in silence.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from universal import io
from universal.errors import InputError, InputWarning


def _ct(shape=(12, 10, 8)) -> np.ndarray:
    arr = np.full(shape, -1000, np.int16)
    arr[3:9, 2:8, 2:6] = 40
    return arr


def _load_recording(path: Path):
    """(volume or None, InputError or None, InputWarning messages)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            vol, err = io.load_volume(path), None
        except InputError as exc:
            vol, err = None, exc
    return vol, err, [str(w.message) for w in rec if issubclass(w.category, InputWarning)]


# ------------------------------------------------------------------------------------------ NIfTI qform vs sform
def _qform_sform_file(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    q = np.diag([-1.0, -1.0, 2.0, 1.0])
    q[:3, 3] = [10, 20, 30]
    s = q.copy()
    s[2, 3] = 60.0  # the sform puts the volume 30 mm higher than the qform
    img = nib.Nifti1Image(_ct(), None)
    img.set_qform(q, code=1)
    img.set_sform(s, code=1)
    path = tmp_path / "qs.nii.gz"
    nib.save(img, path)
    return path, q, s


def test_mask_written_back_keeps_the_inputs_qform(tmp_path: Path) -> None:
    # BUG 1 (NIfTI qform != sform: save_mask writes the sform into the qform too, so a qform reader places the
    # mask 30 mm away from the CT it was made on; io.py _write_image set_qform(affine, ...))
    # fixed: the source qform is kept in meta['qform'] and written back into the mask's qform (io._nifti_geometry,
    # _write_image)
    path, q, _ = _qform_sform_file(tmp_path)
    vol, err, _ = _load_recording(path)
    assert err is None
    out = io.save_mask(vol.array > 0, vol, tmp_path / "mask.nii.gz")
    mask = nib.load(out)
    assert int(mask.header["qform_code"]) == 1
    np.testing.assert_allclose(mask.get_qform(), q, atol=1e-4)


def test_disagreeing_qform_and_sform_are_reported(tmp_path: Path) -> None:
    # BUG 1 (NIfTI qform != sform: the sform wins, as in nibabel and ITK, but nothing tells the user that the file
    # holds two geometries 30 mm apart; io.py _nifti_notes only looks at codes 0 and pixdim)
    # fixed: an InputWarning says the qform and sform disagree and that the sform is used (io._nifti_geometry)
    path, _, _ = _qform_sform_file(tmp_path)
    vol, err, msgs = _load_recording(path)
    assert err is not None or any("qform" in m and "sform" in m for m in msgs), msgs


# ------------------------------------------------------------------------------------------ DICOM slice drift
def _write_dicom_series(folder: Path, zs: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k, z in enumerate(zs):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = CTImageStorage, "CT", 1, k + 1
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        pixels = np.full((8, 8), -1000, np.int16)
        pixels[2:6, 2:6] = k  # each slice holds its own index
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"s{k:03d}.dcm", enforce_file_format=True)


def test_dicom_slices_drifting_within_the_gap_tolerance_are_not_misplaced(tmp_path: Path) -> None:
    # BUG 2 (DICOM uneven spacing: each gap is within UNIFORM_GAP_TOLERANCE of the median, so the stack is taken as
    # even, but the errors add up: slice 50 lies 1.2 mm from where the even grid puts it, without a word;
    # io.py _slice_grid compares single gaps, never the positions with the fitted grid)
    # fixed: positions drifting from a straight line are resampled onto an even grid, with a warning (io._drift_grid)
    gaps = [1.024] * 50 + [0.976] * 49
    zs = np.concatenate([[0.0], np.cumsum(gaps)])
    _write_dicom_series(tmp_path / "series", zs)
    vol, err, msgs = _load_recording(tmp_path / "series")
    if err is not None or msgs:
        return  # refused, or said: allowed
    k = int(np.flatnonzero(vol.array[4, 4, :] == 50)[0])
    z = float((vol.affine @ [4, 4, k, 1])[2])
    assert abs(z - zs[50]) < 0.25, f"slice 50 is at z={zs[50]:.2f} mm in the files, {z:.2f} mm in the volume"


# ------------------------------------------------------------------------------------------ NRRD space
def _write_nrrd(path: Path, geometry: str) -> None:
    arr = _ct()
    header = (
        f"NRRD0004\ntype: int16\ndimension: 3\nsizes: {' '.join(str(s) for s in arr.shape)}\n{geometry}"
        "kinds: domain domain domain\nendian: little\nencoding: raw\n\n"
    )
    path.write_bytes(header.encode() + arr.astype("<i2").tobytes(order="F"))


_DIRECTIONS = "space directions: (1,0,0) (0,1,0) (0,0,2)\nspace origin: (10,20,30)\n"


@pytest.mark.parametrize(
    "geometry",
    [f"space: scanner-xyz\n{_DIRECTIONS}", f"space: 3D-right-handed\n{_DIRECTIONS}",
     f"space dimension: 3\n{_DIRECTIONS}", "spacings: 1 1 2\n"],
    ids=["scanner-xyz", "3D-right-handed", "space-dimension", "spacings-only"],
)  # fmt: skip
def test_nrrd_without_patient_axes_is_not_read_as_lps_silently(tmp_path: Path, geometry: str) -> None:
    # BUG 3 (NRRD without patient axes: SimpleITK takes a scanner-xyz / 3D-right-handed / "space dimension" /
    # "spacings"-only header as LPS and the loader says nothing, while a NIfTI without orientation warns "left
    # and right may be swapped"; io.py load_volume / _sitk_to_numpy never look at the NRRD "space" field)
    # fixed: a NRRD whose space names no patient axes warns 'no patient orientation ... left and right may be swapped'
    # (io._nrrd_notes)
    path = tmp_path / "ct.nrrd"
    _write_nrrd(path, geometry)
    vol, err, msgs = _load_recording(path)
    assert err is not None or any("orientation" in m or "left" in m for m in msgs), msgs


def test_nrrd_with_patient_axes_is_read_right(tmp_path: Path) -> None:
    # control (passes today): a left-anterior-superior NRRD lands at the RAS position its header gives
    path = tmp_path / "ct.nrrd"
    _write_nrrd(path, f"space: left-anterior-superior\n{_DIRECTIONS}")
    vol, err, msgs = _load_recording(path)
    assert err is None and not msgs
    np.testing.assert_allclose(vol.source.original_affine[:3, 3], [-10, 20, 30])
    np.testing.assert_allclose(vol.source.original_affine[:3, 0], [-1, 0, 0])


# ------------------------------------------------------------------------------------------ sheared affine
def test_sheared_nifti_is_not_called_merely_oblique(tmp_path: Path) -> None:
    # BUG 4 (NIfTI sform with shear: ITK refuses it ("only supports orthonormal direction cosines"); the loader
    # accepts it with "oblique voxel axes ... the affine keeps the true geometry", though the grid is sheared and
    # preprocessing resamples it as if orthogonal (column norms as spacing); io.py _orientation)
    # fixed: sheared voxel axes are refused with one line: resample the file to an orthogonal grid (io._orientation)
    s = np.diag([-1.0, -1.0, 2.0, 1.0])
    s[0, 2] = 0.5  # x moves 0.5 mm per slice
    path = tmp_path / "ct.nii.gz"  # (a name without "shear" in it)
    nib.save(nib.Nifti1Image(_ct(), s), path)
    vol, err, msgs = _load_recording(path)
    assert err is not None or any("shear" in m for m in msgs), msgs


# ------------------------------------------------------------------------------------------ NIfTI without orientation
def test_mask_of_a_nifti_without_orientation_matches_it_in_itk(tmp_path: Path) -> None:
    # BUG 5 (qform_code = sform_code = 0: save_mask writes codes 1 with nibabel's fallback affine, so ITK readers
    # (ITK-SNAP, 3D Slicer) show the CT at origin 0 with identity axes and its mask flipped front/back and
    # shifted; io.py _write_image "if qcode == 0 and scode == 0: qcode = scode = 1")
    # fixed: codes 0 stay 0 in the mask, so every reader places it like the CT (io._write_image)
    import SimpleITK as sitk

    img = nib.Nifti1Image(_ct(), np.diag([1.5, 1.5, 3.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    assert int(nib.load(path).header["qform_code"]) == int(nib.load(path).header["sform_code"]) == 0
    vol, err, _ = _load_recording(path)
    assert err is None
    out = io.save_mask(vol.array > 0, vol, tmp_path / "mask.nii.gz")
    ct, mask = sitk.ReadImage(str(path)), sitk.ReadImage(str(out))
    np.testing.assert_allclose(mask.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), ct.GetDirection(), atol=1e-6)


# ------------------------------------------------------------------------------------------ DICOM dropped slices
def test_dicom_slices_closer_than_the_series_spacing_are_not_dropped_silently(tmp_path: Path) -> None:
    # BUG 6 (DICOM uneven spacing: 20 gaps of 1 mm then 30 of 2 mm; the median gap (2 mm) becomes the grid and
    # 10 of the 51 slices are left out, while the warning says "0 slice(s) linearly interpolated" and never that
    # slices were dropped; io.py _slice_grid)
    # fixed: slices the interpolation would leave out are refused, naming how many: pass one stack
    # (io._check_left_out)
    zs = np.concatenate([[0.0], np.cumsum([1.0] * 20 + [2.0] * 30)])
    _write_dicom_series(tmp_path / "series", zs)
    vol, err, msgs = _load_recording(tmp_path / "series")
    if err is not None:
        return  # refused: allowed
    kept = set(np.unique(vol.array[4, 4, :]).astype(int).tolist())
    dropped = sorted(set(range(len(zs))) - kept)
    assert not dropped or any("left out" in m or "dropped" in m for m in msgs), (dropped, msgs)


# ------------------------------------------------------------------------------------------ NIfTI spatial units
@pytest.mark.parametrize(("unit", "scale"), [("meter", 1e-3), ("micron", 1e3)])
def test_nifti_spatial_units_are_honoured(tmp_path: Path, unit: str, scale: float) -> None:
    # BUG 7 (NIfTI xyzt_units ignored: a header saying 0.0008 m (= 0.8 mm, as ITK reads it) loads silently as
    # 0.0008 mm voxels (prepare() then makes a 1x1x1 grid; volumes in mL 1e9 too small); 800 micron is refused as
    # "the voxel size in the header is wrong"; io.py _read_nifti uses img.affine as mm)
    # fixed: metres and microns are scaled to mm (io.NIFTI_UNITS_MM, _nifti_geometry)
    img = nib.Nifti1Image(_ct((40, 40, 20)), np.diag([0.8 * scale, 0.8 * scale, 2.0 * scale, 1.0]))
    img.header.set_xyzt_units(unit)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    vol, err, msgs = _load_recording(path)
    if err is not None:
        assert unit in str(err) or "units" in str(err), str(err)  # a refusal must name the real cause
        return
    np.testing.assert_allclose(vol.spacing, (0.8, 0.8, 2.0), rtol=1e-5)


# ------------------------------------------------------------------------------------------ controls of the fixes
def test_drifting_dicom_slices_are_resampled_where_they_lie(tmp_path: Path) -> None:
    # fixed BUG 2: every output slice holds the files' slices linearly interpolated at its own position
    zs = np.concatenate([[0.0], np.cumsum([1.024] * 50 + [0.976] * 49)])
    _write_dicom_series(tmp_path / "series", zs)
    vol, err, msgs = _load_recording(tmp_path / "series")
    assert err is None and any("drift" in m and "s050.dcm lies +1.19 mm" in m for m in msgs), msgs
    z = (vol.affine @ np.array([[4, 4, k, 1] for k in range(vol.shape[2])]).T)[2]
    np.testing.assert_allclose(vol.array[4, 4, :], np.interp(z, zs, np.arange(len(zs))), atol=1e-3)


def test_jittered_dicom_positions_still_load(tmp_path: Path) -> None:
    # fixed BUG 6 must not refuse positions rounded to 0.1 mm (uneven gaps, but every slice is used)
    zs = np.round(np.arange(30) * 0.625, 1)
    _write_dicom_series(tmp_path / "series", zs)
    vol, err, msgs = _load_recording(tmp_path / "series")
    assert err is None and vol.shape[2] >= len(zs) and any("unevenly spaced" in m for m in msgs), (err, msgs)


def test_mixed_slice_spacings_are_refused_naming_how_many(tmp_path: Path) -> None:
    # fixed BUG 6: one line with the count, an example file and what to do
    _write_dicom_series(tmp_path / "series", np.concatenate([[0.0], np.cumsum([1.0] * 20 + [2.0] * 30)]))
    with pytest.raises(InputError, match=r"10 of the 51 slices \(e\.g\. s001\.dcm at 1\.00 mm\).*pass one stack"):
        io.load_volume(tmp_path / "series")


def test_agreeing_qform_and_sform_say_nothing_and_stay(tmp_path: Path) -> None:
    # fixed BUG 1 control: no warning when the two agree; the mask carries the same geometry in both
    a = np.diag([-1.0, -1.0, 2.0, 1.0])
    a[:3, 3] = [10, 20, 30]
    nib.save(nib.Nifti1Image(_ct(), a), tmp_path / "ct.nii.gz")  # nibabel sets qform and sform (codes 1 and 2)
    vol, err, msgs = _load_recording(tmp_path / "ct.nii.gz")
    assert err is None and not msgs, msgs
    mask = nib.load(io.save_mask(vol.array > 0, vol, tmp_path / "mask.nii.gz"))
    np.testing.assert_allclose(mask.get_qform(), a, atol=1e-4)
    np.testing.assert_allclose(mask.get_sform(), a, atol=1e-4)


def test_mask_of_a_nifti_in_metres_matches_it_in_itk(tmp_path: Path) -> None:
    # fixed BUG 7 control: the mask is written in mm, where an ITK reader finds the CT it was made on
    import SimpleITK as sitk

    a = np.diag([-0.0008, 0.0008, 0.002, 1.0])
    a[:3, 3] = [0.01, 0.02, 0.03]
    img = nib.Nifti1Image(_ct(), a)
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "ct.nii.gz")
    vol, err, _ = _load_recording(tmp_path / "ct.nii.gz")
    assert err is None
    ct = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    mask = sitk.ReadImage(str(io.save_mask(vol.array > 0, vol, tmp_path / "mask.nii.gz")))
    np.testing.assert_allclose(mask.GetSpacing(), ct.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(mask.GetOrigin(), ct.GetOrigin(), atol=1e-4)


def test_sheared_axes_are_refused_with_what_to_do(tmp_path: Path) -> None:
    # fixed BUG 4: one line naming the shear and the way out
    s = np.diag([-1.0, -1.0, 2.0, 1.0])
    s[0, 2] = 0.5
    nib.save(nib.Nifti1Image(_ct(), s), tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match=r"sheared voxel axes .*14\.0° off a right angle.*orthogonal grid") as exc:
        io.load_volume(tmp_path / "ct.nii.gz")
    assert "\n" not in str(exc.value)
