"""Corrected cases as a partial-label dataset (universal.corrections): exactly the corrected classes are
annotated, the masks come back exactly, cases accumulate, bad input is one clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from universal import corrections, data
from universal.errors import InputError
from universal.io import load_label, load_volume
from universal.phantom import make_phantom

MODEL_CLASSES = ["spleen", "right kidney", "left kidney", "liver", "stomach", "aorta", "liver tumor"]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(40, 40, 24), spacing=(5.0, 5.0, 6.0), seed=3)


def test_manifest_annotates_exactly_the_corrected_classes(tmp_path, phantom):
    masks = dict(phantom.masks)
    masks["spleen"] = masks["spleen"].copy()
    masks["spleen"][:5] = True  # a "correction": something the phantom's own mask does not have
    case = corrections.save_case(tmp_path, phantom.volume, masks, ["Spleen", "liver tumor"], source="builtin")
    assert case.annotated == ("spleen", "liver tumor")
    manifest = data.load_manifest(tmp_path / corrections.MANIFEST)
    assert data.validate_manifest(manifest, read_labels=True, classes=MODEL_CLASSES) == []
    (c,) = manifest.cases
    expected = [n in ("spleen", "liver tumor") for n in MODEL_CLASSES]
    assert c.availability(MODEL_CLASSES).tolist() == expected
    volume = load_volume(c.image)
    targets = data.case_targets(c, volume, MODEL_CLASSES)
    assert np.array_equal(targets[0], masks["spleen"])
    assert np.array_equal(targets[MODEL_CLASSES.index("liver tumor")], masks["liver tumor"])
    assert not targets[
        MODEL_CLASSES.index("liver")
    ].any()  # not corrected: no information, masked in training
    values = set(np.unique(load_label(c.label, like=volume)).tolist())
    assert values == {0, 1, 27}  # spleen and liver tumour ids only
    assert np.allclose(volume.array, np.rint(phantom.volume.array), atol=0.5)


def test_cases_accumulate_and_a_name_is_replaced(tmp_path, phantom):
    corrections.save_case(tmp_path, phantom.volume, phantom.masks, ["liver"], name="a")
    corrections.save_case(tmp_path, phantom.volume, phantom.masks, ["aorta", "stomach"], name="b")
    corrections.save_case(tmp_path, phantom.volume, phantom.masks, ["stomach"], name="a")  # saved again
    listed = corrections.list_cases(tmp_path)
    assert [(c.name, c.annotated) for c in listed] == [("b", ("aorta", "stomach")), ("a", ("stomach",))]
    assert listed[1].voxels == {"stomach": int(phantom.masks["stomach"].sum())}
    assert sorted(p.name for p in (tmp_path / "cases").iterdir()) == ["a", "b"]  # no temporary folder left
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert corrections.list_cases(tmp_path / "nothing") == []


def test_names_stay_inside_the_folder(tmp_path, phantom):
    case = corrections.save_case(
        tmp_path / "ds", phantom.volume, phantom.masks, ["liver"], name="../../etc/x y"
    )
    assert case.name == "etc_x_y"
    assert case.image.resolve().is_relative_to((tmp_path / "ds").resolve())


def test_bad_input_is_refused_before_anything_is_written(tmp_path, phantom):
    with pytest.raises(InputError, match="at least one class"):
        corrections.save_case(tmp_path, phantom.volume, phantom.masks, [])
    with pytest.raises(InputError, match="segment these classes"):
        corrections.save_case(tmp_path, phantom.volume, {"liver": phantom.masks["liver"]}, ["spleen"])
    with pytest.raises(InputError, match="grid"):
        corrections.save_case(tmp_path, phantom.volume, {"liver": np.zeros((2, 2, 2), bool)}, ["liver"])
    assert not (tmp_path / "cases").exists()
    (tmp_path / corrections.MANIFEST).write_text(json.dumps({"something": 1}))
    with pytest.raises(InputError, match="not a dataset manifest"):
        corrections.save_case(tmp_path, phantom.volume, phantom.masks, ["liver"])
    assert not (tmp_path / "cases").exists()


def test_names_that_reduce_to_the_same_safe_name_never_replace_each_other(tmp_path, phantom):
    corrections.save_case(tmp_path, phantom.volume, phantom.masks, ["liver"], name="patient 1")
    with pytest.raises(InputError, match="another name"):
        corrections.save_case(tmp_path, phantom.volume, phantom.masks, ["spleen"], name="patient/1")
    corrections.save_case(tmp_path, phantom.volume, phantom.masks, ["aorta"], name="patient 1")  # same: replaced
    (case,) = corrections.list_cases(tmp_path)
    assert (case.name, case.given_name, case.annotated) == ("patient_1", "patient 1", ("aorta",))
