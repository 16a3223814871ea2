"""Catalogue of bad inputs in the reading / checking / preprocessing / prompts / evaluation area (issue #13, "inputs").

Each :class:`~badinput.Kind` says how the input is made (small, in ``tmp_path``), what the user runs (``universal
segment`` / ``evaluate`` in this process, or an API call), the exit code or exception expected, a fragment of the
one-line message and what today's main did before the fix (``before``). :func:`~badinput.check_kind` enforces the
house rules: one line, no traceback, inputs unchanged, nothing half-written left in the output folder.

The CLI kinds run ``segment`` with a tiny random checkpoint (two classes, 6 mm, 16³ windows) made once per module.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from badinput import Kind, check_kind
from badinput import tiny_checkpoint as make_tiny_checkpoint

from universal.errors import InputError

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
_STATE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random two-class model (liver, spleen; one-hot prompts; 6 mm; 16³ windows), saved once per module."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt", ["liver", "spleen"])
    _STATE["ckpt"] = path
    return path


# ------------------------------------------------------------------------------------------------ makers
def hu_array(shape=(24, 24, 16), seed: int = 0) -> np.ndarray:
    """A small CT in HU (int16): air around a soft-tissue block with noise."""
    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000, np.int16)
    inner = tuple(slice(s // 6, s - s // 6) for s in shape)
    arr[inner] = (40 + rng.normal(0, 20, arr[inner].shape)).astype(np.int16)
    return arr


def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = AFFINE) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def zero_pixdim_nifti(path: Path, data: np.ndarray) -> Path:
    """A .nii.gz whose header has pixdim 0 and qform/sform codes 0 (nibabel would fix pixdim on save)."""
    import nibabel as nib

    raw = bytearray(nib.Nifti1Image(data, None).to_bytes())
    raw[76:108] = struct.pack("<8f", 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def _seg(tmp: Path, ct: Path | str, *extra: str) -> dict[str, Any]:
    """``universal segment CT -o OUT --weights tiny.pt ...extra``; the CT is an input that must stay unchanged."""
    out = tmp / "out"
    argv = ["segment", str(ct), "-o", str(out), "--weights", str(_STATE["ckpt"]), *extra]
    return {
        "argv": argv,
        "out": out,
        "inputs": [Path(ct)] if Path(ct).exists() or Path(ct).is_symlink() else [],
    }


def _seg_of(make_input) -> Any:
    return lambda tmp: _seg(tmp, make_input(tmp))


def _coarse(tmp: Path) -> dict[str, Any]:
    # 64 x 64 x 40 voxels of 200 mm: 2 MB on disk, 12.8 m across, a 30 GB grid at 3 mm
    ct = nifti(tmp / "coarse.nii.gz", hu_array((64, 64, 40)), np.diag([200.0, 200.0, 200.0, 1.0]))
    return _seg(tmp, ct, "--fast")


def _png(tmp: Path) -> Path:
    p = tmp / "slice.nii.gz"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return p


def _truncated(tmp: Path) -> Path:
    full = nifti(
        tmp / "full.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (40, 40, 30), dtype=np.int16)
    )
    data = full.read_bytes()
    p = tmp / "truncated.nii.gz"
    p.write_bytes(data[: len(data) // 2])
    full.unlink()
    return p


def _empty(tmp: Path) -> Path:
    p = tmp / "empty.nii.gz"
    p.write_bytes(b"")
    return p


def _rgb(tmp: Path) -> Path:
    rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return nifti(tmp / "rgb.nii.gz", rgb)


def _broken_link(tmp: Path) -> Path:
    link = tmp / "link.nii.gz"
    link.symlink_to(tmp / "moved-away.nii.gz")
    return link


def _unicode_path(tmp: Path) -> dict[str, Any]:
    ct = nifti(tmp / "my scans" / "čt é 1.nii.gz", hu_array())
    made = _seg(tmp, ct)
    made["expect_dir"] = made["out"] / "čt é 1"
    return made


def _empty_dir(tmp: Path) -> Path:
    d = tmp / "no_images"
    d.mkdir()
    (d / "notes.txt").write_text("nothing to see\n")
    return d


def _nrrd_bad_header(tmp: Path) -> Path:
    p = tmp / "bad.nrrd"
    p.write_bytes(b"NRRD0004\ntype: bogus\ndimension: 3\nsizes: 10 10\nencoding: raw\n\n" + bytes(2000))
    return p


def _mhd_missing_raw(tmp: Path) -> Path:
    p = tmp / "ct.mhd"
    p.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementSpacing = 1 1 1\n"
        "ElementType = MET_SHORT\nElementDataFile = ct.raw\n"
    )
    return p


def _zip_bomb(tmp: Path) -> Path:
    # 100 MiB of zeros in ~100 KB: 1000 times, far beyond what DICOM compresses to
    p = tmp / "series.zip"
    with (
        zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open("IM0001.dcm", "w") as fh,
    ):
        chunk = bytes(1 << 20)
        for _ in range(100):
            fh.write(chunk)
    return p


def _zip_traversal(tmp: Path) -> Path:
    p = tmp / "evil.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("../../escaped.dcm", b"DICM" * 100)
    return p


def _zero_pixdim(tmp: Path) -> dict[str, Any]:
    made = _seg(tmp, zero_pixdim_nifti(tmp / "nopix.nii.gz", hu_array()))
    made["report"] = made["out"] / "nopix" / "report.json"
    return made


class _Evil:
    """Unpickling this would create a folder: a checkpoint must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _pickle_ckpt(tmp: Path) -> dict[str, Any]:
    ckpt = tmp / "evil.pt"
    ckpt.write_bytes(pickle.dumps({"state_dict": _Evil(tmp / "UNPICKLED")}, protocol=4))
    made = _seg(tmp, nifti(tmp / "ct.nii.gz", hu_array()))
    made["argv"][made["argv"].index("--weights") + 1] = str(ckpt)
    made["inputs"].append(ckpt)
    made["absent"] = tmp / "UNPICKLED"
    return made


def _corrupt_ckpt(tmp: Path) -> dict[str, Any]:
    ckpt = tmp / "broken.pt"
    ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    made = _seg(tmp, nifti(tmp / "ct.nii.gz", hu_array()))
    made["argv"][made["argv"].index("--weights") + 1] = str(ckpt)
    return made


def _with_args(*extra: str, weights: str | None = None):
    def make(tmp: Path) -> dict[str, Any]:
        made = _seg(tmp, nifti(tmp / "ct.nii.gz", hu_array()), *extra)
        if weights is not None:
            made["argv"][made["argv"].index("--weights") + 1] = weights
        return made

    return make


def _text_file(tmp: Path) -> Path:
    p = tmp / "ct.txt"
    p.write_text("1 2 3")
    return p


def _nan_file(tmp: Path) -> Path:
    arr = hu_array().astype(np.float32)
    arr[3, 3, 3] = np.nan
    return nifti(tmp / "nan.nii.gz", arr)


def _shared_dicom(name: str):
    def make(tmp: Path) -> Path:
        src = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcmqi_liver_3slice" / name
        if not src.exists():
            pytest.skip(f"{src} is absent")
        return Path(shutil.copy(src, tmp / name))

    return make


# -------------------------------------------------------------------------------------------- API makers
def _predict(volume_fn, **settings):
    """``Predictor(tiny, **settings).predict(volume_fn())``."""

    def make(tmp: Path) -> dict[str, Any]:
        from universal.predictor import Predictor

        return {"call": lambda: Predictor(str(_STATE["ckpt"]), **settings).predict(volume_fn())}

    return make


def _volume(array, affine=AFFINE):
    def build():
        from universal.io import Volume

        return Volume(array=np.asarray(array), affine=np.asarray(affine, dtype=np.float64), name="mem")

    return build


def _nan_array() -> np.ndarray:
    arr = hu_array().astype(np.float32)
    arr[5:9, 5:9, 5:9] = np.nan
    return arr


def _api(fn):
    return lambda tmp: {"call": fn}


def _resolve_bogus() -> Any:
    from universal.prompts import resolve_template

    return resolve_template("bogus")


def _settings_bad_max_voxels() -> Any:
    from universal.predictor import PredictorSettings

    return PredictorSettings(max_voxels=0)


def _from_array_12m() -> Any:
    from universal.io import volume_from_array

    return volume_from_array(hu_array((64, 64, 40)), spacing=(200.0, 200.0, 200.0))


def _fine_spacing(tmp: Path) -> dict[str, Any]:
    from universal.preprocess import PreprocessConfig

    # about 45 mm (the body, cropped) at 0.05 mm: an 880 x 880 x 960 grid (743 million voxels) from a 9 KB array
    return _predict(_volume(hu_array().astype(np.float32)), preprocessing=PreprocessConfig(spacing_mm=0.05))(
        tmp
    )


# ------------------------------------------------------------------------------------------- evaluate makers
def _ids() -> tuple[int, int]:
    from universal.taxonomy import resolve_class

    return resolve_class("liver").index, resolve_class("spleen").index


def _reference(shape=(32, 32, 16)) -> np.ndarray:
    liver, spleen = _ids()
    gt = np.zeros(shape, np.uint8)
    gt[2:12, 2:12, 2:8] = liver
    gt[16:28, 16:28, 8:14] = spleen
    return gt


def _evaluate(pred_fn, gt_fn=_reference, *extra: str):
    def make(tmp: Path) -> dict[str, Any]:
        gt = nifti(tmp / "gt.nii.gz", gt_fn())
        pred = nifti(tmp / "pred.nii.gz", pred_fn())
        return {"argv": ["evaluate", str(pred), str(gt), *extra], "inputs": [gt, pred]}

    return make


def _smaller_prediction() -> np.ndarray:
    return _reference()[:20, :20, :10].copy()  # same origin and spacing, a smaller grid


def _with_id(value: int):
    def build() -> np.ndarray:
        lab = _reference()
        lab[0, 0, 0] = value
        return lab

    return build


# ------------------------------------------------------------------------------------------------ catalogue
KINDS = [
    # the fixes of issue #13 (inputs)
    Kind("coarse_spacing_12m", _coarse, 2, fragment=r"12\.8 x 12\.8 x 8 m across.*no CT covers", before="traceback (DefaultCPUAllocator: tried to allocate 9.4 GB; 30 GB with builtin)"),
    Kind("prepared_grid_over_limit", _fine_spacing, None, InputError, r"prepared grid would be 880 x 880 x 960 voxels \(0\.743 billion at 0\.05 mm.*over the limit of 268,435,456", before="traceback (RuntimeError: cannot allocate 3.0 GB)"),
    Kind("max_voxels_setting", _predict(_volume(hu_array().astype(np.float32)), max_voxels=100), None, InputError, r"over the limit of 100 voxels", before="no such setting, no limit (TypeError)"),
    Kind("bad_max_voxels", _api(_settings_bad_max_voxels), None, InputError, r"max_voxels is 0", before="no such setting (TypeError)"),
    Kind("volume_from_array_12m", _api(_from_array_12m), None, InputError, r"12\.8 x 12\.8 x 8 m across", before="accepted (a thick-slice warning only)"),
    Kind("nan_in_volume", _predict(_volume(_nan_array())), None, InputError, r"NaN", before="returned empty masks, no word"),
    Kind("volume_2d", _predict(_volume(np.full((16, 16), -1000.0, np.float32))), None, InputError, r"2-D", before="traceback (ValueError from preprocess)"),
    Kind("volume_not_hu", _predict(_volume(np.random.default_rng(0).random((24, 24, 16)).astype(np.float32))), None, InputError, r"not Hounsfield units", before="returned masks of a 0..1 image, no word"),
    Kind("volume_not_ras", _predict(_volume(hu_array().astype(np.float32), np.diag([-2.0, 2.0, 3.0, 1.0]))), None, InputError, r"LAS voxel order, not RAS\+", before="returned masks, left/right read flipped, no word"),
    Kind("volume_damaged_affine", _predict(_volume(hu_array().astype(np.float32), np.full((4, 4), np.nan))), None, InputError, r"degenerate", before="traceback (ValueError: cannot convert float NaN to integer)"),
    Kind("zero_pixdim", _zero_pixdim, 0, warns=r"no voxel size along axis 0, 1, 2.*assumed 1 mm", before="exit 0, silent: 1 mm assumed (only nibabel's log line), mL rest on it"),
    Kind("mhd_missing_raw", _seg_of(_mhd_missing_raw), 2, fragment=r"'ct\.raw', which does not exist", before="names the .mhd, says 'truncated'"),
    Kind("zip_bomb", _seg_of(_zip_bomb), 2, fragment=r"expand from .* to 100\.0 MiB .*zip bomb.*nothing was extracted", before="extracts all 100 MiB to /tmp, then 'no DICOM image series'"),
    Kind("unknown_template_key", _with_args("--template", "bogus"), 2, fragment=r"Unknown prompt template 'bogus'.*ct, photo, there_is, name", before="exit 0, wrong (prompt 'bogus {}')"),
    Kind("unknown_template_api", _api(_resolve_bogus), None, InputError, r"give a key \(ct, photo, there_is, name\)", before="returned 'bogus {}'"),
    Kind("evaluate_smaller_prediction", _evaluate(_smaller_prediction), 0, warns=r"the prediction pred\.nii\.gz \(shape \(20, 20, 10\)\).*whole-voxel shift of \(0, 0, 0\)", before="exit 0, silent zero-padding"),
    Kind("evaluate_id_out_of_range_prediction", _evaluate(_with_id(200)), 2, fragment=r"\[200\] of the prediction pred\.nii\.gz.*--pred-dataset", before="exit 2, names no file ('Class index 200 is out of range')"),
    Kind("evaluate_id_out_of_range_reference", _evaluate(_reference, _with_id(200)), 2, fragment=r"\[200\] of the reference gt\.nii\.gz.*--gt-dataset", before="exit 2, names no file ('Class index 200 is out of range')"),
    Kind("evaluate_ct_as_reference", _evaluate(_reference, lambda: hu_array((32, 32, 16))), 2, fragment=r"the reference gt\.nii\.gz holds negative values.*looks like a CT", before="exit 2, 'Class index -1000 is out of range' (no file named, no word of a CT)"),
    Kind("broken_symlink", _seg_of(_broken_link), 2, fragment=r"symbolic link to .*moved-away\.nii\.gz.*which does not exist", before="exit 2, 'does not exist' (no word of the link)"),
    # kinds that already behaved well (kept so that they stay so)
    Kind("png_renamed_nii", _seg_of(_png), 2, fragment=r"PNG picture"),
    Kind("truncated_nii_gz", _seg_of(_truncated), 2, fragment=r"could not be read as NIfTI.*truncated"),
    Kind("empty_file", _seg_of(_empty), 2, fragment=r"empty \(0 bytes\)"),
    Kind("image_2d", _seg_of(lambda t: nifti(t / "flat.nii.gz", np.full((32, 32), -1000, np.int16))), 2, fragment=r"2-D"),
    Kind("image_4d", _seg_of(lambda t: nifti(t / "phases.nii.gz", np.stack([hu_array()] * 3, axis=-1))), 2, fragment=r"4-D"),
    Kind("rgb_image", _seg_of(_rgb), 2, fragment=r"RGB"),
    Kind("label_map_as_ct", _seg_of(lambda t: nifti(t / "labels.nii.gz", _reference())), 2, fragment=r"8-bit picture, a mask"),
    Kind("constant_image", _seg_of(lambda t: nifti(t / "blank.nii.gz", np.full((24, 24, 16), -1000, np.int16))), 0, warns=r"same value \(-1000\) in every voxel"),
    Kind("floats_0_to_1", _seg_of(lambda t: nifti(t / "norm.nii.gz", np.random.default_rng(1).random((24, 24, 16)).astype(np.float32))), 2, fragment=r"normalised data, not Hounsfield"),
    Kind("unsigned_0_to_4095", _seg_of(lambda t: nifti(t / "raw.nii.gz", np.random.default_rng(2).integers(0, 4096, (24, 24, 16)).astype(np.uint16))), 2, fragment=r"raw scanner values"),
    Kind("nan_in_file", _seg_of(_nan_file), 2, fragment=r"NaN or infinite"),
    Kind("spaces_and_non_ascii_path", _unicode_path, 0),
    Kind("directory_without_images", _seg_of(_empty_dir), 2, fragment=r"no DICOM"),
    Kind("nrrd_bad_header", _seg_of(_nrrd_bad_header), 2, fragment=r"could not be read as NRRD"),
    Kind("zip_path_traversal", _seg_of(_zip_traversal), 2, fragment=r"escapes the archive"),
    Kind("missing_file", lambda t: _seg(t, t / "missing.nii.gz"), 2, fragment=r"does not exist"),
    Kind("unsupported_suffix", _seg_of(_text_file), 2, fragment=r"unsupported file type '\.txt'"),
    Kind("single_dicom_file", _seg_of(_shared_dicom("01.dcm")), 2, fragment=r"single DICOM file"),
    Kind("dicom_seg_as_ct", _seg_of(_shared_dicom("liver.dcm")), 2, fragment=r"DICOM-SEG"),
    Kind("unknown_class", _with_args("--classes", "livr"), 2, fragment=r"livr"),
    Kind("class_not_in_model", _with_args("--classes", "pancreas"), 2, fragment=r"does not segment 'pancreas'"),
    Kind("unknown_weights_name", _with_args(weights="no-such-model"), 2, fragment=r"no-such-model"),
    Kind("corrupt_checkpoint", _corrupt_ckpt, 2, fragment=r"broken\.pt"),
    Kind("pickle_checkpoint", _pickle_ckpt, 2, fragment=r"evil\.pt"),
    Kind("evaluate_probabilities_as_prediction", _evaluate(lambda: np.full((32, 32, 16), 0.3, np.float32)), 2, fragment=r"non-integer values"),
    Kind("evaluate_missing_prediction", lambda t: {"argv": ["evaluate", str(t / "nope.nii.gz"), str(nifti(t / "gt.nii.gz", _reference()))]}, 2, fragment=r"does not exist"),
]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_bad_input(kind: Kind, tmp_path: Path) -> None:
    made: dict[str, Any] = {}
    make = kind.make
    kind.make = lambda tmp: made.update(make(tmp)) or made  # keep what was made for the checks below
    try:
        check_kind(kind, tmp_path)
    finally:
        kind.make = make
    if made.get("expect_dir") is not None:
        assert (Path(made["expect_dir"]) / "labels.nii.gz").is_file()
    if made.get("absent") is not None:
        assert not Path(made["absent"]).exists(), "the checkpoint was unpickled"
    if made.get("report") is not None:
        import json

        warnings = json.loads(Path(made["report"]).read_text())["warnings"]
        assert any("assumed 1 mm" in w for w in warnings), warnings


def test_catalogue_is_large_enough() -> None:
    assert len(KINDS) >= 30 and len({k.name for k in KINDS}) == len(KINDS)
    assert all(k.before for k in KINDS)
