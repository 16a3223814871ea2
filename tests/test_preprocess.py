"""Tests of universal.preprocess: geometry of the prepared grid and its exact inverse onto the source grid."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from universal import preprocess as pp
from universal.io import Volume
from universal.preprocess import PreprocessConfig, foreground_box, preprocess, resample_to_source, window


def _rotation(deg: float) -> np.ndarray:
    """A small rotation about the S axis (an oblique but still RAS+ grid)."""
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _volume(shape, spacing, origin=(0.0, 0.0, 0.0), rot_deg: float = 0.0, fill=-1000.0) -> Volume:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(rot_deg) @ np.diag(spacing)
    affine[:3, 3] = origin
    # built directly (no input checks: these synthetic volumes are deliberately uniform or oblique)
    return Volume(array=np.full(shape, fill, np.float32), affine=affine)


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return np.asarray(ijk, float) @ affine[:3, :3].T + affine[:3, 3]


def _centroid_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return _world(affine, np.argwhere(mask).mean(axis=0))


def test_doctests():
    assert doctest.testmod(pp, optionflags=doctest.ELLIPSIS).failed == 0


def test_window_maps_hu_to_unit_interval():
    hu = np.array([-2000.0, -175.0, 37.5, 250.0, 4000.0], np.float32)
    np.testing.assert_allclose(window(hu), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert window(hu).dtype == np.float32
    with pytest.raises(ValueError):
        window(hu, (100, 100))


def test_foreground_box_with_margin_and_empty_volume():
    hu = np.full((30, 20, 10), -1000, np.float32)
    hu[5:10, 3:4, 2:9] = 0
    assert foreground_box(hu, (1.0, 1.0, 1.0)) == ((5, 10), (3, 4), (2, 9))
    # margin 2 mm = 2 voxels along x/y, 1 voxel along z (2.5 mm spacing rounds up)
    assert foreground_box(hu, (1.0, 1.0, 2.5), margin_mm=2) == ((3, 12), (1, 6), (1, 10))
    assert foreground_box(np.full((4, 5, 6), -1000.0), (1, 1, 1)) == ((0, 4), (0, 5), (0, 6))


def test_preprocess_geometry_anisotropic():
    vol = _volume((120, 110, 24), (0.7, 0.7, 5.0), origin=(-40.0, 12.0, 300.0))
    arr = vol.array.copy()
    arr[20:100, 15:95, 3:21] = 40.0  # body
    arr[50:60, 50:60, 10:12] = 1000.0  # bone
    vol = vol.with_array(arr)
    p = preprocess(vol, PreprocessConfig(margin_mm=0))
    assert p.box == ((20, 100), (15, 95), (3, 21))
    n = np.array([80, 80, 18])
    expected_shape = tuple(int(round(v)) for v in n * np.array([0.7, 0.7, 5.0]) / 1.5)
    assert p.shape == expected_shape == (37, 37, 60)
    assert p.array.dtype == np.float32
    assert 0.0 <= p.array.min() and p.array.max() <= 1.0
    np.testing.assert_allclose(p.array[0, 0, 0], (40 + 175) / 425, atol=1e-6)
    assert p.array.max() == pytest.approx(1.0)
    # effective spacing within half a prepared voxel over the box of 1.5 mm
    for s, m in zip(p.spacing, p.shape):
        assert abs(s - 1.5) <= 1.5 / m + 1e-9
    # the prepared affine has the effective spacing and maps voxel centres consistently with source_to_prepared
    np.testing.assert_allclose(np.linalg.norm(p.affine[:3, :3], axis=0), p.spacing)
    ijk = np.array([[20.0, 15.0, 3.0], [99.0, 94.0, 20.0], [57.3, 40.2, 11.7]])
    np.testing.assert_allclose(
        _world(p.affine, p.source_to_prepared(ijk)), _world(vol.affine, ijk), atol=1e-9
    )
    # both grids cover the same physical box: outer faces of the crop box == outer faces of the prepared grid
    lo_src = _world(vol.affine, np.array([20, 15, 3]) - 0.5)
    lo_prep = _world(p.affine, np.array([-0.5, -0.5, -0.5]))
    np.testing.assert_allclose(lo_prep, lo_src, atol=1e-9)
    assert p.source_shape == vol.shape
    np.testing.assert_array_equal(p.source_affine, vol.affine)


def test_preprocess_without_crop_and_fast_spacing():
    vol = _volume((40, 40, 20), (1.5, 1.5, 1.5), fill=0.0)
    p = preprocess(vol, PreprocessConfig(crop_foreground=False, spacing_mm=3.0))
    assert p.box == ((0, 40), (0, 40), (0, 20))
    assert p.shape == (20, 20, 10)
    np.testing.assert_allclose(p.spacing, (3.0, 3.0, 3.0))
    # identity resampling at the source spacing keeps the windowed values exactly
    rng = np.random.default_rng(0)
    vol2 = vol.with_array(rng.normal(0, 200, vol.shape).astype(np.float32))
    p2 = preprocess(vol2, PreprocessConfig(crop_foreground=False))
    np.testing.assert_allclose(p2.array, window(vol2.array), atol=1e-6)


def test_preprocess_does_not_mutate_input():
    vol = _volume((30, 30, 10), (1.0, 1.0, 3.0), fill=10.0)
    before = vol.array.copy()
    preprocess(vol)
    np.testing.assert_array_equal(vol.array, before)


@pytest.mark.parametrize("rot_deg", [0.0, 17.0])
@pytest.mark.parametrize(
    "spacing,shape",
    [((0.7, 0.7, 5.0), (128, 120, 24)), ((2.0, 1.2, 0.8), (50, 80, 110)), ((1.5, 1.5, 1.5), (60, 64, 70))],
)
def test_cube_centroid_is_preserved_through_preprocess_and_back(spacing, shape, rot_deg):
    vol = _volume(shape, spacing, origin=(-100.0, 30.0, -500.0), rot_deg=rot_deg)
    arr = vol.array.copy()
    arr[10:-10, 10:-10, 2:-2] = 0.0  # body
    # a 16 mm cube off-centre
    c0 = [int(0.3 * s) for s in shape]
    size = [max(1, int(round(16.0 / sp))) for sp in spacing]
    cube = np.zeros(shape, bool)
    cube[tuple(slice(c, c + n) for c, n in zip(c0, size))] = True
    arr[cube] = 200.0
    vol = vol.with_array(arr)
    p = preprocess(vol)
    src_centroid = _centroid_world(cube, vol.affine)
    to_prep = np.linalg.inv(p.affine)
    to_src = np.linalg.inv(vol.affine)

    # forward: the cube seen on the prepared grid (HU 200 -> 0.88, body -> 0.41; threshold half-way) is where it
    # was, within half a prepared voxel along every axis
    prep_mask = p.array > 0.645
    prep_centroid = _centroid_world(prep_mask, p.affine)
    err_prep = np.abs(_world(to_prep, prep_centroid) - _world(to_prep, src_centroid))
    assert (err_prep <= 0.5 + 1e-6).all(), err_prep

    # inverse: exact shape, zeros outside the crop box, the mask's centroid stays within half a source voxel
    back = resample_to_source(prep_mask, p, order=1)
    assert back.shape == vol.shape and back.dtype == bool
    outside = np.ones(vol.shape, bool)
    outside[tuple(slice(a, b) for a, b in p.box)] = False
    assert not back[outside].any()
    back_centroid = _centroid_world(back, vol.affine)
    err_src = np.abs(_world(to_src, back_centroid) - _world(to_src, prep_centroid))
    assert (err_src <= 0.5 + 1e-6).all(), err_src
    # round trip: within half a source voxel along every axis
    err_trip = np.abs(_world(to_src, back_centroid) - _world(to_src, src_centroid))
    assert (err_trip <= 0.5).all(), err_trip
    dsc = 2 * (back & cube).sum() / (back.sum() + cube.sum())
    assert dsc > 0.8
    nearest = resample_to_source(prep_mask, p, order=0)
    err_nn = np.abs(_world(to_src, _centroid_world(nearest, vol.affine)) - _world(to_src, prep_centroid))
    assert (err_nn <= 0.5 + 1e-6).all(), err_nn


def _full_reference(arr: np.ndarray, p, order: int) -> np.ndarray:
    """torch.nn.functional.interpolate over the whole crop box (the slow, obviously-correct inverse)."""
    t = torch.from_numpy(arr.astype(np.float32))[None, None]
    size = tuple(b - a for a, b in p.box)
    if order == 1:
        r = F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
    else:
        r = F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy()
    out = np.zeros(p.source_shape, np.float32)
    out[tuple(slice(a, b) for a, b in p.box)] = r
    return out


@pytest.mark.parametrize("order", [0, 1])
def test_resample_to_source_equals_full_interpolation(order):
    rng = np.random.default_rng(1)
    vol = _volume((50, 43, 17), (0.7, 0.9, 4.0), origin=(5.0, -7.0, 11.0))
    arr = rng.normal(0, 300, vol.shape).astype(np.float32)
    arr[:3] = -1000
    arr[:, -5:] = -1000
    p = preprocess(vol.with_array(arr), PreprocessConfig(margin_mm=0))
    assert p.box == ((3, 50), (0, 38), (0, 17))
    for trial in range(6):
        mask = np.zeros(p.shape, bool)
        start = [int(rng.integers(0, s)) for s in p.shape]
        if trial == 0:
            start = [0, 0, 0]  # touching the grid's edges
        ext = [int(rng.integers(1, 8)) for _ in range(3)]
        mask[tuple(slice(s, s + e) for s, e in zip(start, ext))] = True
        ref = _full_reference(mask, p, order)
        got_bool = resample_to_source(mask, p, order=order)
        np.testing.assert_array_equal(got_bool, ref >= 0.5)
        got_float = resample_to_source(mask.astype(np.float32), p, order=order)
        np.testing.assert_allclose(got_float, ref, atol=1e-5)
    # multi-channel float16 probabilities keep their dtype
    probs = rng.random((2, *p.shape)).astype(np.float16)
    out = resample_to_source(probs, p, order=1)
    assert out.shape == (2, *vol.shape) and out.dtype == np.float16
    np.testing.assert_allclose(out[1], _full_reference(probs[1].astype(np.float32), p, 1), atol=2e-3)


def test_resample_to_source_labels_and_errors():
    vol = _volume((40, 30, 20), (1.0, 1.0, 2.0), fill=0.0)
    p = preprocess(vol, PreprocessConfig(crop_foreground=False))
    labels = np.zeros(p.shape, np.int16)
    labels[5:10, 5:10, 5:10] = 7
    labels[12:20, 5:10, 5:10] = 3
    out = resample_to_source(labels, p, order=0)
    assert out.dtype == np.int16 and out.shape == vol.shape
    assert set(np.unique(out)) == {0, 3, 7}
    with pytest.raises(ValueError, match="order=0"):
        resample_to_source(labels, p, order=1)
    with pytest.raises(ValueError):
        resample_to_source(np.zeros((3, 3, 3), bool), p)
    empty = resample_to_source(np.zeros(p.shape, bool), p)
    assert empty.shape == vol.shape and not empty.any()
