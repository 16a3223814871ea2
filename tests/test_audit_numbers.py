"""Regression tests from an audit of the numbers and files the toolkit reports (2026-12-02): each failed before
its fix and names the bug it shows.

Independent expectations are computed here with numpy (the FLARE 2023 rules written out) or read back with
pydicom.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from universal import make_phantom, metrics
from universal.errors import InputError
from universal.evaluation import evaluate, read_reference
from universal.inference import Segmentation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _flare_official_dsc(pred: np.ndarray, gt: np.ndarray) -> list[float]:
    """DSC of FLARE 2023 classes 1..14 by the challenge's rules (both empty 1, exactly one empty 0)."""
    out = []
    for i in range(1, 15):
        p, g = pred == i, gt == i
        if not p.any() and not g.any():
            out.append(1.0)
        elif not p.any() or not g.any():
            out.append(0.0)
        else:
            out.append(2.0 * np.count_nonzero(p & g) / (np.count_nonzero(p) + np.count_nonzero(g)))
    return out


def _flare_maps() -> tuple[np.ndarray, np.ndarray]:
    shape = (32, 32, 24)
    gt = np.zeros(shape, np.uint8)
    gt[4:14, 4:14, 4:14] = 1  # liver
    gt[18:26, 18:26, 8:16] = 3  # spleen
    pred = np.zeros(shape, np.uint8)
    pred[4:14, 4:14, 4:14] = 1  # the spleen is missed entirely
    return pred, gt


# BUG 1 (evaluation.read_prediction): a FLARE-id (or dataset-id) predicted label map counts as "segmented" only the
# classes present in it, so a class the prediction MISSED is skipped as "not segmented" and left out of the mean
# instead of scoring DSC = NSD = 0 as the FLARE rules say; a missed organ then scores better than a poor one.
def test_bug1_flare_label_map_prediction_missing_class_scores_zero():
    pred, gt = _flare_maps()
    ref = read_reference(gt, "flare23", spacing=(1, 1, 1))
    result = evaluate(pred, ref, preset="flare23", prediction_convention="flare23")
    assert "spleen" in result.scores, result.summary()
    assert result["spleen"].dsc == 0.0
    assert result.mean()["dsc"] == pytest.approx(np.mean(_flare_official_dsc(pred, gt)))


def test_bug1_missing_class_never_scores_better_than_a_poor_one():
    pred, gt = _flare_maps()
    ref = read_reference(gt, "flare23", spacing=(1, 1, 1))
    poor = pred.copy()
    poor[25, 25, 15] = 3  # a one-voxel spleen
    missed = evaluate(pred, ref, preset="flare23", prediction_convention="flare23").mean()["dsc"]
    one_voxel = evaluate(poor, ref, preset="flare23", prediction_convention="flare23").mean()["dsc"]
    assert missed <= one_voxel


# BUG 2 (evaluation._read_pair): a Segmentation scored against a Reference already read on another grid of the same
# shape (here: the same labels placed 2 voxels = 6 mm higher) is compared voxel by voxel without a word: DSC 1.0.
def test_bug2_segmentation_against_reference_on_other_grid_is_not_silent(tmp_path):
    p = make_phantom((24, 24, 20), spacing=(3.0, 3.0, 3.0))
    liver = p.masks["liver"]
    seg = Segmentation(masks={"liver": liver}, volume=p.volume, info={})
    lab = p.label_map.astype(np.uint8)
    affine = p.volume.affine.copy()
    affine[2, 3] += 6.0  # the same array, 6 mm higher in the world
    path = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(lab, affine), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placed = evaluate(seg, path)["liver"].dsc  # the file is placed onto the CT's grid: < 1
        own = read_reference(path)  # on its own grid
        try:
            silent = evaluate(seg, own)["liver"].dsc
        except InputError:
            return  # refusing is a right answer
    assert placed < 0.99
    assert silent == pytest.approx(placed)


# BUG 3 (metrics.aggregate): the aggregated "mean (organs)" takes the organ list of the FIRST case only, so an organ
# scored in later cases is dropped from it and the organ mean depends on the order of the cases.
def test_bug3_aggregate_organ_mean_does_not_depend_on_case_order():
    shape = (32, 32, 24)
    liver = np.zeros(shape, bool)
    liver[4:14, 4:14, 4:14] = True
    spleen = np.zeros(shape, bool)
    spleen[18:26, 18:26, 8:16] = True
    poor = np.roll(spleen, 6, axis=2)
    r1 = evaluate({"liver": liver}, read_reference({"liver": liver}, spacing=(1, 1, 1)), preset="flare23")
    r2 = evaluate(
        {"liver": liver, "spleen": poor},
        read_reference({"liver": liver, "spleen": spleen}, spacing=(1, 1, 1)),
        preset="flare23",
    )
    a, b = metrics.aggregate([r1, r2]), metrics.aggregate([r2, r1])
    assert "spleen" in a.organ_classes
    assert a.mean(a.organ_classes) == pytest.approx(b.mean(b.organ_classes))


# BUG 4 (exports.write_dicom_seg): a real DICOM series whose SpecificCharacterSet is present but empty (the dcmqi
# liver slices) makes the DICOM-SEG export crash with highdicom's bare ValueError; RTSTRUCT handles the same header.
@pytest.mark.skipif(not (DATA / "dcmqi_liver_3slice").is_dir(), reason="../shared/data is absent")
def test_bug4_dicom_seg_of_series_with_empty_character_set():
    import pydicom

    from universal.exports import write_dicom_seg
    from universal.io import load_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = load_volume(DATA / "dcmqi_liver_3slice")
    mask = np.zeros(vol.shape, bool)
    mask[100:200, 100:200, 1] = True
    seg = Segmentation(masks={"liver": mask}, volume=vol, info={})
    with tempfile.TemporaryDirectory() as tmp:
        done = write_dicom_seg(seg, tmp)
        ds = pydicom.dcmread(Path(tmp) / done.files[0])
        assert int(np.count_nonzero(ds.pixel_array)) == int(mask.sum())


# BUG 5 (metrics._as_bool, evaluation._from_mapping): a float probability map (or a label map) given where a mask
# is expected is silently thresholded at != 0: DSC 0.35 for a prediction whose 0.5-threshold mask has DSC 0.98.
def test_bug5_probability_map_as_mask_is_refused():
    p = make_phantom((48, 48, 36), spacing=(4.0, 4.0, 4.0))
    gt = p.masks["liver"]
    prob = ndimage.gaussian_filter(gt.astype(np.float32), 1.0)  # values in [0, 1], not a mask
    with pytest.raises(InputError):
        metrics.dice(prob, gt)
    with pytest.raises(InputError):
        evaluate({"liver": prob}, read_reference({"liver": gt}, like=p.volume))
