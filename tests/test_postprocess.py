"""Tests of universal/postprocess.py: each rule on synthetic masks, sides in world coordinates, no mutation."""

from __future__ import annotations

import numpy as np
import pytest

from universal.errors import InputError
from universal.postprocess import (
    CONNECTIVITY,
    PostprocessConfig,
    assign_sides,
    body_midline_x_mm,
    keep_largest_component,
    postprocess,
    remove_small_components,
    restrict_to_parent,
)

SHAPE = (60, 40, 30)
SPACING = 1.5
RAS = np.diag([SPACING, SPACING, SPACING, 1.0])  # x grows with the first index: larger i = patient's right


def _las(shape=SHAPE) -> np.ndarray:
    """LAS grid: the first axis runs toward the patient's LEFT (world x = -1.5 * i + offset)."""
    a = RAS.copy()
    a[0, 0] = -SPACING
    a[0, 3] = SPACING * (shape[0] - 1)
    return a


def _box(lo, hi, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def _snapshot(masks):
    return {n: m.copy() for n, m in masks.items()}


# ------------------------------------------------------------------------------------------------ single rules
def test_keep_largest_component():
    big = _box((5, 5, 5), (15, 15, 15))
    small = _box((30, 30, 20), (33, 33, 23))
    m = big | small
    m0 = m.copy()
    out = keep_largest_component(m)
    assert np.array_equal(out, big)
    assert np.array_equal(m, m0) and out is not m
    assert not keep_largest_component(np.zeros(SHAPE, bool)).any()
    single = keep_largest_component(big)
    assert np.array_equal(single, big) and single is not big


def test_connectivity_is_26():
    assert CONNECTIVITY == 26
    m = np.zeros((10, 10, 10), bool)
    m[2:5, 2:5, 2:5] = True
    m[5, 5, 5] = True  # corner contact only
    m[7:9, 7:9, 7:9] = True  # separate
    out = keep_largest_component(m)
    assert out[5, 5, 5] and not out[7, 7, 7]


def test_remove_small_components_in_mm3():
    a = _box((5, 5, 5), (15, 15, 15))
    b = _box((30, 30, 20), (32, 32, 22))  # 8 voxels of 1.5 mm = 27 mm³
    m = a | b
    kept = remove_small_components(m, 20.0, (SPACING,) * 3)
    assert np.array_equal(kept, m)
    gone = remove_small_components(m, 30.0, (SPACING,) * 3)
    assert np.array_equal(gone, a)
    assert np.array_equal(remove_small_components(m, 30.0, RAS), a)  # an affine works as spacing
    assert np.array_equal(remove_small_components(m, 0.0), m)
    # anisotropic voxels: 8 voxels of 1 x 1 x 5 mm = 40 mm³
    assert np.array_equal(remove_small_components(m, 30.0, (1.0, 1.0, 5.0)), m)


def _kidneys():
    """A left kidney at small i and a right kidney at large i -- on a RAS grid."""
    left = _box((5, 10, 10), (15, 22, 22))
    right = _box((42, 10, 10), (53, 22, 22))  # a little larger than the left one
    return right, left


def test_assign_sides_moves_a_component_to_the_correct_side_ras():
    true_right, true_left = _kidneys()
    pred_right = true_right | true_left  # the model called both kidneys "right"
    pred_left = np.zeros(SHAPE, bool)
    r, l_ = assign_sides(pred_right, pred_left, RAS)
    assert np.array_equal(r, true_right) and np.array_equal(l_, true_left)
    # swapped labels are swapped back
    r, l_ = assign_sides(true_left, true_right, RAS)
    assert np.array_equal(r, true_right) and np.array_equal(l_, true_left)


def test_assign_sides_uses_world_coordinates_las():
    # the very same arrays on a LAS grid: large i is now the patient's LEFT
    a, b = _kidneys()
    r, l_ = assign_sides(a | b, np.zeros(SHAPE, bool), _las())
    assert np.array_equal(r, b) and np.array_equal(l_, a)
    # and postprocess does the same through the affine
    out = postprocess({"right kidney": a | b, "left kidney": np.zeros(SHAPE, bool)}, _las())
    assert np.array_equal(out["right kidney"], b) and np.array_equal(out["left kidney"], a)


def test_assign_sides_keeps_largest_per_side_and_drops_small():
    right, left = _kidneys()
    frag = _box((45, 30, 25), (47, 32, 27))  # small fragment on the right
    r, l_ = assign_sides(right | frag, left, RAS)
    assert np.array_equal(r, right) and np.array_equal(l_, left)
    r, l_ = assign_sides(right | frag, left, RAS, keep_largest=False)
    assert np.array_equal(r, right | frag)
    r, _ = assign_sides(right | frag, left, RAS, keep_largest=False, min_component_mm3=50)
    assert np.array_equal(r, right)


def test_assign_sides_midline_choices():
    right, left = _kidneys()
    # one kidney only: the grid centre decides (i = 29.5) -> the right one stays right
    r, l_ = assign_sides(right, np.zeros(SHAPE, bool), RAS)
    assert np.array_equal(r, right) and not l_.any()
    # a body midline to the right of that kidney makes it the left kidney
    r, l_ = assign_sides(right, None, RAS, body_x_mm=SPACING * 55)
    assert not r.any() and l_.shape == SHAPE and not l_.any()  # left not predicted: dropped
    r, l_ = assign_sides(right, np.zeros(SHAPE, bool), RAS, body_x_mm=SPACING * 55)
    assert not r.any() and np.array_equal(l_, right)
    with pytest.raises(InputError):
        assign_sides(None, None, RAS)
    with pytest.raises(InputError):
        assign_sides(right, left, np.eye(3))


def test_body_midline_x_mm():
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[30:50] = 40.0  # body occupies i = 30..49 -> centre 39.5
    assert body_midline_x_mm(ct, RAS) == pytest.approx(39.5 * SPACING)
    assert body_midline_x_mm(ct, _las()) == pytest.approx(SPACING * (SHAPE[0] - 1) - 39.5 * SPACING)


def test_restrict_to_parent():
    liver = _box((10, 10, 10), (30, 30, 20))
    inside = _box((15, 15, 12), (18, 18, 15))
    touching = _box((30, 12, 12), (33, 15, 15))  # face contact with the liver (i = 29 | 30)
    near = _box((32, 20, 12), (34, 22, 14))  # 2 voxels = 3 mm gap
    far = _box((40, 30, 22), (44, 34, 26))
    tumor = inside | touching | near | far
    t0 = tumor.copy()
    out = restrict_to_parent(tumor, liver, (SPACING,) * 3, margin_mm=5.0)
    assert np.array_equal(out, inside | touching | near)
    assert np.array_equal(tumor, t0)
    strict = restrict_to_parent(tumor, liver, (SPACING,) * 3, margin_mm=0.0)
    assert np.array_equal(strict, inside | touching)
    assert not restrict_to_parent(tumor, np.zeros(SHAPE, bool), (SPACING,) * 3).any()


def test_restrict_to_parent_margin_is_in_mm_on_anisotropic_grids():
    organ = _box((10, 10, 10), (20, 20, 12))
    above = _box((12, 12, 13), (15, 15, 14))  # one empty slice in z between them
    assert restrict_to_parent(above, organ, (1.0, 1.0, 1.0), margin_mm=1.0).any()
    assert not restrict_to_parent(above, organ, (1.0, 1.0, 6.0), margin_mm=5.0).any()  # gap 6 mm > 5 mm
    assert restrict_to_parent(above, organ, (1.0, 1.0, 6.0), margin_mm=6.0).any()


# ------------------------------------------------------------------------------------------------ pipeline
def _scene():
    right, left = _kidneys()
    liver = _box((35, 22, 5), (58, 38, 25))
    liver_speck = _box((2, 35, 2), (4, 37, 4))  # far-away false positive, 8 voxels
    kidney_tumor = _box((46, 14, 14), (49, 17, 17))  # inside the right kidney
    stray_tumor = _box((20, 35, 25), (24, 38, 29))  # near nothing
    colon = _box((20, 2, 2), (30, 6, 6)) | _box((20, 30, 2), (30, 34, 6))  # two pieces, both real
    return {
        "right kidney": right | left,  # both kidneys called "right"
        "left kidney": np.zeros(SHAPE, bool),
        "liver": liver | liver_speck,
        "kidney tumor": kidney_tumor | stray_tumor,
        "colon": colon,
    }, dict(right=right, left=left, liver=liver, kidney_tumor=kidney_tumor, colon=colon)


def test_postprocess_pipeline():
    masks, truth = _scene()
    before = _snapshot(masks)
    out = postprocess(masks, RAS)
    assert list(out) == list(masks)
    assert np.array_equal(out["right kidney"], truth["right"])
    assert np.array_equal(out["left kidney"], truth["left"])
    assert np.array_equal(out["liver"], truth["liver"])
    assert np.array_equal(
        out["kidney tumor"], truth["kidney_tumor"]
    )  # stray one removed, the inside one kept
    assert np.array_equal(out["colon"], truth["colon"])  # multi-component class keeps its pieces
    # inputs unchanged, outputs are new arrays
    for n in masks:
        assert np.array_equal(masks[n], before[n])
        assert out[n] is not masks[n]
        assert not np.shares_memory(out[n], masks[n])


def test_postprocess_config():
    masks, truth = _scene()
    off = postprocess(masks, RAS, PostprocessConfig(enabled=False))
    for n in masks:
        assert np.array_equal(off[n], masks[n]) and off[n] is not masks[n]
    no_sides = postprocess(masks, RAS, PostprocessConfig(fix_sides=False))
    assert np.array_equal(no_sides["right kidney"], truth["right"])  # largest kept, no move
    assert not no_sides["left kidney"].any()
    keep_all = postprocess(masks, RAS, PostprocessConfig(overrides={"liver": {"keep_largest": False}}))
    assert np.array_equal(keep_all["liver"], masks["liver"])  # the 8-voxel speck is 27 mm³ > 20 mm³
    colon_largest = postprocess(masks, RAS, PostprocessConfig(overrides={}))
    assert colon_largest["colon"].sum() == truth["colon"].sum() // 2
    untouched = postprocess(masks, RAS, PostprocessConfig(overrides={"kidney tumor": {"enabled": False}}))
    assert np.array_equal(untouched["kidney tumor"], masks["kidney tumor"])
    with pytest.raises(InputError):
        PostprocessConfig(overrides={"liver": {"keep_biggest": True}})
    assert PostprocessConfig().for_class("intestine").keep_largest is False
    assert PostprocessConfig().for_class("liver").keep_largest is True


def test_postprocess_tumour_without_its_parent_is_only_size_filtered():
    masks, truth = _scene()
    only_tumor = {"kidney tumor": masks["kidney tumor"]}
    out = postprocess(only_tumor, RAS)
    assert np.array_equal(out["kidney tumor"], masks["kidney tumor"])
    # an empty (requested) parent removes it
    out = postprocess({"liver": np.zeros(SHAPE, bool), "liver tumor": truth["kidney_tumor"]}, RAS)
    assert not out["liver tumor"].any()


def test_postprocess_single_side_class_drops_components_on_the_other_side():
    right, left = _kidneys()
    out = postprocess({"right adrenal gland": right | left}, RAS)
    assert np.array_equal(out["right adrenal gland"], right)


def test_postprocess_unknown_class_and_errors():
    m = _box((5, 5, 5), (10, 10, 10)) | _box((20, 20, 20), (22, 22, 22))
    out = postprocess({"my structure": m}, RAS)
    assert out["my structure"].sum() == 125  # treated as a single organ
    with pytest.raises(InputError):
        postprocess({"liver": m, "spleen": m[:-1]}, RAS)
    with pytest.raises(InputError):
        postprocess({"liver": m}, np.zeros((4, 4)))


def test_postprocess_works_on_bounding_boxes_of_large_volumes():
    shape = (300, 300, 200)
    m = np.zeros(shape, bool)
    m[100:120, 100:130, 50:70] = True
    m[250:252, 250:252, 150:152] = True
    tumor = np.zeros(shape, bool)
    tumor[100:105, 100:105, 150:155] = True  # 80 slices (160 mm) above the liver
    out = postprocess({"liver": m, "liver tumor": tumor}, np.diag([0.8, 0.8, 2.0, 1.0]))
    assert out["liver"].sum() == 20 * 30 * 20
    assert not out["liver tumor"].any()


def test_real_kidneys_swapped_labels_are_fixed(shared_data):
    """Real TotalSegmentator kidneys (RAS+ file): swapping the two labels is undone by world x."""
    nib = pytest.importorskip("nibabel")
    img = nib.load(str(shared_data / "ts_abdomen_3mm" / "labels_totalseg.nii.gz"))
    lab = np.asarray(img.dataobj).astype(np.int32)
    right, left = lab == 2, lab == 3  # TotalSegmentator v2: kidney_right = 2, kidney_left = 3
    assert right.any() and left.any()
    out = postprocess({"right kidney": left, "left kidney": right}, img.affine)
    assert np.array_equal(out["right kidney"], keep_largest_component(right))
    assert np.array_equal(out["left kidney"], keep_largest_component(left))
    # the same arrays flipped along the first axis, with the flipped affine, give the same world answer
    flip = img.affine @ np.array(
        [[-1, 0, 0, lab.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float
    )
    out = postprocess({"right kidney": left[::-1], "left kidney": right[::-1]}, flip)
    assert np.array_equal(out["right kidney"], keep_largest_component(right)[::-1])


def test_fast_labelling_equals_scipy_26_connectivity():
    from scipy import ndimage

    from universal.postprocess import _label

    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((40, 33, 27)).astype(np.float32), 1.5) > 0.52
    comps, n, sizes = _label(mask)
    expected, n_expected = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    assert n == n_expected > 5
    np.testing.assert_array_equal(comps, expected)
    assert sizes[1:].sum() == mask.sum() and len(sizes) == n + 1


def test_bounding_box_is_tight_grows_by_margin_clipped_and_none_when_empty():
    from scipy import ndimage

    from universal.postprocess import bounding_box

    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = np.zeros(SHAPE, bool)
        mask[tuple(rng.integers(0, s, 4) for s in SHAPE)] = True
        assert bounding_box(mask) == ndimage.find_objects(mask.astype(np.uint8))[0]  # the tight box
    mask = _box((0, 5, 10), (3, 8, 30))
    assert bounding_box(mask, (2, 1, 4)) == (
        slice(0, 5),
        slice(4, 9),
        slice(6, 30),
    )  # grown, clipped to the grid
    assert bounding_box(np.zeros(SHAPE, bool)) is None
    assert bounding_box(np.zeros(SHAPE, bool), (3, 3, 3)) is None
