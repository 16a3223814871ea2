"""Mask editing (universal.edit): strokes land on the voxel shown, component removal, copy to neighbours,
undo/redo with bounded memory. Small arrays only."""

from __future__ import annotations

import numpy as np
import pytest

from universal import edit, viz
from universal.errors import InputError

SHAPE = (7, 5, 4)  # X, Y, Z all different, so a swapped axis cannot pass


@pytest.mark.parametrize("view", edit.VIEWS)
def test_voxel_of_inverts_orient_slice(view):
    ids = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    for k in range(viz.num_slices(SHAPE, view)):
        shown = viz.orient_slice(ids, view, k)
        assert shown.shape == edit.slice_shape(SHAPE, view)
        rows, cols = np.indices(shown.shape)
        vox = edit.voxel_of(SHAPE, view, k, rows, cols)
        assert np.array_equal(np.ravel_multi_index(vox, SHAPE), shown)


@pytest.mark.parametrize("view", edit.VIEWS)
def test_stroke_edits_exactly_the_voxel_displayed_there(view):
    """The dashboard shows slice_overlay(...).square(min_size): stretched for anisotropic voxels and enlarged.
    A dab at display pixel (r, c) must turn on exactly the voxel whose value that pixel shows."""
    spacing = (0.8, 1.0, 3.0)
    ids = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    k = 2
    hw = edit.slice_shape(SHAPE, view)
    display = viz.square_pixels(viz.orient_slice(ids, view, k), viz.slice_aspect(spacing, view), min_size=50)
    assert display.shape != hw  # the check is about a scaled display
    mask = np.zeros(SHAPE, bool)
    rng = np.random.default_rng(0)
    for r, c in zip(rng.integers(0, display.shape[0], 12), rng.integers(0, display.shape[1], 12)):
        e = edit.stroke_edit(mask, view, k, [(r + 0.5, c + 0.5)], radius=0.5, display_hw=display.shape)
        assert e.on.tolist() == [int(display[r, c])]
        assert edit.click_voxel(SHAPE, view, k, (r + 0.5, c + 0.5), display.shape) == np.unravel_index(
            display[r, c], SHAPE
        )


def test_brush_radius_and_connected_line():
    hw = (40, 60)
    dab = edit.stroke_pixels([(20.5, 30.5)], 5.0, hw)
    assert dab.sum() == pytest.approx(np.pi * 25, rel=0.1)
    assert dab[20, 30] and not dab[20, 36] and dab[20, 35]
    line = edit.stroke_pixels([(2.5, 2.5), (2.5, 50.5)], 0.0, hw)  # zero radius: the pixels under the line
    assert line[2, 2:51].all() and line.sum() == 49
    # display twice the slice size: a 4-display-pixel radius is 2 slice pixels
    half = edit.stroke_pixels([(41.0, 61.0)], 4.0, hw, display_hw=(80, 120))
    assert half[20, 30] and half[20, 32] and not half[20, 33]


def test_brush_and_eraser_record_only_changes_and_do_not_mutate():
    mask = np.zeros((6, 6, 3), bool)
    mask[0:3, 0:3, 1] = True  # y 0..2: display row 0 of the axial view (y = 5) is empty
    before = mask.copy()
    brush = edit.stroke_edit(mask, "axial", 1, [(0.5, 0.5), (0.5, 5.5)], 0.4, "brush")
    new = edit.apply_edit(mask, brush)
    assert np.array_equal(mask, before)  # input unchanged
    assert (
        brush.off.size == 0
        and brush.on.size == 6
        and np.all(~mask.reshape(-1)[brush.on])
        and np.all(new.reshape(-1)[brush.on])
    )
    assert edit.stroke_edit(new, "axial", 1, [(0.5, 0.5), (0.5, 5.5)], 0.4, "brush").size == 0
    eraser = edit.stroke_edit(new, "axial", 1, [(0.5, 0.5), (0.5, 5.5)], 0.4, "eraser")
    assert eraser.on.size == 0 and eraser.off.size == 6
    assert np.array_equal(edit.apply_edit(new, eraser), before)  # row 0 of the display: y = 5, was empty


def test_remove_component_at_clicked_voxel():
    mask = np.zeros((12, 12, 6), bool)
    mask[1:4, 1:4, 1:4] = True  # component A
    mask[7:11, 7:11, 2:5] = True  # component B
    e = edit.component_edit(mask, (8, 8, 3), name="liver")
    out = edit.apply_edit(mask, e)
    assert e.name == "liver" and e.off.size == 4 * 4 * 3
    assert out[1:4, 1:4, 1:4].all() and not out[7:11, 7:11, 2:5].any()
    assert edit.component_edit(mask, (0, 11, 0)).size == 0  # background: nothing to remove
    diagonal = np.zeros((3, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    assert edit.component_edit(diagonal, (0, 0, 0), connectivity=26).size == 2
    assert edit.component_edit(diagonal, (0, 0, 0), connectivity=6).size == 1
    with pytest.raises(InputError, match="outside"):
        edit.component_edit(mask, (12, 0, 0))


def test_copy_slice_to_neighbours():
    mask = np.zeros((5, 5, 8), bool)
    mask[1:4, 1:4, 3] = True
    mask[0, 0, 5] = True  # will be overwritten by slice 3's content
    e = edit.copy_to_neighbours_edit(mask, "axial", 3, 2)
    out = edit.apply_edit(mask, e)
    for z in (1, 2, 3, 4, 5):
        assert np.array_equal(out[:, :, z], mask[:, :, 3])
    assert not out[:, :, 0].any() and not out[:, :, 6].any()
    up = edit.apply_edit(mask, edit.copy_to_neighbours_edit(mask, "axial", 3, 1, "up"))
    assert up[:, :, 4].any() and not up[:, :, 2].any()
    edge = edit.copy_to_neighbours_edit(mask, "coronal", 0, 3, "down")  # nothing below slice 0
    assert edge.size == 0
    sag = edit.apply_edit(mask, edit.copy_to_neighbours_edit(mask, "sagittal", 2, 1))
    assert np.array_equal(sag[1], mask[2]) and np.array_equal(sag[3], mask[2])
    assert np.array_equal(edit.apply_edit(out, e.inverse()), mask)


def test_history_undo_redo_and_corrected_classes():
    liver, spleen = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    h = edit.EditHistory({"liver": liver, "spleen": spleen})
    e1 = edit.stroke_edit(liver, "axial", 0, [(1.5, 1.5)], 1.0, name="liver")
    assert h.do(e1) and h.corrected == ["liver"]
    assert not liver.any()  # the caller's array is never written
    snap = h.masks["liver"].copy()
    e2 = edit.component_edit(h.masks["liver"], np.argwhere(snap)[0], name="liver")
    h.do(e2)
    assert not h.masks["liver"].any()
    assert h.undo() is e2 and np.array_equal(h.masks["liver"], snap)
    assert h.redo() is e2 and not h.masks["liver"].any()
    h.undo(), h.undo()
    assert not h.can_undo and h.corrected == [] and h.undo() is None
    h.redo()
    h.do(edit.stroke_edit(spleen, "coronal", 1, [(0.5, 0.5)], 0.4, name="spleen"))
    assert not h.can_redo  # a new edit clears the redo list
    assert h.corrected == ["liver", "spleen"]
    assert not h.do(edit.Edit("liver"))  # empty edits are not history steps
    with pytest.raises(InputError, match="no mask"):
        h.do(edit.Edit("aorta", on=np.array([0])))


def test_history_memory_is_bounded_by_diffs():
    mask = np.zeros((64, 64, 16), bool)
    h = edit.EditHistory({"liver": mask}, max_bytes=4000)
    for z in range(16):
        h.do(edit.stroke_edit(h.masks["liver"], "axial", z, [(32.0, 32.0)], 8.0, name="liver"))
    assert h.nbytes <= 4000 and h.dropped > 0
    assert h.masks["liver"][:, :, :].any(axis=(0, 1)).all()  # dropped steps stay applied
    while h.can_undo:
        h.undo()
    assert h.masks["liver"].any() and h.corrected == ["liver"]  # what cannot be undone still counts
    assert edit.EditHistory({"a": mask}, max_steps=3)._done == []
    short = edit.EditHistory({"a": mask}, max_steps=2)
    for z in range(5):
        short.do(edit.Edit("a", on=np.array([z])))
    assert short.dropped == 3


def test_bad_arguments_are_one_clear_error():
    m = np.zeros(SHAPE, bool)
    with pytest.raises(InputError, match="unknown view"):
        edit.stroke_edit(m, "oblique", 0, [(0, 0)], 1)
    with pytest.raises(InputError, match="outside the axial"):
        edit.stroke_edit(m, "axial", 4, [(0, 0)], 1)
    with pytest.raises(InputError, match="mode"):
        edit.stroke_edit(m, "axial", 0, [(0, 0)], 1, mode="fill")
    with pytest.raises(InputError, match="radius"):
        edit.stroke_edit(m, "axial", 0, [(0, 0)], -1)
    with pytest.raises(InputError, match="at least one point"):
        edit.stroke_edit(m, "axial", 0, [], 1)
    with pytest.raises(InputError, match="outside the displayed"):
        edit.click_voxel(SHAPE, "axial", 0, (100, 0))
