"""universal.phantom: a deterministic synthetic abdominal CT with one-vs-all labels."""

from __future__ import annotations

import numpy as np
import pytest

from universal.errors import InputError
from universal.io import Volume
from universal.phantom import Phantom, make_phantom
from universal.taxonomy import masks_to_label_map, resolve_class


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom()


def _world_centroid(p: Phantom, name: str) -> np.ndarray:
    ijk = np.argwhere(p.masks[name]).mean(0)
    return p.volume.affine[:3, :3] @ ijk + p.volume.affine[:3, 3]


def test_structure(phantom):
    v = phantom.volume
    assert isinstance(v, Volume)
    assert v.shape == (128, 128, 96) and v.array.dtype == np.float32
    assert v.name == "phantom"
    np.testing.assert_allclose(v.affine, np.diag([1.5, 1.5, 1.5, 1.0]))
    assert v.spacing == (1.5, 1.5, 1.5)
    assert phantom.label_map.dtype == np.int16 and phantom.label_map.shape == v.shape
    assert len(phantom.classes) >= 14
    assert phantom.classes == list(phantom.masks)
    indices = [resolve_class(n).index for n in phantom.classes]
    assert indices == sorted(indices)
    for name, m in phantom.masks.items():
        assert resolve_class(name).name == name
        assert m.dtype == bool and m.shape == v.shape and m.any(), name
    assert np.array_equal(phantom.label_map, masks_to_label_map(phantom.masks))


def test_required_classes_present(phantom):
    required = {
        "liver",
        "spleen",
        "right kidney",
        "left kidney",
        "stomach",
        "aorta",
        "inferior vena cava",
        "pancreas",
        "gallbladder",
        "esophagus",
        "right lung",
        "left lung",
        "duodenum",
        "bladder",
        "colon",
        "liver tumor",
        "kidney tumor",
        "lung tumor",
    }
    assert required <= set(phantom.classes)


def test_deterministic_per_seed(phantom):
    again = make_phantom(seed=0)
    assert np.array_equal(again.volume.array, phantom.volume.array)
    assert np.array_equal(again.label_map, phantom.label_map)
    other = make_phantom(seed=1)
    assert not np.array_equal(other.volume.array, phantom.volume.array)
    assert not np.array_equal(other.label_map, phantom.label_map)


def test_hu_plausible(phantom):
    hu = phantom.volume.array
    m = phantom.masks
    assert 40 <= hu[m["liver"]].mean() <= 80
    assert 30 <= hu[m["spleen"]].mean() <= 70
    for lung in ("right lung", "left lung"):
        assert hu[m[lung]].mean() < -700
    assert hu[m["aorta"]].mean() > 100  # contrast-enhanced
    assert hu[m["liver tumor"]].mean() < hu[m["liver"] & ~m["liver tumor"]].mean() - 20  # hypodense
    assert (hu[m["stomach"]] < -500).any()  # some air in the stomach
    corners = np.concatenate([hu[:4, :4].ravel(), hu[-4:, -4:].ravel()])
    assert corners.mean() < -950  # air outside the body
    assert 5 <= hu[:4, :4].std() <= 30  # noise
    # bone is present but not labelled
    bone = hu > 600
    assert bone.sum() > 100
    femoral = m["left femoral head"] | m["right femoral head"]
    assert (phantom.label_map[bone & ~femoral] == 0).mean() > 0.9


def test_tumours_inside_their_organs(phantom):
    m = phantom.masks
    assert (m["liver tumor"] <= m["liver"]).all()
    assert (m["kidney tumor"] <= (m["right kidney"] | m["left kidney"])).all()
    assert (m["lung tumor"] <= (m["right lung"] | m["left lung"])).all()
    if "kidney cyst" in m:
        assert (m["kidney cyst"] <= (m["right kidney"] | m["left kidney"])).all()
    # tumours are drawn over organs in the label map
    assert (phantom.label_map[m["liver tumor"]] == resolve_class("liver tumor").index).all()
    # organs do not overlap each other
    organs = [n for n in m if not resolve_class(n).is_tumor]
    assert (sum(m[n].astype(np.int8) for n in organs) <= 1).all()


def test_anatomical_layout(phantom):
    c = {n: _world_centroid(phantom, n) for n in phantom.masks}
    # RAS+: the patient's right is larger world x
    assert c["liver"][0] > c["spleen"][0]
    assert c["right kidney"][0] > c["left kidney"][0]
    assert c["right lung"][0] > c["left lung"][0]
    assert c["inferior vena cava"][0] > c["aorta"][0]
    # kidneys posterior (smaller y) to stomach, liver and pancreas
    for kidney in ("right kidney", "left kidney"):
        assert c[kidney][1] < min(c["stomach"][1], c["pancreas"][1], c["liver"][1])
    # lungs superior, bladder inferior
    assert min(c["right lung"][2], c["left lung"][2]) > c["liver"][2] > c["bladder"][2]
    assert c["esophagus"][2] > c["pancreas"][2]


def test_same_anatomy_at_another_spacing(phantom):
    coarse = make_phantom((96, 96, 72), spacing=(2.0, 2.0, 2.0))
    assert set(coarse.classes) == set(phantom.classes)
    fine_ml = {n: m.sum() * 1.5**3 / 1000 for n, m in phantom.masks.items()}
    coarse_ml = {n: m.sum() * 2.0**3 / 1000 for n, m in coarse.masks.items()}
    for name, ml in fine_ml.items():
        if ml >= 5:
            assert coarse_ml[name] == pytest.approx(ml, rel=0.15), name
    # same position in mm
    for name in ("liver", "spleen", "left kidney"):
        np.testing.assert_allclose(_world_centroid(coarse, name), _world_centroid(phantom, name), atol=3.0)


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((64, 64, 48), (1.5, 1.5, 1.5)), ((96, 96, 64), (1.5, 1.5, 1.5)), ((80, 72, 40), (1.0, 1.2, 3.0))],
)
def test_other_shapes(shape, spacing):
    p = make_phantom(shape, spacing=spacing, seed=3)
    assert p.volume.shape == shape and p.label_map.shape == shape
    assert p.volume.spacing == pytest.approx(spacing)
    assert len(p.classes) >= 14
    assert (p.masks["liver tumor"] <= p.masks["liver"]).all()
    assert _world_centroid(p, "liver")[0] > _world_centroid(p, "spleen")[0]


@pytest.mark.parametrize(
    ("shape", "spacing"), [((4, 64, 64), (1, 1, 1)), ((64, 64), (1, 1)), ((32, 32, 32), (1, 0, 1))]
)
def test_bad_arguments(shape, spacing):
    with pytest.raises(InputError):
        make_phantom(shape, spacing=spacing)
