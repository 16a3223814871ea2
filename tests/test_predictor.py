"""Tests of universal.predictor: settings validated before any load, values from the spec, batch prediction."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import universal.model as um
from universal import inference
from universal.errors import ClassNameError, InputError
from universal.phantom import make_phantom
from universal.predictor import Predictor, PredictorSettings, resolve_device
from universal.preprocess import PreprocessConfig, preprocess
from universal.spec import InferenceDefaults

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["liver", "spleen", "right kidney", "left kidney"]
PREP = PreprocessConfig(spacing_mm=6.0)


def _reference_module():
    spec = importlib.util.spec_from_file_location(
        "reference_inference", ROOT / "bench" / "reference_inference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((48, 48, 36), spacing=(4.0, 4.0, 4.0), seed=0)


@pytest.fixture(scope="module")
def model(phantom):
    probe = preprocess(phantom.volume, PREP).array[8:24, 8:24, 4:20]
    net = _reference_module().calibrated_random_model(CLASSES, seed=0, probe=probe)
    net.preprocessing = PREP
    net.inference_defaults = InferenceDefaults(patch_size=(16, 16, 16))
    return net


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights are read."""

    def refuse(name):
        raise AssertionError(f"weights {name!r} were loaded before the settings were checked")

    monkeypatch.setattr(um, "load_pretrained", refuse)
    inference.clear_model_cache()
    yield
    inference.clear_model_cache()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.5}, "overlap"),
        ({"overlap": "half"}, "overlap"),
        ({"threshold": 1.5}, "threshold"),
        ({"precision": "int8"}, "precision"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"patch_size": "big"}, "patch_size"),
        ({"postprocess": "yes"}, "postprocess"),
        ({"fast": "no"}, "fast"),
        ({"classes": []}, "classes"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:7"}, "cuda:7"),
        ({"device": "mps"}, "mps"),
    ],
)
def test_bad_settings_are_refused_before_any_weights_are_loaded(kwargs, match, no_loading):
    if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    if kwargs.get("device") == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(InputError, match=match):
        Predictor("builtin", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_one_clear_error(no_loading):
    with pytest.raises(InputError, match="no usable CUDA GPU"):
        Predictor("builtin", device="cuda")
    with pytest.raises(InputError, match="no usable CUDA GPU"):
        resolve_device("cuda:0")


def test_settings_left_unset_take_the_spec_values(model, phantom):
    model.inference_defaults = InferenceDefaults(patch_size=(16, 16, 16), overlap=0.4, threshold=0.6)
    try:
        p = Predictor(model)
        assert (p.resolved.overlap, p.resolved.threshold, p.resolved.patch_size) == (0.4, 0.6, (16, 16, 16))
        seg = p.predict(phantom.volume)
        assert (
            seg.info["overlap"] == 0.4
            and seg.info["threshold"] == 0.6
            and seg.info["patch_size"] == [16, 16, 16]
        )
        q = Predictor(model, overlap=0.0, threshold=0.5)  # explicit settings win
        assert (q.resolved.overlap, q.resolved.threshold) == (0.0, 0.5)
    finally:
        model.inference_defaults = InferenceDefaults(patch_size=(16, 16, 16))


def test_threshold_and_overlap_settings_change_the_masks(model, phantom):
    base = Predictor(model, postprocess=False)
    low = base.with_settings(threshold=0.2).predict(phantom.volume).masks["liver"].sum()
    high = base.with_settings(threshold=0.8).predict(phantom.volume).masks["liver"].sum()
    assert low > high
    a = base.predict(phantom.volume, progress=None)
    b = base.with_settings(overlap=0.75).predict(phantom.volume)
    assert any((a.masks[n] != b.masks[n]).any() for n in CLASSES)


def test_crop_is_read_from_the_spec(model, phantom):
    cropped = Predictor(model).predict(phantom.volume)
    model.preprocessing = PreprocessConfig(spacing_mm=6.0, crop_foreground=False)
    try:
        full = Predictor(model).predict(phantom.volume)
    finally:
        model.preprocessing = PREP
    assert full.info["crop_box"] == [[0, s] for s in phantom.volume.shape]
    assert cropped.info["crop_box"] != full.info["crop_box"] and full.info["crop_foreground"] is False


def test_predict_equals_segment_and_the_model_is_not_changed(model, phantom):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    template = model.template
    seg_a = Predictor(model, classes=["spleen", "liver"], template="photo").predict(phantom.volume)
    seg_b = inference.segment(phantom.volume, ["spleen", "liver"], model=model, template="photo")
    assert seg_a.classes == ["spleen", "liver"]
    for n in seg_a.classes:
        np.testing.assert_array_equal(seg_a.masks[n], seg_b.masks[n])
    assert model.template == template
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_class_is_refused_at_construction(model):
    with pytest.raises(ClassNameError, match="pancreas"):
        Predictor(model, classes=["pancreas"])


def test_patch_size_must_fit_the_backbone(model):
    with pytest.raises(InputError, match="multiple of 8"):
        Predictor(model, patch_size=(20, 20, 20))


def test_predict_many_continues_after_a_bad_case(model, phantom, tmp_path):
    from universal.io import save_volume

    good = tmp_path / "good.nii.gz"
    save_volume(phantom.volume, good)
    bad = tmp_path / "missing.nii.gz"
    results = list(Predictor(model, classes=["liver"]).predict_many([bad, good, phantom.volume]))
    assert [r.ok for r in results] == [False, True, True]
    assert "missing.nii.gz" in results[0].error and "\n" not in results[0].error
    np.testing.assert_array_equal(
        results[1].segmentation.masks["liver"], results[2].segmentation.masks["liver"]
    )


def test_model_is_loaded_once_per_name_and_with_settings_does_not_reload(model, phantom, monkeypatch):
    calls = []

    def fake(name):
        calls.append(name)
        return model

    monkeypatch.setattr(um, "load_pretrained", fake)
    inference.clear_model_cache()
    try:
        p = Predictor("some-weights", classes=["liver"])
        first = p.predict(phantom.volume)
        second = p.predict(phantom.volume)
        p.with_settings(classes=["spleen"], fast=True).predict(phantom.volume)
        Predictor("some-weights")
    finally:
        inference.clear_model_cache()
    assert calls == ["some-weights"]
    assert second.timings["model"] == 0.0 and first.timings["model"] >= 0.0
    assert first.info["model"] == "some-weights"


def test_settings_object_and_keywords_are_exclusive(model):
    with pytest.raises(TypeError):
        Predictor(model, PredictorSettings(), fast=True)
    assert Predictor(model, PredictorSettings(fast=True)).resolved.fast is True


def test_describe_lists_the_resolved_settings(model):
    d = Predictor(model, fast=True, overlap=0.1).describe()
    assert d["fast"] is True and d["overlap"] == 0.1 and d["preprocessing"]["spacing_mm"] == (6.0, 6.0, 6.0)
