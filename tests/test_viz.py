"""universal.viz: windows, display orientation, overlays in taxonomy colours, meshes under a triangle cap, charts."""

from __future__ import annotations

import io
import json
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from universal import viz
from universal.taxonomy import resolve_class


# ------------------------------------------------------------------------------------------------ windows
def test_window_presets_are_level_width_pairs():
    p = viz.window_presets()
    assert p == {
        "abdomen": (40.0, 400.0),
        "liver": (80.0, 150.0),
        "lung": (-600.0, 1500.0),
        "bone": (400.0, 1800.0),
    }


@pytest.mark.parametrize("name", ["abdomen", "liver", "lung", "bone"])
def test_apply_window_maps_the_preset_range_onto_0_255(name):
    level, width = viz.window_presets()[name]
    hu = np.array(
        [level - width / 2 - 500, level - width / 2, level, level + width / 2, level + width / 2 + 500]
    )
    g = viz.apply_window(hu, level, width)
    assert g.dtype == np.uint8
    assert g.tolist() == [0, 0, 128, 255, 255]
    # monotone in between
    ramp = viz.apply_window(np.linspace(level - width / 2, level + width / 2, 50), level, width)
    assert np.all(np.diff(ramp.astype(int)) >= 0)


def test_apply_window_specific_values():
    # abdomen (40, 400): -160 HU -> 0, 240 HU -> 255; liver (80, 150): 5 HU -> 0, 155 HU -> 255
    assert viz.apply_window(np.array([-160.0, 240.0]), 40, 400).tolist() == [0, 255]
    assert viz.apply_window(np.array([5.0, 80.0, 155.0]), 80, 150).tolist() == [0, 128, 255]
    # air is black in the abdomen window and mid-grey-ish in the lung window
    assert viz.apply_window(np.array([-1000.0]), *viz.window_presets()["abdomen"])[0] == 0
    assert 0 < viz.apply_window(np.array([-800.0]), *viz.window_presets()["lung"])[0] < 128
    with pytest.raises(ValueError):
        viz.apply_window(np.zeros(3), 0, 0)


# ------------------------------------------------------------------------------------------------ orientation
def _grid(shape=(10, 8, 6)):
    return np.zeros(shape, np.float32)


def test_axial_patient_right_is_on_the_image_left_and_anterior_on_top():
    vol = _grid()
    X, Y, Z = vol.shape
    right = vol.copy()
    right[X - 1, Y // 2, 3] = 1  # largest world x = patient's right
    img = viz.orient_slice(right, "axial", 3)
    assert img.shape == (Y, X)  # rows: y (A-P), cols: x (R-L)
    r, c = np.argwhere(img == 1)[0]
    assert c == 0, "patient's right must be on the image's left (radiological convention)"
    ant = vol.copy()
    ant[X // 2, Y - 1, 3] = 1  # largest y = anterior
    r, c = np.argwhere(viz.orient_slice(ant, "axial", 3) == 1)[0]
    assert r == 0, "anterior must be at the top"


def test_coronal_and_sagittal_have_superior_on_top():
    vol = _grid()
    X, Y, Z = vol.shape
    sup = vol.copy()
    sup[X - 1, 2, Z - 1] = 1  # right, superior
    img = viz.orient_slice(sup, "coronal", 2)
    assert img.shape == (Z, X)
    r, c = np.argwhere(img == 1)[0]
    assert (r, c) == (0, 0)  # superior at the top, patient's right on the left
    sag = vol.copy()
    sag[4, Y - 1, Z - 1] = 1  # anterior, superior
    img = viz.orient_slice(sag, "sagittal", 4)
    assert img.shape == (Z, Y)
    r, c = np.argwhere(img == 1)[0]
    assert (r, c) == (0, 0)  # superior top, anterior left


def test_orient_slice_rejects_bad_views_and_indices():
    with pytest.raises(ValueError):
        viz.orient_slice(_grid(), "oblique", 0)
    with pytest.raises(IndexError):
        viz.orient_slice(_grid(), "axial", 6)


def test_aspect_follows_anisotropic_spacing_and_square_pixels_stretch_rows():
    spacing = (0.8, 0.8, 3.0)
    assert viz.slice_aspect(spacing, "axial") == pytest.approx(1.0)
    assert viz.slice_aspect(spacing, "coronal") == pytest.approx(3.75)
    assert viz.slice_aspect(spacing, "sagittal") == pytest.approx(3.75)
    img = np.arange(4 * 10).reshape(4, 10)
    sq = viz.square_pixels(img, 2.5)
    assert sq.shape == (10, 10)
    assert np.array_equal(sq[0], img[0]) and np.array_equal(sq[-1], img[-1])
    big = viz.square_pixels(img, 1.0, min_size=100)
    assert max(big.shape) == 100


# ------------------------------------------------------------------------------------------------ overlays
def test_slice_overlay_uses_taxonomy_colours_at_the_right_place():
    vol = _grid((20, 16, 8)) - 1000  # air: black in the abdomen window
    liver = np.zeros(vol.shape, bool)
    liver[14:20, 4:12, 2:6] = True  # patient's right side
    spleen = np.zeros(vol.shape, bool)
    spleen[0:5, 4:12, 2:6] = True  # patient's left side
    out = viz.slice_overlay(
        vol, {"liver": liver, "spleen": spleen}, "axial", 4, opacity=1.0, spacing=(1, 1, 2)
    )
    assert out.rgb.dtype == np.uint8 and out.rgb.shape == (16, 20, 3)
    assert out.aspect == pytest.approx(1.0)
    liver_rgb = tuple(resolve_class("liver").color)
    spleen_rgb = tuple(resolve_class("spleen").color)
    # liver (patient right) on the image's left half, spleen on the right half
    assert tuple(out.rgb[8, 2]) == liver_rgb
    assert tuple(out.rgb[8, 17]) == spleen_rgb
    assert tuple(out.rgb[0, 10]) == (0, 0, 0)  # background stays the windowed CT


def test_slice_overlay_blends_with_opacity_and_draws_tumours_on_top():
    vol = _grid((10, 10, 3)) + 40  # mid-grey in the abdomen window (128)
    liver = np.zeros(vol.shape, bool)
    liver[2:8, 2:8, :] = True
    tumour = np.zeros(vol.shape, bool)
    tumour[4:6, 4:6, :] = True
    half = viz.slice_overlay(vol, {"liver": liver}, "axial", 1, opacity=0.5, outline=False)
    expected = np.rint(0.5 * 128 + 0.5 * np.asarray(resolve_class("liver").color)).astype(int)
    assert np.abs(half.rgb[5, 5].astype(int) - expected).max() <= 1
    both = viz.slice_overlay(vol, {"liver tumor": tumour, "liver": liver}, "axial", 1, opacity=1.0)
    assert tuple(both.rgb[4, 4]) == tuple(resolve_class("liver tumor").color)  # tumour drawn over its organ
    none = viz.slice_overlay(vol, {}, "axial", 1)
    assert np.all(none.rgb == 128)


def test_difference_map_colours_agreement_and_each_side():
    a = np.zeros((6, 6, 2), bool)
    b = np.zeros((6, 6, 2), bool)
    a[0:3, :, :] = True
    b[2:5, :, :] = True
    d = viz.difference_map({"liver": a}, {"liver": b}, "axial", 0, opacity=1.0).rgb
    # axial columns run from x = 5 (left of image) to x = 0
    assert tuple(d[0, 5 - 0]) == viz.DIFF_COLORS["only_a"]
    assert tuple(d[0, 5 - 2]) == viz.DIFF_COLORS["both"]
    assert tuple(d[0, 5 - 4]) == viz.DIFF_COLORS["only_b"]
    assert tuple(d[0, 5 - 5]) == (0, 0, 0)


# ------------------------------------------------------------------------------------------------ 3-D
def _sphere(shape, centre, radius):
    g = np.indices(shape).astype(float)
    return ((g - np.asarray(centre, float)[:, None, None, None]) ** 2).sum(0) <= radius**2


def test_mesh_figure_respects_the_triangle_cap_and_world_coordinates():
    shape = (80, 80, 60)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-100.0, 50.0, 10.0]
    masks = {
        "liver": _sphere(shape, (55, 40, 30), 20),
        "spleen": _sphere(shape, (20, 40, 30), 10),
        "pancreas": np.zeros(shape, bool),
    }
    fig = viz.mesh_figure(masks, affine, max_triangles=3000)
    total = sum(len(t.i) for t in fig.data)
    assert 0 < total <= 3000
    assert fig.layout.meta["triangles"] == total
    assert [t.name for t in fig.data] == ["liver", "spleen"]  # the empty class is skipped
    liver = fig.data[0]
    assert liver.color == "rgb({},{},{})".format(*resolve_class("liver").color)
    centre = np.array([np.mean(liver.x), np.mean(liver.y), np.mean(liver.z)])
    expected = affine[:3, :3] @ np.array([55, 40, 30]) + affine[:3, 3]
    assert np.allclose(centre, expected, atol=4.0)  # world mm, within a couple of (downsampled) voxels
    extent = np.ptp(np.asarray(liver.x))
    assert extent == pytest.approx(2 * 20 * 1.5, rel=0.2)  # diameter 40 voxels x 1.5 mm


def test_mesh_cap_holds_for_the_phantom_default():
    from universal.phantom import make_phantom

    ph = make_phantom(shape=(96, 96, 64), spacing=(2.0, 2.0, 2.0), seed=0)
    meshes = viz.class_meshes(ph.masks, ph.volume.affine, max_triangles=20_000)
    assert meshes and sum(len(m.faces) for m in meshes) <= 20_000
    for m in meshes:
        assert m.faces.max() < len(m.vertices)
        assert m.color == tuple(resolve_class(m.name).color)


# ------------------------------------------------------------------------------------------------ charts, files
def _case_result():
    from universal.metrics import evaluate_case

    m = np.zeros((12, 12, 12), bool)
    m[3:9, 3:9, 3:9] = True
    return evaluate_case(
        {"liver": m, "spleen": np.roll(m, 2, 0)},
        {"liver": m, "spleen": m},
        (1.0, 1.0, 1.0),
        classes=["liver", "spleen", "pancreas"],
        annotated=["liver", "spleen"],
    )


def test_metrics_frame_bar_chart_and_csv():
    res = _case_result()
    df = viz.metrics_frame(res)
    assert list(df["class"]) == ["liver", "spleen", "pancreas"]
    assert df.loc[df["class"] == "pancreas", "status"].item() == "not annotated"
    from_dict = viz.metrics_frame(res.to_dict())
    assert list(from_dict["class"]) == list(df["class"])
    fig = viz.metrics_bar_chart(res)
    assert [t.name for t in fig.data] == ["DSC", "NSD"]
    assert list(fig.data[0].text)[-1] == "n/a"  # not annotated: no score
    assert fig.data[0].y[0] == pytest.approx(1.0)
    csv = viz.metrics_csv(res)
    assert csv.splitlines()[0].startswith("class,dsc,nsd")
    assert "not annotated" in csv


def test_similarity_heatmap_and_timings_and_results_frame():
    fig = viz.similarity_heatmap(np.eye(2), ["liver", "spleen"])
    assert np.array_equal(np.asarray(fig.data[0].z), np.eye(2))
    with pytest.raises(ValueError):
        viz.similarity_heatmap(np.eye(3), ["a", "b"])
    tf = viz.timings_frame({"load": 1.0, "inference": 3.0, "total": 4.0})
    assert list(tf["stage"]) == ["load", "inference", "total"]
    assert tf["share"].tolist() == pytest.approx([0.25, 0.75, 1.0])
    m = np.zeros((4, 4, 4), bool)
    m[:2] = True
    seg = SimpleNamespace(masks={"liver": m}, volumes_ml={"liver": 0.032}, mean_hu={"liver": float("nan")})
    rf = viz.results_frame(seg)
    assert rf.iloc[0]["class"] == "liver" and rf.iloc[0]["voxels"] == 32 and rf.iloc[0]["kind"] == "organ"


def test_masks_zip_and_json_helpers(tmp_path):
    class FakeSeg:
        def save(self, out):
            (out / "masks").mkdir(parents=True)
            (out / "masks" / "liver.nii.gz").write_bytes(b"L")
            (out / "labels.nii.gz").write_bytes(b"LAB")
            (out / "report.json").write_text("{}")

    data = viz.masks_zip_bytes(FakeSeg())
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == ["labels.nii.gz", "masks/liver.nii.gz", "report.json"]
    files = viz.saved_files(FakeSeg())
    assert files["labels.nii.gz"] == b"LAB"
    z = viz.zip_bytes({"a/b.txt": b"x"})
    assert zipfile.ZipFile(io.BytesIO(z)).read("a/b.txt") == b"x"
    doc = json.loads(
        viz.to_json_bytes({"a": float("nan"), "b": np.float32(1.5), "c": np.arange(2), "d": np.bool_(1)})
    )
    assert doc == {"a": None, "b": 1.5, "c": [0, 1], "d": True}
