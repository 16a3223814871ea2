"""Tests of universal.inference.segment and its sliding window (tiny random models, small volumes; no timings)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from universal import inference
from universal.errors import ClassNameError, InputError
from universal.inference import Segmentation, segment, sliding_window_predict, window_starts
from universal.io import load_volume, volume_from_array
from universal.phantom import make_phantom
from universal.predictor import Predictor
from universal.preprocess import PreprocessConfig, preprocess

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["liver", "liver tumor", "spleen", "right kidney", "left kidney"]
# small and quick: 6 mm grid, 16³ windows (several windows per volume)
QUICK = {"patch_size": 16, "preprocess_config": PreprocessConfig(spacing_mm=6.0)}


def _load_reference():
    spec = importlib.util.spec_from_file_location(
        "reference_inference", ROOT / "bench" / "reference_inference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


ref = _load_reference()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((48, 48, 36), spacing=(4.0, 4.0, 4.0), seed=0)


@pytest.fixture(scope="module")
def model(phantom):
    probe = preprocess(phantom.volume, QUICK["preprocess_config"]).array[8:24, 8:24, 4:20]
    return ref.calibrated_random_model(CLASSES, seed=0, probe=probe)


@pytest.fixture(scope="module")
def result(phantom, model):
    return segment(phantom.volume, model=model, **QUICK)


# ------------------------------------------------------------------------------------------ sliding window
class _ConvModel(torch.nn.Module):
    """A cheap stand-in model: a 5³ convolution; records the classes it was asked for."""

    def __init__(self, k: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, k, 5, padding=2)
        self.class_names = [f"c{i}" for i in range(k)]
        self.calls: list[list[str]] = []

    def forward(self, x, classes=None):
        classes = list(classes or self.class_names)
        self.calls.append(classes)
        return self.conv(x * 4 - 2)[:, [self.class_names.index(c) for c in classes]] * 3


def test_window_starts_follow_monai():
    from monai.data.utils import dense_patch_slices

    for size, patch, overlap in [
        (233, 96, 0.25),
        (167, 96, 0.5),
        (96, 96, 0.5),
        (100, 32, 0.25),
        (17, 32, 0.5),
    ]:
        full = max(size, patch)
        interval = patch if full == patch else max(1, int(patch * (1 - overlap)))
        expected = sorted({s[0].start for s in dense_patch_slices((full,), (patch,), (interval,))})
        assert window_starts(full, patch, overlap) == expected


@pytest.mark.parametrize("patch", [(96, 96, 96), (32, 16, 24)])
def test_gaussian_weights_equal_monai(patch):
    from monai.data.utils import compute_importance_map

    expected = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125)
    assert torch.equal(inference.gaussian_weights(patch), expected)


@pytest.mark.parametrize("shape", [(70, 50, 90), (20, 30, 25), (40, 33, 17)])
@pytest.mark.parametrize("overlap,batch", [(0.25, 1), (0.5, 3)])
def test_sliding_window_equals_monai_gaussian_inference(shape, overlap, batch):
    from monai.inferers import sliding_window_inference

    m = _ConvModel().eval()
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    masks, probs = sliding_window_predict(
        img,
        m,
        ["c0", "c2"],
        patch_size=(32, 32, 32),
        overlap=overlap,
        sw_batch_size=batch,
        return_probabilities=True,
    )
    with torch.inference_mode():
        logits = sliding_window_inference(
            torch.from_numpy(img)[None, None],
            (32, 32, 32),
            batch,
            lambda x: m(x, classes=["c0", "c2"]),
            overlap=overlap,
            mode="gaussian",
        )[0]
    expected = torch.sigmoid(logits).numpy()
    assert len(masks) == len(probs) == 2
    assert all(p.dtype == np.float16 and p.shape == shape for p in probs)
    np.testing.assert_allclose(np.stack(probs).astype(np.float32), expected, atol=1e-3)
    np.testing.assert_array_equal(np.stack(masks), expected >= 0.5)
    assert 0.2 < np.mean(masks) < 0.8  # a meaningful comparison


def test_single_window_equals_direct_forward(model):
    rng = np.random.default_rng(3)
    img = rng.random((13, 16, 11)).astype(np.float32)  # smaller than one 16³ window: zero-padded like MONAI
    masks, probs = sliding_window_predict(img, model, CLASSES, patch_size=16, return_probabilities=True)
    padded = np.zeros((16, 16, 16), np.float32)
    padded[1:14, 0:16, 2:13] = img  # MONAI's split: (pad // 2) before, the rest after
    with torch.inference_mode():
        logits = model(torch.from_numpy(padded)[None, None], classes=CLASSES)[0, :, 1:14, 0:16, 2:13]
    np.testing.assert_allclose(np.stack(probs).astype(np.float32), torch.sigmoid(logits).numpy(), atol=1e-3)
    np.testing.assert_array_equal(np.stack(masks), (logits >= 0).numpy())


def test_only_requested_classes_are_computed(phantom, model):
    spy = _ConvModel(k=4).eval()
    img = np.random.default_rng(1).random((20, 20, 20)).astype(np.float32)
    (mask_a,), (prob_a,) = sliding_window_predict(img, spy, ["c2"], patch_size=16, return_probabilities=True)
    assert spy.calls and all(c == ["c2"] for c in spy.calls)
    _, probs_ab = sliding_window_predict(img, spy, ["c1", "c2"], patch_size=16, return_probabilities=True)
    np.testing.assert_array_equal(prob_a, probs_ab[1])

    # and end to end with the real model (raw masks: post-processing of a tumour depends on its organ)
    one = segment(
        phantom.volume, ["spleen"], model=model, postprocess=False, return_probabilities=True, **QUICK
    )
    two = segment(
        phantom.volume,
        ["liver", "spleen"],
        model=model,
        postprocess=False,
        return_probabilities=True,
        **QUICK,
    )
    assert list(one.masks) == ["spleen"]
    np.testing.assert_array_equal(one.masks["spleen"], two.masks["spleen"])
    np.testing.assert_allclose(
        one.probabilities["spleen"].astype(np.float32),
        two.probabilities["spleen"].astype(np.float32),
        atol=1e-3,
    )


# -------------------------------------------------------------------------------------------------- segment
def test_segment_returns_masks_for_requested_classes_on_input_grid(phantom, model, result):
    vol = phantom.volume
    assert isinstance(result, Segmentation)
    assert list(result.masks) == CLASSES
    for m in result.masks.values():
        assert m.shape == vol.shape and m.dtype == np.bool_
    assert any(m.any() for m in result.masks.values())
    assert result.probabilities is None
    assert result.volume is vol
    assert {"load", "preprocess", "inference", "postprocess", "resample", "total"} <= set(result.timings)
    assert all(v >= 0 for v in result.timings.values())
    info = result.info
    assert info["backbone"] == "segresnet" and info["encoder"] == "onehot" and info["device"] == "cpu"
    assert info["classes"] == CLASSES and info["patch_size"] == [16, 16, 16]
    assert info["template"] == model.template and "torch" in info["versions"]

    # aliases and any case resolve to canonical names, in the requested order
    seg = segment(vol, ["Spleen", "RIGHT_KIDNEY"], model=model, **QUICK)
    assert list(seg.masks) == ["spleen", "right kidney"]


def test_volumes_and_mean_hu(phantom, result):
    vol = phantom.volume
    voxel_ml = 4.0 * 4.0 * 4.0 / 1000.0
    for name, m in result.masks.items():
        assert result.volumes_ml[name] == pytest.approx(m.sum() * voxel_ml)
        if m.any():
            assert result.mean_hu[name] == pytest.approx(float(vol.array[m].mean()), rel=1e-5)
        else:
            assert math.isnan(result.mean_hu[name])


def test_probabilities_only_when_asked(phantom, model):
    seg = segment(
        phantom.volume,
        ["liver", "spleen"],
        model=model,
        return_probabilities=True,
        postprocess=False,
        **QUICK,
    )
    assert set(seg.probabilities) == {"liver", "spleen"}
    for name, p in seg.probabilities.items():
        assert p.dtype == np.float16 and p.shape == phantom.volume.shape
        assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0
        # raw masks and probabilities agree (both interpolated linearly; disagreement only at a few boundary voxels)
        agree = np.mean(seg.masks[name] == (p >= 0.5))
        assert agree > 0.97
        assert 0.05 < seg.masks[name].mean() < 0.95


def test_masks_at_source_spacing_equal_thresholded_probabilities(model):
    # at the target spacing, resampling is the identity: masks are exactly the thresholded probabilities
    ph = make_phantom((32, 32, 24), spacing=(6.0, 6.0, 6.0))
    seg = segment(ph.volume, ["liver"], model=model, return_probabilities=True, postprocess=False, **QUICK)
    p = seg.probabilities["liver"].astype(np.float32)
    disagree = seg.masks["liver"] != (p >= 0.5)
    assert np.all(np.abs(p[disagree] - 0.5) < 1e-3)  # float16 rounding of the probabilities only


@pytest.mark.filterwarnings("ignore:array has very few voxels")
def test_label_map_draws_tumours_over_organs():
    liver = np.zeros((6, 6, 6), bool)
    liver[1:5, 1:5, 1:5] = True
    tumour = np.zeros_like(liver)
    tumour[2:4, 2:4, 2:4] = True
    vol = volume_from_array(np.random.default_rng(0).normal(0, 50, (6, 6, 6)).astype(np.float32))
    seg = Segmentation(masks={"liver tumor": tumour, "liver": liver}, volume=vol)
    lm = seg.label_map()
    assert lm.dtype == np.int16
    from universal.taxonomy import resolve_class

    assert np.all(lm[tumour] == resolve_class("liver tumor").index)
    assert np.all(lm[liver & ~tumour] == resolve_class("liver").index)
    assert np.all(lm[~liver] == 0)


def test_save_writes_files_on_the_source_grid(tmp_path, phantom, model):
    # a NIfTI in a non-RAS orientation (LPI-like: x and y flipped, and the axes permuted)
    ras = phantom.volume.array
    data = np.transpose(ras[::-1, ::-1, :], (1, 0, 2)).copy()
    affine = np.array(
        [[0.0, -4.0, 0.0, 100.0], [-4.0, 0.0, 0.0, 80.0], [0.0, 0.0, 4.0, -60.0], [0, 0, 0, 1.0]]
    )
    path = tmp_path / "case_lpi.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), path)
    vol = load_volume(path)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")

    seg = segment(str(path), ["liver", "liver tumor", "spleen"], model=model, **QUICK)
    assert seg.volume.shape == vol.shape
    written = seg.save(tmp_path / "out")
    out = tmp_path / "out"
    assert written["report"] == out / "report.json"
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "liver.nii.gz",
        "liver_tumor.nii.gz",
        "spleen.nii.gz",
    ]
    for name in ["liver", "liver tumor", "spleen"]:
        img = nib.load(out / "masks" / f"{name.replace(' ', '_')}.nii.gz")
        assert img.shape == data.shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-4)
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(img.dataobj), seg.volume.to_source_order(seg.masks[name]))
    labels = nib.load(out / "labels.nii.gz")
    assert labels.shape == data.shape and labels.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(labels.dataobj), seg.volume.to_source_order(seg.label_map()))
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == ["liver", "liver tumor", "spleen"]
    assert report["volumes_ml"]["liver"] == pytest.approx(seg.volumes_ml["liver"], abs=1e-3)
    assert set(report["mean_hu"]) == set(report["classes"])
    assert {"inference", "total"} <= set(report["timings"])
    assert report["encoder"] == "onehot" and report["backbone"] == "segresnet" and "template" in report
    assert "torch" in report["versions"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_real_ct_file_round_trip(tmp_path, shared_data, model):
    path = shared_data / "ts_abdomen_3mm" / "ct.nii.gz"
    seg = segment(path, ["liver", "spleen"], model=model, **{**QUICK, "patch_size": 32})  # 6 windows
    original = nib.load(path)
    assert seg.volume.shape == load_volume(path).shape  # the file's RAS+ grid
    assert all(m.shape == seg.volume.shape for m in seg.masks.values())
    seg.save(tmp_path)
    img = nib.load(tmp_path / "masks" / "liver.nii.gz")
    assert img.shape == original.shape
    np.testing.assert_allclose(img.affine, original.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), seg.volume.to_source_order(seg.masks["liver"]))


def test_unknown_or_unsupported_class_raises(phantom, model):
    with pytest.raises(ClassNameError):
        segment(phantom.volume, ["livr"], model=model, **QUICK)
    with pytest.raises(ClassNameError, match="does not segment"):
        segment(phantom.volume, ["pancreas"], model=model, **QUICK)


def test_segment_matches_reference_style_implementation(model):
    ph = make_phantom((40, 40, 30), spacing=(4.5, 4.5, 4.5), seed=2)
    kwargs = {"overlap": 0.5, "patch_size": 16, "postprocess": True}
    pp = PreprocessConfig(spacing_mm=6.0)
    ours = segment(
        ph.volume, model=model, sw_batch_size=3, preprocess_config=pp, precision="float32", **kwargs
    )
    theirs = ref.reference_segment(ph.volume, model, spacing_mm=6.0, **kwargs)
    for name in CLASSES:
        assert ref.dsc(ours.masks[name], theirs[name]) >= 0.999, name
    assert sum(m.any() for m in ours.masks.values()) >= 3


@pytest.mark.parametrize("precision", ["bfloat16", "auto"])
def test_reduced_precision_agrees_with_float32(phantom, model, precision):
    from universal.inference import autocast_dtype_for

    full = segment(phantom.volume, model=model, precision="float32", postprocess=False, **QUICK)
    low = segment(phantom.volume, model=model, precision=precision, postprocess=False, **QUICK)
    ac = autocast_dtype_for("cpu", precision)
    assert low.info["precision"] == ("float32" if ac is None else str(ac).replace("torch.", ""))
    assert full.info["precision"] == "float32"
    for name in full.masks:
        assert ref.dsc(low.masks[name], full.masks[name]) >= 0.97, name
    assert sum(m.any() for m in full.masks.values()) >= 3


def test_unknown_precision_is_rejected(phantom, model):
    with pytest.raises(ValueError, match="precision"):
        segment(phantom.volume, model=model, precision="int8", **QUICK)


def test_template_copy_and_no_mutation(phantom, model):
    before = phantom.volume.array.copy()
    emb = model.organ_embedding.clone()
    template = model.template
    model.train()
    seg = segment(phantom.volume, ["liver"], model=model, template="photo", **QUICK)
    assert seg.info["template"] == "A photo of a {}"
    assert model.template == template and torch.equal(model.organ_embedding, emb)
    assert model.training  # the caller's mode is restored
    model.eval()
    np.testing.assert_array_equal(phantom.volume.array, before)


def test_model_by_name_is_loaded_once_and_cached(monkeypatch, phantom, model):
    import universal.model as um

    calls = []

    def fake_load_pretrained(name):
        calls.append(name)
        return model

    monkeypatch.setattr(um, "load_pretrained", fake_load_pretrained)
    inference.clear_model_cache()
    try:
        a = segment(phantom.volume, ["liver"], **QUICK)
        b = segment(phantom.volume, ["liver"], model=None, **QUICK)
        c = segment(phantom.volume, ["liver"], model="some-weights", **QUICK)
    finally:
        inference.clear_model_cache()
    assert calls == ["builtin", "some-weights"]
    assert a.info["model"] == "builtin" and c.info["model"] == "some-weights"
    np.testing.assert_array_equal(a.masks["liver"], b.masks["liver"])


def test_progress_is_monotone_and_ends_done(phantom, model):
    events = []
    segment(phantom.volume, ["liver"], model=model, progress=lambda s, f: events.append((s, f)), **QUICK)
    stages = [s for s, _ in events]
    fractions = [f for _, f in events]
    assert stages[0] == "load" and events[-1] == ("done", 1.0)
    assert {"preprocess", "inference", "postprocess", "resample"} <= set(stages)
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)


def test_fast_mode_uses_3mm(model):
    ph = make_phantom((24, 24, 18), spacing=(4.0, 4.0, 4.0))
    seg = segment(ph.volume, ["liver"], model=model, fast=True, patch_size=32, postprocess=False)
    assert seg.info["target_spacing_mm"] == [3.0, 3.0, 3.0] and seg.info["fast"] is True
    assert all(abs(s - 3.0) < 0.1 for s in seg.info["spacing_mm"])
    assert seg.masks["liver"].shape == ph.volume.shape
    # the standard mode uses the model's recorded preprocessing (1.5 mm, [-175, 250] HU)
    standard = Predictor(model).resolved.preprocessing
    assert standard.target_spacing() == (1.5, 1.5, 1.5) and standard.hu_window == (-175.0, 250.0)


def test_bad_arguments(phantom, model):
    with pytest.raises(ValueError):
        segment(phantom.volume, model=model, threshold=1.5, **QUICK)
    with pytest.raises(ValueError):
        segment(phantom.volume, model=model, overlap=1.0, **QUICK)
    with pytest.raises(InputError, match="postprocess"):
        segment(phantom.volume, model=model, postprocess="yes", **QUICK)
    with pytest.raises(TypeError):
        segment(42, model=model)
