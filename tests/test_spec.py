"""Tests of universal.spec: the typed model contract, its checkpoint round trip and the migrations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from universal.errors import CheckpointError, InputError
from universal.model import create_model, load_checkpoint, load_pretrained, save_checkpoint
from universal.model.checkpoints import builtin_weights_path
from universal.preprocess import PreprocessConfig
from universal.spec import InferenceDefaults, ModelSpec, Provenance, migrate_v1


def _model(**kw):
    return create_model(
        "segresnet",
        classes=["liver", "spleen"],
        encoder="onehot",
        embeddings=np.eye(2, 32, dtype="float32"),
        init_filters=16,
        **kw,
    )


def _custom_spec_parts():
    return {
        "preprocessing": PreprocessConfig(
            spacing_mm=(2.0, 2.0, 4.0), hu_window=(-100.0, 200.0), crop_foreground=False
        ),
        "inference": InferenceDefaults(
            patch_size=(32, 32, 16), overlap=0.4, threshold=0.6, precision="float32"
        ),
        "provenance": Provenance(source="trained", steps=12, train_seconds=3.5, seed=7, datasets=("a", "b")),
    }


def test_spec_round_trips_through_a_checkpoint_as_the_same_object(tmp_path):
    model = _model(**_custom_spec_parts())
    path = save_checkpoint(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == 2 and raw["spec"] == model.spec.to_dict() and "config" not in raw
    back = load_checkpoint(path)
    assert back.spec == model.spec
    assert back.spec.preprocessing.crop_foreground is False
    assert back.spec.inference.patch_size == (32, 32, 16) and back.spec.inference.overlap == 0.4
    assert back.spec.provenance.datasets == ("a", "b")


def test_spec_dict_round_trip_and_plain_values():
    spec = _model(**_custom_spec_parts()).spec
    d = spec.to_dict()
    assert ModelSpec.from_dict(d) == spec

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))

    assert plain(d)


def test_spec_is_frozen():
    spec = _model().spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.template = "x"  # type: ignore[misc]
    assert spec.replace(template="A photo of a {}").template == "A photo of a {}"
    assert spec.template != "A photo of a {}"


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["preprocessing"].update(typo_key=1), "typo_key"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["inference"].update(overlap=1.0), "overlap"),
        (lambda d: d["inference"].update(patch_size="big"), "patch_size"),
        (lambda d: d["preprocessing"].update(hu_window=[250, -175]), "hu_window"),
        (lambda d: d["preprocessing"].update(convention="martian"), "convention"),
        (lambda d: d.update(version=99), "newer"),
    ],
)
def test_from_dict_refuses_unknown_keys_and_bad_values(mutate, match):
    d = _model().spec.to_dict()
    mutate(d)
    with pytest.raises(CheckpointError, match=match):
        ModelSpec.from_dict(d)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"overlap": 1.0},
        {"overlap": -0.1},
        {"threshold": 0.0},
        {"precision": "int8"},
        {"patch_size": (0, 8, 8)},
    ],
)
def test_inference_defaults_are_validated_where_they_enter(kwargs):
    with pytest.raises(InputError):
        InferenceDefaults(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"spacing_mm": -1.0}, {"spacing_mm": (1.0, 2.0)}, {"hu_window": (5, 5)}, {"margin_mm": -2.0}]
)
def test_preprocess_config_is_validated_where_it_enters(kwargs):
    with pytest.raises(InputError):
        PreprocessConfig(**kwargs)


def test_shipped_builtin_migrates_from_version_1():
    raw = torch.load(builtin_weights_path(), weights_only=True)
    assert (
        raw["version"] == 1
    )  # the shipped file is a version-1 checkpoint: this test exercises the migration
    spec = load_pretrained("builtin").spec
    assert spec == migrate_v1(raw["config"], raw["extra"])
    assert spec.preprocessing.target_spacing() == tuple(
        float(s) for s in raw["config"]["preprocessing"]["spacing"]
    )
    assert spec.inference.patch_size == tuple(raw["config"]["preprocessing"]["patch_size"])
    assert spec.preprocessing.crop_foreground is True  # v1 inference always cropped
    assert spec.provenance.migrated_from == "universal-checkpoint v1"
    assert spec.provenance.steps == raw["extra"]["training"]["step"]
    assert spec.classes == tuple(raw["config"]["class_names"]) and spec.encoder == "minilm"


def test_version_1_checkpoint_without_training_record_takes_v1_defaults(tmp_path):
    model = _model()
    v1 = {
        "format": "universal-checkpoint",
        "version": 1,
        "config": {
            "backbone": "segresnet",
            "backbone_kwargs": {"init_filters": 16},
            "class_names": ["liver", "spleen"],
            "encoder_name": "onehot",
            "template": model.template,
            "embed_dim": 32,
            "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "window": [-175.0, 250.0]},
        },
        "state_dict": model.state_dict(),
        "extra": {},
    }
    torch.save(v1, tmp_path / "v1.pt")
    spec = load_checkpoint(tmp_path / "v1.pt").spec
    assert spec.inference == InferenceDefaults()  # 96³, overlap 0.25, threshold 0.5: what v1 inference used
    assert spec.preprocessing == PreprocessConfig(spacing_mm=(1.5, 1.5, 1.5))
    assert spec.provenance.source == "unknown" and spec.provenance.migrated_from == "universal-checkpoint v1"
    assert dict(spec.backbone_kwargs) == {"init_filters": 16}


def test_version_2_checkpoint_with_a_corrupt_spec_is_refused(tmp_path):
    model = _model()
    path = save_checkpoint(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    raw["spec"]["inference"]["overlap"] = 3
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="overlap"):
        load_checkpoint(tmp_path / "bad.pt")


def test_official_spec_has_the_official_pipeline_settings():
    from universal.spec import official_spec

    spec = official_spec(
        "unet", 512, ("liver",), encoder="table:official-clip", template="A computerized tomography of a {}"
    )
    assert spec.inference.overlap == 0.5 and spec.inference.patch_size == (96, 96, 96)
    assert spec.preprocessing.target_spacing() == (1.5, 1.5, 1.5) and spec.preprocessing.hu_window == (
        -175.0,
        250.0,
    )
    assert spec.provenance.source == "official"
    # the official chain's grid convention, crop (windowed image > 0: HU above -175, no margin) and arithmetic
    prep = spec.preprocessing
    assert prep.convention == "official" and prep.foreground_hu == -175.0 and prep.margin_mm == 0.0
    assert spec.inference.precision == "float32" and spec.inference.threshold == 0.5
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_fast_spacing_is_never_finer_than_the_model():
    spec = _model(preprocessing=PreprocessConfig(spacing_mm=4.0)).spec
    assert spec.prepare_config(fast=True).target_spacing() == (4.0, 4.0, 4.0)
    spec = _model().spec
    assert spec.prepare_config(fast=True).target_spacing() == (3.0, 3.0, 3.0)
    assert spec.prepare_config(fast=False) is spec.preprocessing


def test_create_model_refuses_an_untyped_preprocessing_dict():
    with pytest.raises(TypeError, match="PreprocessConfig"):
        _model(preprocessing={"spacing": [3, 3, 3]})
