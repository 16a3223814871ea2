"""universal.app_logic: samples, ground truth conventions, evaluation rules, comparisons, models, session folders."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from universal import app_logic as al
from universal.errors import CheckpointError, InputError
from universal.io import volume_from_array


def _seg(masks, volumes=None):
    return SimpleNamespace(masks=masks, volumes_ml=volumes or {n: float(m.sum()) for n, m in masks.items()})


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# ------------------------------------------------------------------------------------------------ samples
def test_only_the_phantom_without_shared_data(tmp_path):
    samples = al.list_samples(root=tmp_path)
    assert [s.key for s in samples] == ["phantom"]


def test_real_sample_is_found_relative_to_the_project_root(tmp_path):
    real = tmp_path / "project" / al.REAL_SAMPLE_DIR
    real.mkdir(parents=True)
    (real / "ct.nii.gz").write_bytes(b"x")
    samples = al.list_samples(root=tmp_path / "project")
    assert [s.key for s in samples] == ["phantom", "ts_abdomen_3mm"]
    assert samples[1].gt is None  # no labels next to it: no reference


def test_load_phantom_sample():
    data = al.load_sample("phantom")
    assert data.volume.shape == (128, 128, 96)
    assert data.volume.spacing == pytest.approx((1.5, 1.5, 1.5))
    assert "liver" in data.classes and set(data.annotated) == set(data.gt_masks)
    assert all(m.shape == data.volume.shape and m.dtype == bool for m in data.gt_masks.values())
    with pytest.raises(InputError):
        al.load_sample("nope")


def test_load_real_sample_with_totalsegmentator_reference(shared_data):
    data = al.load_sample("ts_abdomen_3mm", root=Path(__file__).resolve().parents[1])
    assert data.volume.shape == (122, 101, 30)
    assert {"liver", "spleen", "right kidney", "left kidney"} <= set(data.classes)
    assert "liver tumor" not in data.annotated  # TotalSegmentator does not annotate liver tumours
    liver, spleen = data.gt_masks["liver"], data.gt_masks["spleen"]
    # RAS+: the liver (patient's right) lies at larger x than the spleen
    assert np.argwhere(liver)[:, 0].mean() > np.argwhere(spleen)[:, 0].mean()


def test_held_out_dicom_sample_with_reference(shared_data):
    root = Path(__file__).resolve().parents[1]
    keys = [s.key for s in al.list_samples(root=root)]
    assert keys == ["phantom", "ts_abdomen_3mm", "ts_dicom_series"]
    data = al.load_sample("ts_dicom_series", root=root)
    assert data.sample.ct.name == "dicom" and data.volume.array.ndim == 3
    assert {"liver", "spleen"} <= set(data.classes)  # present in its reference
    assert "held out" in data.sample.label
    assert all(m.shape == data.volume.shape for m in data.gt_masks.values())


# ------------------------------------------------------------------------------------------------ ground truth
def _vol(shape=(12, 10, 8)):
    ct = np.random.default_rng(0).normal(0, 50, shape).astype(np.float32)
    return volume_from_array(ct, spacing=(2.0, 2.0, 3.0))


def test_ground_truth_universal_ids_and_tumour_in_parent():
    vol = _vol()
    lab = np.zeros(vol.shape, np.int16)
    lab[2:6, 2:6, 2:6] = 6  # liver
    lab[3:4, 3:4, 3:4] = 27  # liver tumour drawn over it
    masks, annotated = al.ground_truth_masks(lab, vol, "universal ids (1-32)")
    assert set(annotated) == {"liver", "liver tumor"}
    assert (
        masks["liver"].sum() == 64 and masks["liver tumor"].sum() == 1
    )  # one-vs-all: tumour voxel is liver too
    with pytest.raises(InputError, match="not universal ids"):
        al.ground_truth_masks(np.full(vol.shape, 99, np.int16), vol, None)
    with pytest.raises(InputError, match="does not match"):
        al.ground_truth_masks(np.zeros((3, 3, 3), np.int16), vol, None)


def test_ground_truth_flare23_and_dataset_conventions():
    vol = _vol()
    lab = np.zeros(vol.shape, np.int16)
    lab[0:3, 0:3, 0:3] = 1  # FLARE: liver
    lab[8:10, 5:8, 2:4] = 14  # FLARE: lesion
    masks, annotated = al.ground_truth_masks(lab, vol, "FLARE 2023 ids (1-14)")
    assert masks["liver"].sum() == 27 and masks["lesion"].sum() == 12
    assert len(annotated) == 14
    msd = np.zeros(vol.shape, np.int16)
    msd[2:6, 2:6, 2:6] = 1  # MSD liver: 1 liver, 2 tumour
    msd[3, 3, 3] = 2
    masks, annotated = al.ground_truth_masks(msd, vol, "dataset: msd_liver")
    assert set(annotated) == {"liver", "liver tumor"}
    assert masks["liver"].sum() == 64 and masks["liver tumor"].sum() == 1
    assert "dataset: totalsegmentator_v2" in al.gt_conventions()


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluate_flare23_marks_unannotated_classes_and_scores_only_segmented_ones():
    shape = (16, 16, 16)
    liver = _box(shape, (2, 2, 2), (8, 8, 8))
    spleen = _box(shape, (10, 2, 2), (14, 6, 6))
    seg = _seg({"liver": liver, "spleen": spleen, "liver tumor": np.zeros(shape, bool)})
    res = al.evaluate_segmentation(seg, {"liver": liver}, ["liver"], (1, 1, 1), preset="flare23")
    assert list(res.scores) == ["liver", "spleen", "lesion"]
    assert res["liver"].dsc == 1.0 and res["liver"].status == "ok"
    assert res["spleen"].status == "not annotated" and np.isnan(res["spleen"].dsc)
    assert res["lesion"].status == "not annotated"  # the reference annotates no tumour class
    assert res.mean()["dsc"] == 1.0


def test_evaluate_generic_rules_and_no_flare_class():
    shape = (16, 16, 16)
    vein = _box(shape, (2, 2, 2), (6, 6, 6))
    seg = _seg({"portal and splenic vein": vein, "colon": vein})
    with pytest.raises(InputError, match="FLARE 2023"):
        al.evaluate_segmentation(seg, {"colon": vein}, ["colon"], (1, 1, 1), preset="flare23")
    res = al.evaluate_segmentation(seg, {"colon": vein}, ["colon"], (1, 1, 1), preset=None)
    assert res["colon"].dsc == 1.0
    assert res["portal and splenic vein"].status == "not annotated"


def test_compare_segmentations_per_class_dsc():
    shape = (10, 10, 10)
    a = _box(shape, (0, 0, 0), (4, 10, 10))
    b = _box(shape, (2, 0, 0), (6, 10, 10))
    df = al.compare_segmentations(_seg({"liver": a, "spleen": a}), _seg({"liver": b, "spleen": a}))
    assert list(df["class"]) == ["liver", "spleen"]
    assert df["DSC(A,B)"].tolist() == pytest.approx([0.5, 1.0])
    assert df["voxels only in A"].tolist() == [200, 0]


def test_prompt_similarity_between_templates():
    sim = al.prompt_similarity_matrix(["liver", "spleen"], "ct", "ct", "onehot")
    assert sim.shape == (2, 2) and np.allclose(sim, np.eye(2), atol=1e-6)


# ------------------------------------------------------------------------------------------------ models
def test_model_choices_always_offer_a_usable_model():
    choices = al.model_choices()
    keys = [c.key for c in choices]
    assert al.DEMO_MODEL in keys and "builtin" in keys
    assert choices[0].available  # the first (default) choice can load
    builtin = next(c for c in choices if c.key == "builtin")
    assert builtin.available or "builtin.pt" in builtin.note
    demo = next(c for c in choices if c.key == al.DEMO_MODEL)
    assert "random weights" in demo.label


def test_load_model_errors_are_readable(tmp_path):
    with pytest.raises(CheckpointError, match="path of a checkpoint"):
        al.load_model("checkpoint", checkpoint=None)
    with pytest.raises(CheckpointError, match="not a file"):
        al.load_model("checkpoint", checkpoint=str(tmp_path / "missing.pt"))


def test_demo_model_is_reproducible_and_does_not_touch_the_global_seed():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    m1 = al.demo_model(encoder="onehot", seed=0)
    after = torch.rand(1)
    m2 = al.demo_model(encoder="onehot", seed=0)
    assert torch.equal(after, expected)
    assert len(m1.class_names) == 32
    p1, p2 = next(m1.parameters()), next(m2.parameters())
    assert torch.equal(p1, p2)


# ------------------------------------------------------------------------------------------------ uploads
def test_safe_filename_strips_folders_and_odd_characters():
    assert al.safe_filename("../../etc/passwd") == "passwd"
    assert al.safe_filename("C:\\scans\\my scan (1).nii.gz") == "my_scan_1_.nii.gz"
    assert al.safe_filename("...") == "upload"


def test_session_folders_are_private_and_removed():
    a, b = al.SessionFolder(), al.SessionFolder()
    try:
        pa = a.save("ct.nii.gz", b"A")
        assert pa.read_bytes() == b"A" and a.path != b.path
        assert not any(b.path.rglob("*"))
        a.save("ct.nii.gz", b"A2")  # replaces
        assert pa.read_bytes() == b"A2"
        a.clear()
        assert not pa.exists()
    finally:
        a.close()
        b.close()
    assert a.closed and not a.path.exists() and not b.path.exists()


def test_session_folder_is_removed_when_garbage_collected():
    import gc

    f = al.SessionFolder()
    path = f.path
    f.save("x.nii", b"1")
    del f
    gc.collect()
    assert not path.exists()


def test_upload_size_limit():
    al.check_upload("ct.nii.gz", 10 * 1024**2, 512)
    with pytest.raises(InputError, match="upload limit is 5 MB"):
        al.check_upload("ct.nii.gz", 6 * 1024**2, 5)


def test_split_supported_classes_keeps_order_resolves_aliases_and_lists_the_rest():
    from universal.errors import ClassNameError

    model = SimpleNamespace(class_names=["spleen", "liver", "inferior vena cava"])
    ok, missing = al.split_supported_classes(model, ["IVC", "liver tumor", "Liver", "left lung"])
    assert ok == ["inferior vena cava", "liver"]
    assert missing == ["liver tumor", "left lung"]
    with pytest.raises(ClassNameError):
        al.split_supported_classes(model, ["livr"])
