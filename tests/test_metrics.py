"""Tests of universal/metrics.py: DSC, NSD (vs MONAI on real masks) and the FLARE 2023 rules."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest

from universal import metrics
from universal.errors import InputError
from universal.metrics import (
    FLARE23_PRESET,
    CaseResult,
    aggregate,
    dice,
    evaluate_case,
    flare23_masks_from_label_map,
    flare23_masks_from_universal,
    surface_dice,
    surfel_area_table,
    universal_masks_from_label_map,
)

# TotalSegmentator v2 ids of the FLARE 2023 organs (../shared/data/totalsegmentator_v2_classes.json)
TS_TO_UNIVERSAL = {
    5: "liver",
    2: "right kidney",
    1: "spleen",
    7: "pancreas",
    52: "aorta",
    63: "inferior vena cava",
    8: "right adrenal gland",
    9: "left adrenal gland",
    4: "gallbladder",
    15: "esophagus",
    6: "stomach",
    19: "duodenum",
    3: "left kidney",
}
FLARE_NAMES = list(FLARE23_PRESET.classes)


def _cube(shape=(32, 32, 32), lo=(8, 8, 8), hi=(24, 24, 24)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def _sphere(
    shape=(48, 48, 48), center=(24.0, 24.0, 24.0), radius=10.0, spacing=(1.0, 1.0, 1.0)
) -> np.ndarray:
    g = np.indices(shape, dtype=np.float64)
    d2 = sum(((g[i] - center[i]) * spacing[i]) ** 2 for i in range(3))
    return d2 <= radius**2


def _monai_nsd(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> float:
    """MONAI's NSD: one-hot (B, C, X, Y, Z) with the background channel dropped by include_background=False."""
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_surface_dice

    def onehot(m):
        return torch.from_numpy(np.stack([~m, m]))[None].float()

    with warnings.catch_warnings():  # MONAI warns about empty classes and deprecated arguments
        warnings.simplefilter("ignore")
        val = compute_surface_dice(
            onehot(pred),
            onehot(gt),
            [tol],
            include_background=False,
            spacing=tuple(spacing),
            use_subvoxels=True,
        )
    return float(val[0, 0])


@pytest.fixture(scope="module")
def ts_pair(shared_data):
    """The two TotalSegmentator segmentations of one CT (3 mm), RAS+ check and spacing from the header."""
    nib = pytest.importorskip("nibabel")
    folder = shared_data / "ts_abdomen_3mm"
    a = nib.load(str(folder / "labels_totalseg.nii.gz"))
    b = nib.load(str(folder / "labels_totalseg_fast.nii.gz"))
    assert nib.aff2axcodes(a.affine) == ("R", "A", "S")
    assert np.allclose(a.affine, b.affine)
    spacing = tuple(float(s) for s in a.header.get_zooms()[:3])
    return np.asarray(a.dataobj).astype(np.int32), np.asarray(b.dataobj).astype(np.int32), spacing


# ------------------------------------------------------------------------------------------------ surfel table
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 3.0, 3.0), (0.7, 1.3, 5.0), (0.8, 0.8, 2.5)])
def test_surfel_area_table_matches_monai(spacing):
    pytest.importorskip("monai")
    from monai.metrics.utils import create_table_neighbour_code_to_surface_area

    ref, kernel = create_table_neighbour_code_to_surface_area(spacing)
    # MONAI's kernel weights corner (i, j, k) by 2**(7 - (4i + 2j + k)); ours by 2**(4i + 2j + k): bit reversal
    assert np.asarray(kernel).ravel().tolist() == [128, 64, 32, 16, 8, 4, 2, 1]
    rev = np.array([int(f"{c:08b}"[::-1], 2) for c in range(256)])
    ours = surfel_area_table(spacing)
    np.testing.assert_allclose(ours[rev], ref.double().numpy(), rtol=1e-6, atol=1e-6)


def test_surfel_area_table_basic_geometry():
    t = surfel_area_table((1.0, 1.0, 1.0))
    assert t[0] == 0 and t[255] == 0
    assert t[1] == pytest.approx(math.sqrt(3) / 8)  # one corner: triangle with vertices at 3 edge midpoints
    assert t[0b00001111] == pytest.approx(1.0)  # a face-parallel plane through the cube's middle
    # complement symmetry (the surface does not depend on which side is "inside")
    np.testing.assert_allclose(t, t[255 - np.arange(256)])
    # a flat face scales with the two spacings spanning it
    t2 = surfel_area_table((2.0, 3.0, 5.0))
    assert t2[0b00001111] == pytest.approx(3.0 * 5.0)  # corners i=0 inside: plane normal to axis 0


# ------------------------------------------------------------------------------------------------ DSC, NSD basics
def test_identical_masks_score_one():
    m = _sphere()
    assert dice(m, m) == 1.0
    assert surface_dice(m, m, (1.0, 1.0, 1.0), 0.0) == 1.0
    r = evaluate_case({"liver": m}, {"liver": m}, (1, 1, 1), preset="flare23", classes=["liver"])
    assert (r["liver"].dsc, r["liver"].nsd) == (1.0, 1.0)


def test_empty_rules():
    e, m = np.zeros((16, 16, 16), bool), _cube((16, 16, 16), (4, 4, 4), (10, 10, 10))
    assert dice(e, e) == 1.0 and surface_dice(e, e, (1, 1, 1), 2.0) == 1.0
    assert dice(e, m) == 0.0 and surface_dice(e, m, (1, 1, 1), 2.0) == 0.0
    assert dice(m, e) == 0.0 and surface_dice(m, e, (1, 1, 1), 2.0) == 0.0
    assert math.isnan(dice(e, e, empty_value=float("nan")))
    for preset in ("flare23", None):
        r = evaluate_case(
            {"liver": e, "spleen": m, "pancreas": e},
            {"liver": e, "spleen": e, "pancreas": m},
            (1, 1, 1),
            preset=preset,
            classes=["liver", "spleen", "pancreas"],
        )
        assert (r["liver"].dsc, r["liver"].nsd) == (1.0, 1.0)
        assert (r["spleen"].dsc, r["spleen"].nsd) == (0.0, 0.0)
        assert (r["pancreas"].dsc, r["pancreas"].nsd) == (0.0, 0.0)


def test_dice_formula_and_input_types():
    a = _cube(lo=(8, 8, 8), hi=(20, 20, 20))
    b = _cube(lo=(10, 8, 8), hi=(22, 20, 20))
    expected = 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())
    assert dice(a, b) == pytest.approx(expected)
    assert dice(a.astype(np.uint8), b.astype(np.float32)) == pytest.approx(expected)
    with pytest.raises(InputError):
        dice(a, b[:-1])
    with pytest.raises(InputError):
        surface_dice(a, b, (1.0, 0.0, 1.0), 2.0)


def test_shifted_sphere_nsd_decreases_monotonically():
    ref = _sphere()
    tol = 3.0
    values = [surface_dice(_sphere(center=(24.0 + s, 24.0, 24.0)), ref, (1, 1, 1), tol) for s in range(10)]
    assert all(v == pytest.approx(1.0) for v in values[: int(tol) + 1])  # shift <= tolerance: all within
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))  # monotone
    assert values[int(tol) + 1] < 1.0 and values[-1] < 0.5


def test_anisotropic_spacing_is_respected():
    spacing = (1.0, 1.0, 4.0)
    ref = _sphere(shape=(48, 48, 24), center=(24, 24, 12), radius=10, spacing=spacing)
    along_x = np.roll(ref, 1, axis=0)  # 1 mm
    along_z = np.roll(ref, 1, axis=2)  # 4 mm
    assert surface_dice(along_x, ref, spacing, 2.0) == pytest.approx(1.0)
    assert surface_dice(along_z, ref, spacing, 2.0) < 0.9
    assert surface_dice(along_z, ref, spacing, 4.0) == pytest.approx(1.0)
    # the same voxels read with isotropic spacing: the z shift is within 2 mm
    assert surface_dice(along_z, ref, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)
    # and MONAI agrees on the anisotropic value
    assert surface_dice(along_z, ref, spacing, 2.0) == pytest.approx(
        _monai_nsd(along_z, ref, spacing, 2.0), abs=1e-5
    )


def test_nsd_matches_monai_on_synthetic_shapes():
    rng = np.random.default_rng(0)
    ref = _sphere(shape=(40, 36, 30), center=(20, 18, 15), radius=9)
    pred = np.roll(ref, (2, -1, 1), axis=(0, 1, 2)) ^ (rng.random(ref.shape) < 0.01)
    for spacing in [(1.0, 1.0, 1.0), (0.7, 1.1, 2.5)]:
        for tol in (0.0, 1.0, 2.0, 5.0):
            assert surface_dice(pred, ref, spacing, tol) == pytest.approx(
                _monai_nsd(pred, ref, spacing, tol), abs=2e-5
            ), (spacing, tol)


def test_masks_touching_the_grid_border():
    ref = np.zeros((10, 10, 10), bool)
    ref[:5] = True  # touches three faces of the grid
    pred = np.zeros_like(ref)
    pred[:6] = True
    assert surface_dice(pred, ref, (1, 1, 1), 1.0) == pytest.approx(
        _monai_nsd(pred, ref, (1, 1, 1), 1.0), abs=1e-6
    )
    assert surface_dice(pred, ref, (1, 1, 1), 1.0) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ real masks
@pytest.mark.slow
def test_nsd_and_dsc_match_monai_on_real_masks(ts_pair):
    a, b, spacing = ts_pair
    assert spacing == (3.0, 3.0, 3.0)
    labels = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    assert len(labels) >= 20
    flare_ids = {
        ts: i for i, name in enumerate(FLARE_NAMES[:13], 1) for ts, n in TS_TO_UNIVERSAL.items() if n == name
    }
    worst, compared = 0.0, 0
    for k, lab in enumerate(labels):
        gt, pred = a == lab, b == lab
        if not gt.any() or not pred.any():
            continue
        assert dice(pred, gt) == pytest.approx(2 * np.sum(gt & pred) / (gt.sum() + pred.sum()))
        # the FLARE tolerance of the organ, else 3, 5 or 7 mm in turn (at 3 mm: 1, 2 and 3 voxel-ish reach)
        tol = metrics.FLARE23_TOLERANCES_MM[flare_ids[lab]] if lab in flare_ids else (3.0, 5.0, 7.0)[k % 3]
        ours = surface_dice(pred, gt, spacing, tol)
        ref = _monai_nsd(pred, gt, spacing, tol)
        worst = max(worst, abs(ours - ref))
        compared += 1
    assert compared >= 20
    assert worst < 1e-4  # MONAI accumulates in float32; the values agree to ~1e-6


def test_real_masks_with_anisotropic_spacing_match_monai(ts_pair):
    a, b, _ = ts_pair
    spacing = (0.8, 1.2, 3.0)  # pretend another grid: areas and distances must both follow it
    for lab in (1, 2, 5, 7, 52):
        gt, pred = a == lab, b == lab
        for tol in (1.0, 2.0, 3.0):
            assert surface_dice(pred, gt, spacing, tol) == pytest.approx(
                _monai_nsd(pred, gt, spacing, tol), abs=1e-4
            ), (lab, tol)


def _official_flare23(pred_lab: np.ndarray, gt_lab: np.ndarray, spacing) -> dict[int, tuple[float, float]]:
    """The FLARE 2023 arithmetic written out independently, with MONAI's NSD (for cross-checking)."""
    out = {}
    for i in range(1, 15):
        g, p = gt_lab == i, pred_lab == i
        if not g.any() and not p.any():
            out[i] = (1.0, 1.0)
            continue
        if not g.any() or not p.any():
            out[i] = (0.0, 0.0)
            continue
        if i in (5, 6, 10):
            z = np.nonzero(g)[2]
            g, p = g[:, :, z.min() : z.max()], p[:, :, z.min() : z.max()]
        d = 2 * np.sum(g & p) / (g.sum() + p.sum())
        nsd = 0.0 if d < 0.1 else _monai_nsd(p, g, spacing, metrics.FLARE23_TOLERANCES_MM[i])
        out[i] = (float(d), nsd)
    return out


def test_flare23_preset_on_real_masks_matches_official_arithmetic(ts_pair):
    a, b, spacing = ts_pair

    def to_flare(lab):
        out = np.zeros(lab.shape, np.int16)
        for fid, name in enumerate(FLARE_NAMES[:13], start=1):
            ts_id = next(k for k, v in TS_TO_UNIVERSAL.items() if v == name)
            out[lab == ts_id] = fid
        return out

    gt_lab, pred_lab = to_flare(a), to_flare(b)
    # make the lesion class non-trivial: a blob inside the liver in both, slightly shifted
    liver = np.argwhere(gt_lab == 1).mean(0).astype(int)
    gt_lab[tuple(slice(c - 3, c + 3) for c in liver)] = 14
    pred_lab[tuple(slice(c - 2, c + 4) for c in liver)] = 14
    official = _official_flare23(pred_lab, gt_lab, spacing)
    result = evaluate_case(
        flare23_masks_from_label_map(pred_lab),
        flare23_masks_from_label_map(gt_lab),
        spacing,
        preset="flare23",
    )
    assert list(result.scores) == FLARE_NAMES
    for i, name in enumerate(FLARE_NAMES, start=1):
        s = result[name]
        assert s.status == "ok"
        assert s.tolerance_mm == metrics.FLARE23_TOLERANCES_MM[i]
        assert s.dsc == pytest.approx(official[i][0], abs=1e-9), name
        assert s.nsd == pytest.approx(official[i][1], abs=1e-4), name
    assert 0 < result["lesion"].dsc < 1
    assert result.to_dict()["organ_mean"]["dsc"] == pytest.approx(
        np.mean([official[i][0] for i in range(1, 14)])
    )


# ------------------------------------------------------------------------------------------------ FLARE rules
def test_flare23_constants_agree_with_taxonomy():
    from universal import taxonomy

    assert metrics.FLARE23_TOLERANCES_MM == taxonomy.flare23_tolerances_mm()
    assert FLARE_NAMES == [taxonomy.flare23_classes()[i] for i in range(1, 15)]
    assert FLARE23_PRESET.zcrop == {"aorta", "inferior vena cava", "esophagus"}
    assert FLARE23_PRESET.nsd_min_dsc == 0.1
    assert [FLARE23_PRESET.tolerances_mm[n] for n in FLARE_NAMES] == [
        5,
        3,
        3,
        5,
        2,
        2,
        2,
        2,
        2,
        3,
        5,
        7,
        3,
        2,
    ]


def test_nsd_is_zero_when_dsc_below_threshold():
    gt = np.zeros((30, 30, 30), bool)
    gt[5:25, 5:25, 10] = True  # a one-voxel-thick plate
    pred = np.zeros_like(gt)
    pred[5:25, 5:25, 12] = True  # the same plate 2 mm away: no overlap, surfaces within 5 mm
    pred[5, 5, 10] = True  # one voxel of overlap: 0 < DSC < 0.1
    raw = surface_dice(pred, gt, (1, 1, 1), 5.0)
    assert raw > 0.9
    r = evaluate_case({"liver": pred}, {"liver": gt}, (1, 1, 1), preset="flare23", classes=["liver"])
    assert 0 < r["liver"].dsc < 0.1
    assert r["liver"].nsd == 0.0
    generic = evaluate_case({"liver": pred}, {"liver": gt}, (1, 1, 1))  # no gating without the preset
    assert generic["liver"].nsd == pytest.approx(raw)


def _tube(z0: int, z1: int, shape=(24, 24, 60)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[9:15, 9:15, z0:z1] = True
    return m


def test_aorta_is_cropped_to_the_reference_z_range():
    gt = _tube(10, 30)  # slices 10..29
    pred = _tube(0, 50)  # runs far beyond the reference's z-range
    spacing = (1.0, 1.0, 1.0)
    flare = evaluate_case({"aorta": pred}, {"aorta": gt}, spacing, preset="flare23", classes=["aorta"])
    assert flare["aorta"].dsc == 1.0 and flare["aorta"].nsd == 1.0
    # no crop for a class outside (aorta, IVC, esophagus), nor without the preset
    as_liver = evaluate_case({"liver": pred}, {"liver": gt}, spacing, preset="flare23", classes=["liver"])
    plain = evaluate_case({"aorta": pred}, {"aorta": gt}, spacing)
    for r, n in ((as_liver, "liver"), (plain, "aorta")):
        assert r[n].dsc == pytest.approx(2 * 20 / (20 + 50))
        assert r[n].nsd < 0.8
    # esophagus and IVC are cropped too
    for name in ("esophagus", "inferior vena cava"):
        r = evaluate_case({name: pred}, {name: gt}, spacing, preset="flare23", classes=[name])
        assert r[name].dsc == 1.0


def test_zcrop_excludes_the_reference_top_slice_like_the_official_code():
    gt = _tube(10, 30)
    pred = _tube(10, 29)  # misses the reference's top slice z=29
    official = evaluate_case({"aorta": pred}, {"aorta": gt}, (1, 1, 1), preset="flare23", classes=["aorta"])
    assert official["aorta"].dsc == 1.0  # the official range [z_min, z_max) never looks at slice z_max
    closed = dataclasses.replace(FLARE23_PRESET, zcrop_inclusive=True)
    r = evaluate_case({"aorta": pred}, {"aorta": gt}, (1, 1, 1), preset=closed, classes=["aorta"])
    assert r["aorta"].dsc == pytest.approx(2 * 19 / (19 + 20))


def test_one_slice_reference_of_a_cropped_class_gives_nan_like_the_official_code():
    gt = _tube(10, 11)
    pred = _tube(5, 20)
    r = evaluate_case({"aorta": pred}, {"aorta": gt}, (1, 1, 1), preset="flare23", classes=["aorta"])
    assert math.isnan(r["aorta"].dsc) and math.isnan(r["aorta"].nsd)
    assert math.isnan(r.mean()["dsc"])  # nothing else was scored


def test_lesion_is_the_union_of_tumour_classes():
    liver_t = _cube(lo=(2, 2, 2), hi=(6, 6, 6))
    kidney_t = _cube(lo=(20, 20, 20), hi=(24, 24, 24))
    view = flare23_masks_from_universal(
        {"liver": liver_t | kidney_t, "liver tumor": liver_t, "kidney tumor": kidney_t}
    )
    assert set(view) == {"liver", "lesion"}
    assert np.array_equal(view["lesion"], liver_t | kidney_t)
    # evaluate_case builds it too; kidney cyst is not a FLARE lesion
    r = evaluate_case(
        {"liver tumor": liver_t, "kidney tumor": kidney_t},
        {
            "liver tumor": liver_t,
            "kidney tumor": kidney_t,
            "kidney cyst": _cube(lo=(10, 10, 10), hi=(12, 12, 12)),
        },
        (1, 1, 1),
        preset="flare23",
        classes=["lesion"],
    )
    assert r["lesion"].dsc == 1.0


def test_flare23_rejects_unknown_classes():
    m = _cube()
    with pytest.raises(InputError):
        evaluate_case({"liver": m}, {"liver": m}, (1, 1, 1), preset="flare23", classes=["colon"])
    with pytest.raises(InputError):
        evaluate_case({"liver": m}, {"liver": m}, (1, 1, 1), preset="flare2099")


def test_presets_by_name():
    assert metrics.PRESETS == {"flare23": FLARE23_PRESET}
    for name in ("flare23", "FLARE-23", "flare_2023", FLARE23_PRESET):
        assert metrics.get_preset(name) is FLARE23_PRESET
    assert metrics.get_preset(None) is None
    with pytest.raises(InputError, match="flare23"):
        metrics.get_preset("brats")


# ------------------------------------------------------------------------------------------------ partial labels
def test_not_annotated_classes_are_excluded_from_means():
    m = _cube()
    wrong = _cube(lo=(0, 0, 0), hi=(4, 4, 4))
    r = evaluate_case(
        {"liver": m, "spleen": wrong, "pancreas": m},
        {"liver": m, "spleen": m, "pancreas": m},
        (1, 1, 1),
        annotated=["liver", "pancreas"],
    )
    assert r["spleen"].status == "not annotated"
    assert math.isnan(r["spleen"].dsc) and math.isnan(r["spleen"].nsd)
    assert r.mean() == {"dsc": 1.0, "nsd": 1.0}
    assert r.evaluated == ["liver", "pancreas"]
    # by default the reference's keys are what it annotates
    r2 = evaluate_case({"liver": m, "spleen": wrong}, {"liver": m}, (1, 1, 1))
    assert r2["spleen"].status == "not annotated" and r2.mean()["dsc"] == 1.0
    # flare23 with a partially labelled reference
    r3 = evaluate_case(
        {"liver": m, "lesion": wrong}, {"liver": m}, (1, 1, 1), preset="flare23", annotated=["liver"]
    )
    assert r3.mean() == {"dsc": 1.0, "nsd": 1.0}
    assert sum(s.status == "not annotated" for s in r3.scores.values()) == 13


def test_annotated_class_missing_from_a_dict_is_empty():
    m = _cube()
    r = evaluate_case({}, {"liver": m}, (1, 1, 1))
    assert (r["liver"].dsc, r["liver"].nsd) == (0.0, 0.0)
    with pytest.raises(InputError):
        evaluate_case({}, {}, (1, 1, 1))
    with pytest.raises(InputError):
        evaluate_case({"liver": m}, {"liver": m[:-1]}, (1, 1, 1))


def test_tolerance_argument():
    ref = _sphere()
    pred = _sphere(center=(27.0, 24.0, 24.0))
    r_default = evaluate_case({"liver": pred}, {"liver": ref}, (1, 1, 1))
    assert r_default["liver"].tolerance_mm == 5.0  # the FLARE value of the class
    assert evaluate_case({"colon": pred}, {"colon": ref}, (1, 1, 1))["colon"].tolerance_mm == 2.0
    assert (
        evaluate_case({"liver tumor": pred}, {"liver tumor": ref}, (1, 1, 1))["liver tumor"].tolerance_mm
        == 2.0
    )
    r1 = evaluate_case({"liver": pred}, {"liver": ref}, (1, 1, 1), tolerance_mm=1.0)
    r2 = evaluate_case({"liver": pred}, {"liver": ref}, (1, 1, 1), tolerance_mm={"liver": 1.0})
    assert r1["liver"].nsd == r2["liver"].nsd == pytest.approx(surface_dice(pred, ref, (1, 1, 1), 1.0))
    assert r1["liver"].nsd < r_default["liver"].nsd


# ------------------------------------------------------------------------------------------------ results
def test_case_result_outputs():
    m = _cube()
    r = evaluate_case(
        {"liver": m, "spleen": m}, {"liver": m, "spleen": ~m}, (1, 1, 1), annotated=["liver"], name="case1"
    )
    d = r.to_dict()
    assert set(d["classes"]) == {"liver", "spleen"}
    assert d["classes"]["liver"] == {"dsc": 1.0, "nsd": 1.0, "status": "ok", "tolerance_mm": 5.0}
    assert d["classes"]["spleen"] == {
        "dsc": None,
        "nsd": None,
        "status": "not annotated",
        "tolerance_mm": 3.0,
    }
    assert d["mean"] == {"dsc": 1.0, "nsd": 1.0}
    assert json.loads(json.dumps(d, allow_nan=False)) == d  # strict JSON: NaN is written as null
    text = r.table()
    assert "liver" in text and "spleen" in text and "not annotated" in text and "mean" in text
    assert str(r) == text
    assert isinstance(r, CaseResult)
    flare = evaluate_case({"liver": m}, {"liver": m}, (1, 1, 1), preset="flare23")
    assert "organ_mean" in flare.to_dict() and "mean (organs)" in flare.table()


def test_to_frame():
    pytest.importorskip("pandas")
    m = _cube()
    df = evaluate_case({"liver": m}, {"liver": m}, (1, 1, 1)).to_frame()
    assert df.loc["liver", "dsc"] == 1.0


def test_aggregate_means_over_annotating_cases():
    m = _cube()
    r1 = evaluate_case({"liver": m, "spleen": m}, {"liver": m, "spleen": m}, (1, 1, 1))
    r2 = evaluate_case({"liver": ~m, "spleen": m}, {"liver": m}, (1, 1, 1))  # spleen not annotated here
    agg = aggregate([r1, r2])
    assert agg.n_cases == 2
    assert agg["liver"].dsc == pytest.approx(0.5) and agg["liver"].n == 2
    assert agg["spleen"].dsc == 1.0 and agg["spleen"].n == 1
    assert "(n of 2 cases)" in agg.table()
    with pytest.raises(InputError):
        aggregate([])


def test_inputs_are_not_modified():
    gt = _tube(10, 30)
    pred = _tube(0, 50)
    g0, p0 = gt.copy(), pred.copy()
    masks_p, masks_g = {"aorta": pred, "liver tumor": pred}, {"aorta": gt, "liver tumor": gt}
    evaluate_case(masks_p, masks_g, (1, 1, 1), preset="flare23")
    assert np.array_equal(gt, g0) and np.array_equal(pred, p0)
    assert set(masks_p) == {"aorta", "liver tumor"}


# ------------------------------------------------------------------------------------------------ label maps
def test_flare23_masks_from_label_map():
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[1, 1, 1], lab[2, 2, 2], lab[3, 3, 3] = 1, 13, 14
    masks = flare23_masks_from_label_map(lab)
    assert list(masks) == FLARE_NAMES
    assert masks["liver"].sum() == 1 and masks["left kidney"][2, 2, 2] and masks["lesion"][3, 3, 3]
    assert not masks["spleen"].any()
    with pytest.raises(InputError):
        flare23_masks_from_label_map(lab[0])


def test_universal_masks_from_label_map_with_parents():
    from universal import taxonomy

    idx = {c.name: c.index for c in taxonomy.CLASSES}
    lab = np.zeros((40, 20, 20), np.int16)
    lab[2:12, 5:15, 5:15] = idx["left kidney"]
    lab[26:36, 5:15, 5:15] = idx["right kidney"]
    lab[30:33, 8:11, 8:11] = idx["kidney tumor"]  # inside the right kidney
    lab[4:6, 8:10, 8:10] = idx["liver tumor"]  # drawn over the left kidney, but its parent is the liver
    lab[15:18, 15:18, 15:18] = idx["liver"]
    masks = universal_masks_from_label_map(
        lab, classes=["right kidney", "left kidney", "kidney tumor", "liver"]
    )
    assert list(masks) == ["right kidney", "left kidney", "kidney tumor", "liver"]
    tumor = lab == idx["kidney tumor"]
    assert masks["kidney tumor"].sum() == tumor.sum() == 27
    assert masks["right kidney"][tumor].all()  # one-vs-all: the tumour is part of its (touching) parent
    assert not masks["left kidney"][tumor].any()
    assert masks["liver"][lab == idx["liver tumor"]].all()  # single parent: always included
    plain = universal_masks_from_label_map(lab, classes=["right kidney"], include_parents=False)
    assert not plain["right kidney"][tumor].any()
    assert len(universal_masks_from_label_map(lab)) == 32
