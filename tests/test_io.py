"""Tests for universal.io: loaders (NIfTI, NRRD, MHA, DICOM folder/zip, DICOM-SEG), RAS+ reorientation, exact
write-back onto the source grid, label alignment, safe zip extraction and the input checks."""

from __future__ import annotations

import gzip
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from universal import io
from universal.errors import InputError, InputWarning
from universal.io import (
    Volume,
    case_name,
    check_ct,
    label_grid,
    load_label,
    load_volume,
    save_label_map,
    save_mask,
    save_volume,
    volume_from_array,
)

# TotalSegmentator v2 ids
SPLEEN, LIVER = 1, 5


# ------------------------------------------------------------------------------------------------ helpers
def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _reorient(data: np.ndarray, affine: np.ndarray, codes: tuple[str, str, str]):
    """RAS data/affine → the same image stored in voxel order ``codes``."""
    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    return apply_orientation(data, ornt), affine @ inv_ornt_aff(ornt, data.shape)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ [*np.argwhere(mask).mean(axis=0), 1.0])[:3]


def _ct_like(shape=(24, 20, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, np.int16)
    hu[4:-4, 4:-4, 2:-2] = rng.integers(-100, 200, size=(shape[0] - 8, shape[1] - 8, shape[2] - 4))
    return hu


@pytest.fixture(scope="module")
def abdomen(shared_data: Path) -> Path:
    return shared_data / "ts_abdomen_3mm"


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "ts_dicom_series" / "dicom"


@pytest.fixture(scope="module")
def dicom_volume(dicom_dir: Path) -> Volume:
    return load_volume(dicom_dir)


@pytest.fixture()
def ail_case(abdomen: Path, tmp_path: Path):
    """The abdomen CT and its labels re-stored in a non-RAS voxel order (A, I, L: permuted and flipped axes)."""
    ct = nib.load(str(abdomen / "ct.nii.gz"))
    lab = nib.load(str(abdomen / "labels_totalseg.nii.gz"))
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    data = np.asarray(ct.dataobj)
    labels = np.asarray(lab.dataobj)
    f_data, f_aff = _reorient(data, ct.affine, ("A", "I", "L"))
    f_lab, _ = _reorient(labels, ct.affine, ("A", "I", "L"))
    assert nib.aff2axcodes(f_aff) == ("A", "I", "L")
    ct_path = _nifti(tmp_path / "ail.nii.gz", f_data, f_aff)
    lab_path = _nifti(tmp_path / "ail_labels.nii.gz", f_lab, f_aff)
    return {"ras": data, "ras_affine": ct.affine, "labels": labels, "file": f_data, "file_labels": f_lab,
            "file_affine": f_aff, "ct": ct_path, "lab": lab_path}  # fmt: skip


# ------------------------------------------------------------------------------------------------ loaders
def test_nifti_loads_ras_hu(abdomen: Path) -> None:
    vol = load_volume(abdomen / "ct.nii.gz")
    assert vol.shape == (122, 101, 30)
    assert vol.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert vol.array.dtype == np.float32 and vol.array.flags.c_contiguous
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert -1100 <= vol.array.min() < -900 and 1000 < vol.array.max() < 3100
    assert vol.name == "ct" and vol.source.format == "nifti"
    assert vol.source.original_shape == (122, 101, 30) and vol.source.meta["warnings"] == []
    assert "ct" in repr(vol) and "nifti" in repr(vol)


def test_lps_nifti_flipped_to_ras(shared_data: Path) -> None:
    path = shared_data / "ts_cta_1p5mm_unlabeled" / "ct.nii.gz"
    vol = load_volume(path)  # speed is measured in bench/, not here (no timed tests)
    img = nib.load(str(path))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    raw = np.asarray(img.dataobj)
    np.testing.assert_array_equal(vol.array, raw[::-1, ::-1, :])
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S") and vol.spacing == pytest.approx((1.5, 1.5, 1.5))
    # same world position of a voxel through both affines
    ijk = np.array([10, 20, 30])
    ras_ijk = [raw.shape[0] - 1 - ijk[0], raw.shape[1] - 1 - ijk[1], ijk[2]]
    np.testing.assert_allclose(img.affine @ [*ijk, 1], vol.affine @ [*ras_ijk, 1], atol=1e-4)


def test_dicom_series_folder(dicom_volume: Volume) -> None:
    vol = dicom_volume
    assert vol.shape == (512, 512, 20)
    assert vol.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert vol.array.min() == -1024 and 1000 < vol.array.max() < 3100  # RescaleIntercept -1024 applied
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    meta = vol.source.meta
    assert vol.source.format == "dicom" and vol.name == "dicom"
    assert meta["modality"] == "CT" and meta["n_slices"] == 20 and meta["rescaled"] is True


def test_dicom_labels_align_with_differently_oriented_nifti(shared_data: Path, dicom_volume: Volume) -> None:
    path = shared_data / "ts_dicom_series" / "labels_totalseg.nii.gz"
    assert nib.aff2axcodes(nib.load(str(path)).affine) != nib.aff2axcodes(dicom_volume.source.original_affine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # same grid after reorientation: no resampling
        lab = load_label(path, like=dicom_volume)
    assert lab.shape == dicom_volume.shape and np.issubdtype(lab.dtype, np.integer)
    liver, spleen = lab == LIVER, lab == SPLEEN
    assert liver.sum() > 1000 and spleen.sum() > 100
    assert 20 < dicom_volume.array[liver].mean() < 120
    assert 20 < dicom_volume.array[spleen].mean() < 150
    # RAS+: the patient's left (spleen) lies at smaller world x than the liver
    assert _world_centroid(spleen, dicom_volume.affine)[0] < _world_centroid(liver, dicom_volume.affine)[0]


def test_nrrd_image_and_label(shared_data: Path) -> None:
    d = shared_data / "radiomics_lung_tumor"
    vol = load_volume(d / "lung1_image.nrrd")
    assert vol.shape == (512, 512, 48) and vol.source.format == "nrrd" and vol.name == "lung1_image"
    assert vol.spacing == pytest.approx((0.5703125, 0.5703125, 5.0))
    assert vol.array.min() == -1024 and nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    lab = load_label(d / "lung1_label.nrrd", like=vol)
    assert set(np.unique(lab)) == {0, 1}
    assert vol.array[lab > 0].mean() > -300  # a solid tumour, not lung parenchyma (about -850 HU)


def test_dicom_three_slices_and_dicom_seg(shared_data: Path) -> None:
    d = shared_data / "dcmqi_liver_3slice"
    with pytest.warns(InputWarning, match="very few voxels"):
        vol = load_volume(d)  # the folder also holds two DICOM-SEG series: they are not image series
    assert vol.shape == (512, 512, 3) and vol.source.meta["modality"] == "CT"
    nrrd = load_label(d / "liver_seg.nrrd", like=vol)
    seg = load_label(d / "liver.dcm", like=vol)  # DICOM-SEG read with pydicom
    np.testing.assert_array_equal(nrrd > 0, seg > 0)
    assert 20 < vol.array[seg > 0].mean() < 120
    with pytest.warns(InputWarning, match="overlap"):
        multi = load_label(d / "partial_overlaps.dcm", like=vol)
    assert set(np.unique(multi)) == {0, 1, 2, 3, 4, 5}


def test_sitk_written_nrrd_and_mha_match_nifti(ail_case, tmp_path: Path) -> None:
    import SimpleITK as sitk

    ref = load_volume(ail_case["ct"])
    img = sitk.ReadImage(str(ail_case["ct"]))
    for suffix, fmt in ((".nrrd", "nrrd"), (".mha", "mha")):
        out = tmp_path / f"ct{suffix}"
        sitk.WriteImage(img, str(out))
        vol = load_volume(out)
        assert vol.source.format == fmt
        np.testing.assert_array_equal(vol.array, ref.array)
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)


# ------------------------------------------------------------------------------------------------ round trips
def test_non_ras_nifti_round_trip(ail_case, tmp_path: Path) -> None:
    vol = load_volume(ail_case["ct"])
    np.testing.assert_array_equal(vol.array, ail_case["ras"])
    np.testing.assert_allclose(vol.affine, ail_case["ras_affine"], atol=1e-4)
    np.testing.assert_allclose(vol.source.original_affine, ail_case["file_affine"], atol=1e-5)
    assert vol.source.original_shape == ail_case["file"].shape

    lab = load_label(ail_case["lab"], like=vol)
    np.testing.assert_array_equal(lab, ail_case["labels"])

    out = save_mask(lab == LIVER, vol, tmp_path / "out" / "liver.nii.gz")
    back = nib.load(str(out))
    assert back.shape == ail_case["file"].shape and back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(back.affine, nib.load(str(ail_case["ct"])).affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), ail_case["file_labels"] == LIVER)

    out = save_label_map(lab, vol, tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), ail_case["file_labels"])

    out = save_volume(vol, tmp_path / "ct_back.nii.gz")
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.int16  # integral HU are stored as int16
    np.testing.assert_array_equal(np.asarray(back.dataobj), ail_case["file"])
    assert sorted(p.name for p in tmp_path.glob(".*")) == []  # atomic writes leave no temp files


def test_to_source_order_with_channels(ail_case) -> None:
    vol = load_volume(ail_case["ct"])
    stack = np.stack([vol.array, vol.array + 1])
    src = vol.to_source_order(stack)
    assert src.shape == (2, *ail_case["file"].shape)
    np.testing.assert_array_equal(src[1], ail_case["file"] + 1)
    with pytest.raises(ValueError, match="does not end with the volume grid"):
        vol.to_source_order(np.zeros((3, 3, 3)))


def test_lps_save_mask_and_nrrd_output(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "ts_cta_1p5mm_unlabeled" / "ct.nii.gz"
    vol = load_volume(path)
    mask = vol.array > 200
    back = nib.load(str(save_mask(mask, vol, tmp_path / "bone.nii.gz")))
    orig = nib.load(str(path))
    np.testing.assert_array_equal(back.affine, orig.affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj) > 0, np.asarray(orig.dataobj) > 200)
    # masks may also be written as NRRD; they reload on the same RAS grid
    out = save_mask(mask, vol, tmp_path / "bone.nrrd")
    np.testing.assert_array_equal(load_label(out, like=vol) > 0, mask)


def test_oblique_file_warns_and_round_trips(tmp_path: Path) -> None:
    angle = np.deg2rad(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.8, -0.8, 2.5])  # oblique LPS-like
    affine[:3, 3] = [10, 20, -30]
    data = _ct_like()
    path = _nifti(tmp_path / "oblique.nii.gz", data, affine)
    with pytest.warns(InputWarning, match="oblique"):
        vol = load_volume(path)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(vol.array, data[::-1, ::-1, :])  # nearest orientation: flips only
    back = nib.load(str(save_mask(vol.array > 0, vol, tmp_path / "m.nii.gz")))
    np.testing.assert_allclose(back.affine, nib.load(str(path)).affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj) > 0, data > 0)


def test_volume_from_array_reorients_non_ras_affine() -> None:
    data = _ct_like().astype(np.float32)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS
    vol = volume_from_array(data, affine=affine, name="lps")
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S") and vol.source.format == "array"
    np.testing.assert_array_equal(vol.to_source_order(vol.array), data)
    ras = volume_from_array(data, spacing=(0.5, 0.5, 2.0))
    assert ras.source is None and ras.array is data and ras.spacing == (0.5, 0.5, 2.0)


# ------------------------------------------------------------------------------------------------ labels
def test_label_on_other_grid_is_resampled_with_warning(abdomen: Path, tmp_path: Path) -> None:
    vol = load_volume(abdomen / "ct.nii.gz")
    lab_img = nib.load(str(abdomen / "labels_totalseg.nii.gz"))
    labels = np.asarray(lab_img.dataobj)
    shifted = lab_img.affine.copy()
    shifted[:3, 3] += 0.3 * 3.0  # a third of a voxel: nearest neighbour maps back onto the same voxels
    path = _nifti(tmp_path / "shifted.nii.gz", labels, shifted)
    with pytest.warns(InputWarning, match="resampled it nearest-neighbour"):
        out = load_label(path, like=vol)
    np.testing.assert_array_equal(out, labels)

    # a cropped label file (whole-voxel offset) is placed exactly, without a warning
    crop = labels[10:100, 5:90, 3:25]
    aff = lab_img.affine.copy()
    aff[:3, 3] = (lab_img.affine @ [10, 5, 3, 1])[:3]
    path = _nifti(tmp_path / "crop.nii.gz", crop, aff)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        out = load_label(path, like=vol)
    expected = np.zeros_like(labels)
    expected[10:100, 5:90, 3:25] = crop
    np.testing.assert_array_equal(out, expected)

    far = lab_img.affine.copy()
    far[:3, 3] += 5000.0
    with pytest.raises(InputError, match="does not overlap"), pytest.warns(InputWarning):
        load_label(_nifti(tmp_path / "far.nii.gz", labels, far), like=vol)


def test_label_checks_and_grid(tmp_path: Path) -> None:
    probs = np.full((10, 10, 10), 0.25, np.float32)
    with pytest.raises(InputError, match="non-integer values"):
        load_label(_nifti(tmp_path / "probs.nii.gz", probs))
    ints = _nifti(tmp_path / "float_labels.nii.gz", np.ones((10, 10, 10), np.float32) * 3)
    lab = load_label(ints)
    assert lab.dtype == np.uint8 and lab.max() == 3
    grid = label_grid(ints)
    assert grid.shape == (10, 10, 10) and grid.source.format == "nifti"
    (tmp_path / "labels.txt").write_text("1 2 3")
    with pytest.raises(InputError, match="unsupported label file type"):
        load_label(tmp_path / "labels.txt")


# ------------------------------------------------------------------------------------------------ DICOM zip
def _zip_dir(src: Path, dest: Path, prefix: str = "series/") -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, prefix + f.name)
    return dest


def test_dicom_zip_loads_like_folder(
    dicom_dir: Path, dicom_volume: Volume, tmp_path: Path, monkeypatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    vol = load_volume(_zip_dir(dicom_dir, tmp_path / "case7.zip"))
    assert vol.name == "case7" and vol.source.format == "dicom-zip"
    np.testing.assert_array_equal(vol.array, dicom_volume.array)
    np.testing.assert_array_equal(vol.affine, dicom_volume.affine)
    assert list(scratch.iterdir()) == []  # the temporary extraction folder is removed


@pytest.mark.parametrize(
    ("member", "match"),
    [("../evil.txt", "escapes the archive"), ("a/../../evil.txt", "escapes the archive"),
     ("/abs/evil.txt", "escapes the archive"), ("..\\evil.txt", "escapes the archive")],
)  # fmt: skip
def test_zip_path_traversal_rejected(
    dicom_dir: Path, tmp_path: Path, monkeypatch, member: str, match: str
) -> None:
    scratch = tmp_path / "work" / "scratch"
    scratch.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = tmp_path / "work" / "bad.zip"
    first = next(iter(sorted(dicom_dir.iterdir())))
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(first, "ok.dcm")
        zf.writestr(member, b"pwned")
    with pytest.raises(InputError, match=match):
        load_volume(path)
    assert not list(tmp_path.rglob("evil.txt"))
    assert list(scratch.iterdir()) == []


def test_zip_symlink_bomb_and_member_limits(tmp_path: Path, monkeypatch) -> None:
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("slice.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InputError, match="symbolic link"):
        load_volume(link)

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", bytes(4 * 1024 * 1024))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(InputError, match="uncompressed is 4.0 MiB, over the limit"):
        load_volume(bomb, max_bytes=1024 * 1024)

    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(5):
            zf.writestr(f"{i}.dcm", b"x")
    monkeypatch.setattr(io, "MAX_ZIP_MEMBERS", 3)
    with pytest.raises(InputError, match="5 members, over the limit of 3"):
        load_volume(many)

    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="could not be read as a zip"):
        load_volume(tmp_path / "junk.zip")

    with zipfile.ZipFile(tmp_path / "text.zip", "w") as zf:
        zf.writestr("notes/readme.txt", b"hello")
    with pytest.raises(InputError, match="no DICOM image series"):
        load_volume(tmp_path / "text.zip")


# ------------------------------------------------------------------------------------------------ several series
def test_two_dicom_series_warns_and_series_selects(dicom_dir: Path, tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    uid_a, uid_b = "1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.222"
    folder = tmp_path / "two"
    folder.mkdir()
    files = sorted(dicom_dir.iterdir())
    for i, f in enumerate(files):
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID = uid_a
        ds.save_as(str(folder / f"a{i:02d}.dcm"))
        if i < 6:
            ds.SeriesInstanceUID = uid_b
            ds.SOPInstanceUID = generate_uid()
            ds.SeriesDescription = "thin subset"
            ds.save_as(str(folder / f"b{i:02d}.dcm"))
    with pytest.warns(
        InputWarning, match=rf"took {uid_a} \(CT.*20 slices\).*{uid_b} \(CT, 'thin subset', 6 slices\)"
    ):
        vol = load_volume(folder)
    assert vol.shape[2] == 20 and vol.source.meta["series_uid"] == uid_a
    assert vol.source.meta["other_series"] == [uid_b]
    with pytest.warns(InputWarning, match="very few voxels"):
        small = load_volume(folder, series=uid_b)
    assert small.shape == (512, 512, 6)
    with pytest.raises(InputError, match="has no DICOM series 'nope'.*20 slices"):
        load_volume(folder, series="nope")


# ------------------------------------------------------------------------------------------------ errors
def test_error_pictures_and_file_types(tmp_path: Path) -> None:
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(InputError, match="is a PNG picture"):
        load_volume(png)
    disguised = tmp_path / "scan.nii.gz"
    disguised.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(InputError, match="is a PNG picture"):
        load_volume(disguised)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    with pytest.raises(InputError, match="JPG picture"):
        load_volume(tmp_path / "photo.jpg")
    (tmp_path / "scan.xyz").write_bytes(b"data")
    with pytest.raises(
        InputError, match=r"unsupported file type '\.xyz'; supported are NIfTI \(\.nii, \.nii\.gz\)"
    ):
        load_volume(tmp_path / "scan.xyz")
    with pytest.raises(InputError, match="does not exist"):
        load_volume(tmp_path / "missing.nii.gz")


def test_error_empty_truncated_corrupt(abdomen: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty \(0 bytes\)"):
        load_volume(tmp_path / "empty.nii.gz")
    data = (abdomen / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="could not be read as NIfTI: Compressed file ended"):
        load_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "noise.nii").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(InputError, match="could not be read as NIfTI"):
        load_volume(tmp_path / "noise.nii")
    (tmp_path / "noise.nii.gz").write_bytes(gzip.compress(b"hello world" * 10))
    with pytest.raises(InputError, match="could not be read as NIfTI"):
        load_volume(tmp_path / "noise.nii.gz")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ntype: what\ndimension: 3\n\n")
    with pytest.raises(InputError, match="could not be read as NRRD"):
        load_volume(tmp_path / "bad.nrrd")


def test_error_too_large(abdomen: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"over the limit of 1000 bytes.*max_bytes="):
        load_volume(abdomen / "ct.nii.gz", max_bytes=1000)
    # a small compressed file that would decompress to a big array is refused before reading
    with pytest.raises(InputError, match="as float32 in memory is 1.4 MiB, over the limit"):
        load_volume(abdomen / "ct.nii.gz", max_bytes=1_000_000)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (np.full((12, 12), -1000, np.int16), "is 2-D"),
        (np.full((12, 12, 1), -1000, np.int16), "single slice along axis 2"),
        (np.full((12, 12, 12, 3), -1000, np.int16), "is 4-D.*RGB"),
        (
            np.random.default_rng(0).integers(0, 256, (12, 12, 12)).astype(np.uint8),
            "looks like an 8-bit picture",
        ),
        (
            np.random.default_rng(0).integers(0, 4096, (12, 12, 12)).astype(np.uint16),
            "raw scanner values, not Hounsfield units; export with RescaleSlope/Intercept applied",
        ),
        (np.random.default_rng(0).normal(0, 1, (12, 12, 12)).astype(np.float32), "looks normalised"),
    ],
)
def test_error_not_a_ct_volume(tmp_path: Path, data: np.ndarray, match: str) -> None:
    with pytest.raises(InputError, match=match):
        load_volume(_nifti(tmp_path / "x.nii.gz", data))


def test_rescale_escape_hatch(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).integers(0, 4096, (12, 12, 12)).astype(np.uint16)
    vol = load_volume(_nifti(tmp_path / "raw.nii.gz", raw), rescale=(1, -1024))
    np.testing.assert_array_equal(vol.array, raw.astype(np.float32) - 1024)


def test_error_rgb_and_non_dicom_folders(shared_data: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    rgb = sitk.GetImageFromArray(np.zeros((10, 10, 10, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="3 values per voxel.*RGB"):
        load_volume(tmp_path / "rgb.nrrd")
    rgb_nii = nib.Nifti1Image(np.zeros((10, 10, 10), [("R", "u1"), ("G", "u1"), ("B", "u1")]), np.eye(4))
    nib.save(rgb_nii, str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(InputError, match="RGB/colour voxels"):
        load_volume(tmp_path / "rgb.nii.gz")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match=r"holds no DICOM image series among its 1 files"):
        load_volume(folder)
    d = shared_data / "dcmqi_liver_3slice"
    with pytest.raises(InputError, match="single DICOM file"):
        load_volume(d / "01.dcm")
    with pytest.raises(InputError, match="DICOM-SEG segmentation.*load_label"):
        load_volume(d / "liver.dcm")
    with pytest.raises(InputError, match="not a DICOM-SEG"):
        load_label(d / "01.dcm")


# ------------------------------------------------------------------------------------------------ checks / writers
def test_check_ct_warnings_and_errors() -> None:
    hu = _ct_like((20, 20, 12)).astype(np.float32)
    with pytest.warns(InputWarning, match="7.5 mm thick slices"):
        msgs = check_ct(hu, (0.7, 0.7, 7.5), name="thick")
    assert len(msgs) == 1
    with pytest.warns(InputWarning, match="very few voxels"):
        volume_from_array(hu[:, :, :4])
    with pytest.warns(InputWarning, match="modality MR"):
        check_ct(hu, modality="MR")
    bad = hu.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        volume_from_array(bad)
    with pytest.raises(InputError, match="looks like an 8-bit picture, a mask or normalised data"):
        volume_from_array(np.random.default_rng(0).random((10, 10, 10)))
    with pytest.raises(InputError, match="invalid voxel spacing"):
        check_ct(hu, (1.0, 0.0, 1.0))
    assert volume_from_array(np.random.default_rng(0).random((10, 10, 10)), check=False).shape == (10, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert check_ct(hu, (0.8, 0.8, 2.5)) == []


def test_save_mask_rejects_bad_input(tmp_path: Path) -> None:
    vol = volume_from_array(_ct_like().astype(np.float32))
    with pytest.raises(ValueError, match="does not match the volume grid"):
        save_mask(np.zeros((3, 3, 3), bool), vol, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="do not fit uint8"):
        save_mask(np.full(vol.shape, 300), vol, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="use a .nii.gz"):
        save_mask(np.zeros(vol.shape, bool), vol, tmp_path / "m.png")
    out = save_label_map(np.full(vol.shape, 300, np.int32), vol, tmp_path / "big.nii.gz")
    assert nib.load(str(out)).get_data_dtype() == np.int16
    out = save_volume(vol.with_array(vol.array + 0.5), tmp_path / "float.nii.gz")
    assert nib.load(str(out)).get_data_dtype() == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nii.gz", "float.nii.gz"]


def test_case_name() -> None:
    assert case_name("/a/b/case_001.nii.gz") == "case_001"
    assert case_name("scan.v2.NRRD") == "scan.v2"
    assert case_name("/data/patient7/") == "patient7"
    assert case_name("series.zip") == "series"


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from universal.io import atomic_write, atomic_write_text

    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, '{"ok": true}\n')
    assert target.read_text() == '{"ok": true}\n'

    def half_then_fail(fh):
        fh.write(b'{"half')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == '{"ok": true}\n'  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temporary file left


def test_atomic_write_gives_the_file_the_usual_permissions(tmp_path):
    import os

    from universal.io import atomic_write_text

    umask = os.umask(0)
    os.umask(umask)
    path = atomic_write_text(tmp_path / "report.json", "{}\n")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


# ------------------------------------------------------------------------------------------------ JSON
def test_to_json_makes_plain_json_values_without_touching_the_input():
    import json

    from universal.io import json_float, to_json

    value = {
        1: (np.float32(0.25), np.int16(-3), np.bool_(False)),
        "nan": [float("nan"), np.float64("-inf")],
        "arr": np.arange(3, dtype=np.uint8),
        "path": Path("a") / "b.json",
        "none": None,
    }
    out = to_json(value)
    assert out == {
        "1": [0.25, -3, False],
        "nan": [None, None],
        "arr": [0, 1, 2],
        "path": str(Path("a/b.json")),
        "none": None,
    }
    assert type(out["1"][1]) is int and type(out["1"][2]) is bool
    json.dumps(out, allow_nan=False)  # strict JSON
    assert isinstance(value[1], tuple) and np.isnan(value["nan"][0])  # the input is unchanged
    assert to_json({"x": 1 / 3}, ndigits=4) == {"x": 0.3333}
    assert json_float(np.float32(np.inf)) is None and json_float("2.5") == 2.5
    with pytest.raises(TypeError, match="object is not a JSON value"):
        to_json({"x": object()})
    assert to_json([object], default=lambda o: o.__name__) == ["object"]
