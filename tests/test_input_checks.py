"""The input checks of issue #13 ("inputs"), one test per fix: the prepared-grid limit and the physical size, checks
for every Volume that reaches a Predictor, a NIfTI without voxel size, a MetaImage without its data file, zip bombs,
unknown prompt templates, and evaluation on grids that differ or ids out of range."""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from badinput import run_cli, tiny_checkpoint
from test_bad_inputs_io import AFFINE, hu_array, nifti, zero_pixdim_nifti

from universal import io as uio
from universal import preprocess as pp
from universal.errors import InputError, InputWarning


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random two-class checkpoint (liver, spleen; 6 mm; 16³ windows)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt", ["liver", "spleen"])


def _volume(array: np.ndarray, affine: np.ndarray = AFFINE, name: str = "mem") -> uio.Volume:
    return uio.Volume(array=array, affine=np.asarray(affine, dtype=np.float64), name=name)


# ------------------------------------------------------------------------------- 1. the prepared grid's size
@pytest.mark.parametrize(
    "config",
    [
        pp.PreprocessConfig(),
        pp.PreprocessConfig(spacing_mm=3.0, margin_mm=0.0),
        pp.PreprocessConfig(spacing_mm=(1.0, 2.0, 4.5), crop_foreground=False),
        pp.PreprocessConfig(spacing_mm=0.7, foreground_hu=0.0, margin_mm=12.0),
    ],
)
def test_prepared_shape_is_what_preprocess_makes(config: pp.PreprocessConfig) -> None:
    vol = _volume(hu_array((30, 26, 14)).astype(np.float32), np.diag([0.9, 1.1, 2.5, 1.0]))
    assert pp.prepared_shape(vol, config) == pp.preprocess(vol, config).shape
    # from the shape and affine alone: the whole grid (exact without cropping, an upper bound with it)
    whole = pp.prepared_shape((vol.shape, vol.affine), config)
    uncropped = pp.preprocess(vol, pp.PreprocessConfig(**{**config.__dict__, "crop_foreground": False})).shape
    assert whole == uncropped and all(w >= c for w, c in zip(whole, pp.prepared_shape(vol, config)))


def test_oversized_grid_is_refused_before_anything_is_resampled(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_resampling(*args, **kwargs):
        raise AssertionError("resampled before the size check")

    monkeypatch.setattr(pp, "_resample_axis", no_resampling)
    vol = _volume(hu_array().astype(np.float32))
    with pytest.raises(InputError, match=r"over the limit of 1,000 voxels.*max_voxels"):
        pp.preprocess(vol, pp.PreprocessConfig(spacing_mm=1.0), max_voxels=1000)
    # 64 x 64 x 40 voxels of 200 mm at 3 mm: the 30 GB grid of the issue, refused by default
    shape = pp.prepared_shape(
        ((64, 64, 40), np.diag([200.0, 200.0, 200.0, 1.0])), pp.PreprocessConfig(spacing_mm=3)
    )
    assert shape == (4267, 4267, 2667)
    with pytest.raises(
        InputError, match=r"4267 x 4267 x 2667 voxels \(48\.6 billion at 3 mm; 180\.9 GiB for the image alone"
    ):
        pp.check_prepared_size(shape, spacing=(3.0, 3.0, 3.0))
    assert pp.MAX_PREPARED_VOXELS == 256 * 1024**2
    pp.check_prepared_size((512, 512, 1024))  # the limit itself passes


def test_physical_size_over_the_limit_is_refused_with_what_to_do(tmp_path: Path) -> None:
    # 2.4 m along one axis (a whole-body scan's length) passes; 2.6 m does not
    uio.check_ct(hu_array((12, 12, 10)).astype(np.float32), (200.0, 10.0, 10.0), name="long", warn=False)
    assert uio.MAX_EXTENT_MM == 2500.0
    with pytest.raises(
        InputError, match=r"long claims to be 2\.6 x .* m across.*no CT covers more than 2\.5 m.*header"
    ):
        uio.check_ct(hu_array((13, 12, 10)).astype(np.float32), (200.0, 10.0, 10.0), name="long")
    coarse = nifti(tmp_path / "coarse.nii.gz", hu_array((64, 64, 40)), np.diag([200.0, 200.0, 200.0, 1.0]))
    with pytest.raises(InputError, match=r"coarse claims to be 12\.8 x 12\.8 x 8 m across"):
        uio.load_volume(coarse)


def test_cli_refuses_the_coarse_file_of_the_issue(tmp_path: Path, tiny: Path) -> None:
    coarse = nifti(tmp_path / "coarse.nii.gz", hu_array((64, 64, 40)), np.diag([200.0, 200.0, 200.0, 1.0]))
    rc, _, err = run_cli(
        ["segment", str(coarse), "-o", str(tmp_path / "o"), "--fast", "--weights", str(tiny)]
    )
    assert rc == 2 and "12.8 x 12.8 x 8 m across" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_max_voxels_is_a_predictor_setting_checked_where_it_enters(tiny: Path) -> None:
    from universal.predictor import Predictor, PredictorSettings

    for bad in (0, -5, 2.5, True, "lots"):
        with pytest.raises(InputError, match="max_voxels is"):
            PredictorSettings(max_voxels=bad)
    assert PredictorSettings(max_voxels=np.int64(7)).max_voxels == 7
    predictor = Predictor(str(tiny), max_voxels=50)
    assert predictor.with_settings(fast=True).settings.max_voxels == 50  # derived predictors keep it
    vol = _volume(hu_array().astype(np.float32))
    with pytest.raises(InputError, match=r"mem: the prepared grid would be .* over the limit of 50 voxels"):
        predictor.predict(vol)
    assert Predictor(str(tiny)).predict(vol).info["prepared_shape"]  # the default limit lets it through


def test_dashboard_uses_the_same_limit(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from universal import app_logic as al
    from universal import dashboard as dash
    from universal.app_state import RunSettings
    from universal.predictor import Predictor

    coarse = nifti(tmp_path / "coarse.nii.gz", hu_array((64, 64, 40)), np.diag([200.0, 200.0, 200.0, 1.0]))
    folder = al.SessionFolder()
    try:
        record = dash.load_input(dash.InputRef("path", str(coarse)), folder, 512, lambda key: None)
    finally:
        folder.close()
    assert record.error is not None and "m across" in record.error
    monkeypatch.setattr(pp, "MAX_PREPARED_VOXELS", 10)  # the one constant every front-end reads
    settings = RunSettings(weights="tiny", device="cpu", classes=("liver",), fast=False)
    with pytest.raises(InputError, match="over the limit of 10 voxels"):
        dash.segment(
            Predictor(str(tiny), device="cpu"), _volume(hu_array().astype(np.float32)), settings, None
        )


# ---------------------------------------------------------------------- 6. every Volume is checked, once
def test_a_volume_built_directly_is_checked_like_a_file(tiny: Path) -> None:
    from universal.predictor import Predictor

    predictor = Predictor(str(tiny))
    nan = hu_array().astype(np.float32)
    nan[4:8, 4:8, 4:8] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predictor.predict(_volume(nan))
    unchecked = uio.volume_from_array(nan, spacing=(2.0, 2.0, 3.0), check=False)
    with pytest.raises(InputError, match="NaN"):
        predictor.predict(unchecked)
    with pytest.raises(InputError, match="not Hounsfield"):
        predictor.predict(_volume(np.random.default_rng(0).random((24, 24, 16)).astype(np.float32)))
    with pytest.raises(InputError, match=r"not RAS\+.*volume_from_array"):
        predictor.predict(_volume(hu_array().astype(np.float32), np.diag([-2.0, 2.0, 3.0, 1.0])))


def test_checked_volume_shares_the_array_and_checks_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arr = hu_array().astype(np.float32)
    vol = _volume(arr)
    assert vol.notes is None
    checked = uio.checked_volume(vol)
    assert checked.array is arr and checked.notes == () and uio.checked_volume(checked) is checked
    loaded = uio.load_volume(nifti(tmp_path / "ct.nii.gz", hu_array()))
    assert loaded.notes == () and uio.checked_volume(loaded) is loaded
    assert loaded.with_array(loaded.array).notes is None  # another array: not checked yet

    def fail(*args, **kwargs):
        raise AssertionError("checked twice")

    monkeypatch.setattr(uio, "check_ct", fail)
    from universal.inference import _as_volume

    assert _as_volume(loaded) is loaded and _as_volume(checked) is checked


def test_warnings_of_a_directly_built_volume_reach_the_report(tiny: Path, tmp_path: Path) -> None:
    from universal.predictor import Predictor

    thick = _volume(hu_array().astype(np.float32), np.diag([2.0, 2.0, 8.0, 1.0]))
    with pytest.warns(InputWarning, match="thick slices"):
        seg = Predictor(str(tiny)).predict(thick)
    assert any("thick slices" in w for w in seg.report()["warnings"])


# ---------------------------------------------------------------------- 7. a NIfTI without a voxel size
def test_zero_pixdim_is_said_and_recorded_in_the_report(tiny: Path, tmp_path: Path) -> None:
    from universal.predictor import Predictor

    path = zero_pixdim_nifti(tmp_path / "nopix.nii.gz", hu_array())
    with pytest.warns(InputWarning) as caught:
        vol = uio.load_volume(path)
    said = " | ".join(str(w.message) for w in caught)
    assert re.search(
        r"nopix\.nii\.gz: the header gives no voxel size along axis 0, 1, 2 .*assumed 1 mm", said
    )
    assert vol.spacing == (1.0, 1.0, 1.0)
    assert any("assumed 1 mm" in n for n in vol.notes) and any(
        "left and right may be swapped" in n for n in vol.notes
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        seg = Predictor(str(tiny)).predict(path)
    files = seg.save(tmp_path / "out")
    report = json.loads(Path(files["report"]).read_text())
    assert any("nopix.nii.gz" in w and "assumed 1 mm" in w for w in report["warnings"])
    # a header with an sform says both spacing and orientation: nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert uio.load_volume(nifti(tmp_path / "ok.nii.gz", hu_array())).notes == ()


# ------------------------------------------------------------------- 8. a detached header without its data
def test_missing_data_file_of_a_detached_header_is_named(tmp_path: Path) -> None:
    mhd = tmp_path / "ct.mhd"
    mhd.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\nElementType = MET_SHORT\nElementDataFile = ct.raw\n"
    )
    with pytest.raises(
        InputError,
        match=r"ct\.mhd is a MetaImage header whose voxel data is in the separate file 'ct\.raw', which does not exist",
    ):
        uio.load_volume(mhd)
    (tmp_path / "ct.raw").write_bytes(b"")
    with pytest.raises(InputError, match=r"ct\.raw, the voxel data of ct\.mhd, is empty"):
        uio.load_volume(mhd)
    nhdr = tmp_path / "scan.nhdr"
    nhdr.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\ndata file: scan.raw\n"
    )
    with pytest.raises(InputError, match=r"'scan\.raw', which does not exist"):
        uio.load_volume(nhdr)
    # a complete pair still reads
    (tmp_path / "ct.raw").write_bytes(hu_array((10, 10, 10)).astype("<i2").tobytes())
    assert uio.load_volume(mhd).shape == (10, 10, 10)


# ------------------------------------------------------------------------------------------- 9. zip bombs
def _bomb(path: Path, mib: int = 80) -> Path:
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open("IM1.dcm", "w") as fh,
    ):
        for _ in range(mib):
            fh.write(bytes(1 << 20))
    return path


def test_zip_bomb_is_refused_from_the_directory_before_extracting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = _bomb(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 200_000

    def never(*args, **kwargs):
        raise AssertionError("a member was opened")

    monkeypatch.setattr(zipfile.ZipFile, "open", never)
    with pytest.raises(
        InputError, match=r"bomb\.zip would expand from .* to 80\.0 MiB \(\d+ times.*nothing was extracted"
    ):
        uio.load_volume(bomb)


def test_zip_needs_free_space_before_extracting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    small = tmp_path / "series.zip"
    with zipfile.ZipFile(small, "w") as zf:
        zf.writestr("IM1.dcm", b"x" * 1000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(
        InputError,
        match=r"series\.zip needs .* to extract, but the temporary folder .* has only 1000 bytes free",
    ):
        uio.load_volume(small)


# ---------------------------------------------------------------------------------------- 10. templates
def test_a_template_is_a_key_or_a_text_with_braces(tiny: Path, tmp_path: Path) -> None:
    from universal import app_logic, model
    from universal.predictor import Predictor
    from universal.prompts import TEMPLATES, resolve_template

    assert resolve_template("there is") == TEMPLATES["there_is"] and resolve_template("x {} y") == "x {} y"
    for bad in ("bogus", "CT of the", "photos"):
        with pytest.raises(
            InputError, match=r"Unknown prompt template .*give a key \(ct, photo, there_is, name\)"
        ):
            resolve_template(bad)
    # every caller refuses it too
    with pytest.raises(InputError, match="Unknown prompt template 'bogus'"):
        Predictor(str(tiny), template="bogus")
    with pytest.raises(InputError, match="Unknown prompt template"):
        model.create_model("segresnet", classes=["liver"], encoder="onehot", embed_dim=8, template="bogus")
    net = model.load_checkpoint(tiny)
    with pytest.raises(InputError, match="Unknown prompt template"):
        net.set_prompts(template="bogus")
    with pytest.raises(InputError, match="Unknown prompt template"):
        app_logic.model_with_prompts(net, "bogus")
    rc, _, err = run_cli(
        ["embed", "--encoder", "onehot", "--template", "bogus", "--out", str(tmp_path / "e.npy")]
    )
    assert rc == 2 and "Unknown prompt template 'bogus'" in err
    assert Predictor(str(tiny), template="photo").model.template == TEMPLATES["photo"]


# -------------------------------------------------------------------------------------------- 11. evaluate
def _labels(shape=(32, 32, 16)) -> np.ndarray:
    from universal.taxonomy import resolve_class

    lab = np.zeros(shape, np.uint8)
    lab[2:12, 2:12, 2:8] = resolve_class("liver").index
    lab[16:28, 16:28, 8:14] = resolve_class("spleen").index
    return lab


def test_evaluate_says_how_a_prediction_on_another_grid_was_placed(tmp_path: Path) -> None:
    from universal import evaluation

    gt = nifti(tmp_path / "gt.nii.gz", _labels())
    small = nifti(tmp_path / "small.nii.gz", _labels()[:20, :20, :10].copy())
    with pytest.warns(
        InputWarning,
        match=r"the prediction small\.nii\.gz \(shape \(20, 20, 10\)\) is not on the grid of gt .*whole-voxel shift of \(0, 0, 0\).*background",
    ):
        result = evaluation.evaluate(small, gt)
    assert result["liver"].dsc == 1.0 and result["spleen"].dsc < 1.0  # the spleen lies partly outside
    big = np.zeros((40, 40, 20), np.uint8)
    big[:32, :32, :16] = _labels()
    big[35, 35, 18] = 1
    shifted = AFFINE.copy()
    shifted[:3, 3] = -(AFFINE[:3, :3] @ [2, 0, 0])  # two voxels to the left: same lattice
    big_path = nifti(tmp_path / "big.nii.gz", np.roll(big, 2, axis=0), shifted)
    with pytest.warns(
        InputWarning, match=r"shift of \(2, 0, 0\).*1 labelled voxels of it outside that grid were dropped"
    ):
        evaluation.evaluate(big_path, gt)
    with warnings.catch_warnings():  # the same grid: nothing to say
        warnings.simplefilter("error", InputWarning)
        evaluation.evaluate(gt, gt)


def test_an_out_of_range_id_names_the_file_that_holds_it(tmp_path: Path) -> None:
    from universal import evaluation

    good = nifti(tmp_path / "labels.nii.gz", _labels())
    bad = _labels()
    bad[0, 0, 0] = 99
    (tmp_path / "p").mkdir()
    bad_path = nifti(tmp_path / "p" / "labels.nii.gz", bad)  # the same file name as the reference
    with pytest.raises(
        InputError, match=r"\[99\] of the prediction labels\.nii\.gz .*prediction_convention="
    ):
        evaluation.evaluate(bad_path, good)
    with pytest.raises(
        InputError, match=r"\[99\] of the reference labels\.nii\.gz .*convention=.*--gt-dataset"
    ):
        evaluation.evaluate(good, bad_path)
    ct = nifti(tmp_path / "ct.nii.gz", hu_array((32, 32, 16)))
    with pytest.raises(
        InputError, match=r"the reference ct\.nii\.gz holds negative values .*looks like a CT"
    ):
        evaluation.evaluate(good, ct)


# --------------------------------------------------------------------------------------------- more inputs
def test_a_broken_symbolic_link_is_named(tmp_path: Path) -> None:
    link = tmp_path / "ct.nii.gz"
    link.symlink_to(tmp_path / "gone" / "ct.nii.gz")
    with pytest.raises(InputError, match=r"symbolic link to .*gone/ct\.nii\.gz.*which does not exist"):
        uio.load_volume(link)
    with pytest.raises(InputError, match=r"symbolic link"):
        uio.load_label(link)
