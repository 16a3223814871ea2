"""universal.data: manifests, validation, label transfer, availability, training patches."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from universal.data import (
    AugmentConfig,
    Case,
    PatchDataset,
    case_targets,
    label_map_from_spec,
    load_manifest,
    manifest_from_dict,
    paired_channel_permutation,
    prepare_case,
    universal_id_label_map_spec,
    validate_manifest,
    write_manifest,
    write_phantom_dataset,
)
from universal.errors import InputError

CLASSES = ["spleen", "right kidney", "left kidney", "liver", "liver tumor", "lung tumor"]
LABEL_SETS = {
    "organs": ["liver", "spleen", "right kidney", "left kidney"],
    "liver_tumour": ["liver", "liver tumor"],
    "lung_tumour": ["lung tumor"],
}


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom_ds")
    return write_phantom_dataset(out, 3, (48, 48, 40), (3.0, 3.0, 3.0), LABEL_SETS, unlabeled=1)


# ------------------------------------------------------------------------------------------------- manifests
def test_phantom_dataset_manifest(phantom_manifest):
    m = load_manifest(phantom_manifest)
    assert m.problems == ()
    assert m.names == ["case000", "case001", "case002", "case003"]
    assert [c.dataset for c in m] == ["organs", "liver_tumour", "lung_tumour", "unlabeled"]
    assert m["case001"].annotated_classes() == ("liver", "liver tumor")
    assert m["case000"].availability(CLASSES).tolist() == [True, True, True, True, False, False]
    assert m["case002"].availability(CLASSES).tolist() == [False] * 5 + [True]
    assert not m["case003"].labeled and not m["case003"].availability(CLASSES).any()
    # the tumour value also belongs to the liver (one-vs-all)
    assert m.datasets["liver_tumour"].labels[27] == ("liver tumor", "liver")
    assert validate_manifest(m, read_labels=True, classes=CLASSES) == []
    raw = json.loads(phantom_manifest.read_text())
    assert raw["cases"][0]["image"] == "images/case000.nii.gz"  # relative to the manifest


def test_manifest_round_trip(phantom_manifest, tmp_path):
    m = load_manifest(phantom_manifest)
    extra = Case(
        "extra",
        m["case000"].image,
        m["case000"].label,
        "ts",
        label_map_from_spec("ts", "totalsegmentator_v2"),
        annotated=("liver",),
        pseudo=("liver",),
        meta={"note": "x"},
    )
    out = write_manifest([*m.cases, extra], tmp_path / "sub" / "copy.json")
    raw = json.loads(out.read_text())
    assert raw["datasets"]["ts"] == "totalsegmentator_v2"  # registered maps by name
    assert raw["cases"][0]["image"].startswith("../")  # relative to the new manifest
    m2 = load_manifest(out)
    assert m2.problems == ()
    for a, b in zip([*m.cases, extra], m2.cases):
        assert (a.name, a.dataset, a.annotated_classes(), a.pseudo) == (
            b.name,
            b.dataset,
            b.annotated_classes(),
            b.pseudo,
        )
        assert a.image.resolve() == b.image.resolve()
        assert (a.label is None and b.label is None) or a.label.resolve() == b.label.resolve()
    assert m2["extra"].meta == {"note": "x"} and m2["extra"].ground_truth_classes() == ()


def test_csv_manifest(phantom_manifest, tmp_path):
    root = phantom_manifest.parent
    inline = json.dumps({"labels": {"6": ["liver"]}}).replace('"', '""')
    (tmp_path / "m.csv").write_text(
        "image,label,dataset,name,label_map\n"
        f'{root}/images/case000.nii.gz,{root}/labels/case000.nii.gz,liver_only,a,"{inline}"\n'
        f"{root}/images/case003.nii.gz,,unlabeled,b,\n"
        f"{root}/images/case001.nii.gz,{root}/labels/case001.nii.gz,msd_liver,c,\n"
    )
    m = load_manifest(tmp_path / "m.csv")
    assert m.problems == ()
    assert m["a"].annotated_classes() == ("liver",)
    assert not m["b"].labeled
    assert m["c"].label_map.name == "msd_liver"


def test_validation_lists_every_problem(phantom_manifest, tmp_path):
    root = phantom_manifest.parent
    data = {
        "datasets": {
            "typo": {"labels": {"1": ["livr"]}},
            "no_parent": {"labels": {"6": ["liver"], "27": ["liver tumor"]}},
            "partial": {"labels": {"6": ["liver"]}},
        },
        "cases": [
            {
                "name": "a",
                "image": "missing.nii.gz",
                "label": str(root / "labels/case000.nii.gz"),
                "dataset": "typo",
            },
            {
                "name": "b",
                "image": str(root / "images/case000.nii.gz"),
                "label": "nolabel.nii.gz",
                "dataset": "partial",
            },
            {
                "name": "c",
                "image": str(root / "images/case000.nii.gz"),
                "label": str(root / "labels/case000.nii.gz"),
                "dataset": "nonexistent_dataset",
            },
            {
                "name": "d",
                "image": str(root / "images/case000.nii.gz"),
                "label": str(root / "labels/case000.nii.gz"),
                "dataset": "partial",
            },
            {
                "name": "e",
                "image": str(root / "images/case001.nii.gz"),
                "label": str(root / "labels/case001.nii.gz"),
                "dataset": "no_parent",
            },
        ],
    }
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    problems = validate_manifest(load_manifest(p), read_labels=True, strict=False)
    text = "\n".join(problems)
    assert "livr" in text and "liver" in text  # unknown class, with a suggestion
    assert "missing.nii.gz does not exist" in text
    assert "nolabel.nii.gz does not exist" in text
    assert "nonexistent_dataset" in text
    assert "must also list its parent organ" in text
    # case d: the organ labels hold spleen/kidney values that the liver-only map does not know
    assert any(pr.startswith("case 'd'") and "does not map" in pr for pr in problems)
    with pytest.raises(InputError, match=r"problem\(s\)"):
        validate_manifest(p, read_labels=True)


def test_malformed_manifests(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_manifest(tmp_path / "x.json")
    with pytest.raises(InputError, match="cases"):
        manifest_from_dict({"datasets": {}})
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(tmp_path / "nothing.json")
    with pytest.raises(InputError, match="right, left"):
        label_map_from_spec("x", {"split_lr": {"1": ["left kidney", "right kidney"]}})


def test_universal_id_spec_parents():
    spec = universal_id_label_map_spec(
        ["liver", "liver tumor", "right kidney", "left kidney", "kidney tumor"]
    )
    assert spec["labels"]["27"] == ["liver tumor", "liver"]
    assert spec["labels"]["26"] == ["kidney tumor"] and spec["split_lr"]["26"] == [
        "right kidney",
        "left kidney",
    ]
    lm = label_map_from_spec("u", spec)
    assert set(lm.annotated) == {"liver", "liver tumor", "right kidney", "left kidney", "kidney tumor"}


# ----------------------------------------------------------------------------------------------- preparation
def test_prepare_case_matches_source_masks(phantom_manifest):
    from universal.phantom import make_phantom

    m = load_manifest(phantom_manifest)
    case = m["case001"]  # liver + liver tumour, seed 1
    prepared = prepare_case(case, CLASSES, spacing=3.0, crop_foreground=False)
    ph = make_phantom((48, 48, 40), (3.0, 3.0, 3.0), seed=1)
    assert prepared.shape == (48, 48, 40) and prepared.image.shape == (1, 48, 48, 40)
    assert prepared.available.tolist() == [False, False, False, True, True, False]
    np.testing.assert_array_equal(prepared.target[3], ph.masks["liver"])
    np.testing.assert_array_equal(prepared.target[4], ph.masks["liver tumor"])
    assert not prepared.target[[0, 1, 2, 5]].any()  # unannotated classes hold nothing
    assert 0.0 <= prepared.image.min() and prepared.image.max() <= 1.0
    # resampled + cropped grid: spacing close to the request, labels still aligned (liver brighter than air)
    p2 = prepare_case(case, CLASSES, spacing=4.5)
    assert np.allclose(p2.spacing, 4.5, atol=0.3)
    assert p2.target[3].any() and p2.image[0][p2.target[3]].mean() > 0.3


def test_universal_id_storage_recovers_every_phantom_mask(tmp_path):
    """All phantom classes in one universal-id label map: transfer gives back the one-vs-all masks exactly."""
    from universal.phantom import make_phantom

    p = write_phantom_dataset(tmp_path, 1, (48, 48, 40), (3.0, 3.0, 3.0), {"all": None})
    case = load_manifest(p)["case000"]
    ph = make_phantom((48, 48, 40), (3.0, 3.0, 3.0), seed=0)
    names = list(ph.masks)
    assert set(case.annotated_classes()) == set(names)
    prepared = prepare_case(case, names, spacing=3.0, crop_foreground=False)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(prepared.target[i], ph.masks[n], err_msg=n)


def test_patches_deterministic_balanced_and_lr_swap(phantom_manifest):
    m = load_manifest(phantom_manifest)
    prepared = [prepare_case(c, CLASSES, spacing=3.0) for c in m.cases if c.labeled]
    ds = PatchDataset(
        prepared,
        (16, 16, 16),
        CLASSES,
        samples_per_case=2,
        pos_neg_ratio=(1, 0),
        seed=3,
        augment=AugmentConfig(intensity_prob=0.0),
    )
    a, b = ds[7], ds[7]
    assert all(np.array_equal(a[k], b[k]) for k in ("image", "target", "available"))
    assert a["image"].shape == (1, 16, 16, 16) and a["target"].shape == (6, 16, 16, 16)
    assert ds.case_index(0) == ds.case_index(1)  # samples_per_case consecutive samples share a case
    # positive-only sampling: every patch holds an available foreground voxel
    for i in range(12):
        s = ds[i]
        assert (s["target"].bool() & s["available"][:, None, None, None]).any()
    # every case is visited once per epoch
    assert sorted(ds.case_index(2 * i) for i in range(3)) == [0, 1, 2]

    flipped = PatchDataset(
        prepared,
        (16, 16, 16),
        CLASSES,
        samples_per_case=2,
        pos_neg_ratio=(1, 0),
        seed=3,
        augment=AugmentConfig(flip_lr=1.0, intensity_prob=0.0),
    )
    perm = paired_channel_permutation(CLASSES)
    assert perm.tolist() == [0, 2, 1, 3, 4, 5]
    for i in range(4):
        s, f = ds[i], flipped[i]
        np.testing.assert_array_equal(f["image"].numpy(), s["image"].numpy()[:, ::-1])
        # a left/right flip turns the right kidney into a left one: channels and availability swap
        np.testing.assert_array_equal(f["target"].numpy(), s["target"].numpy()[perm][:, ::-1])
        np.testing.assert_array_equal(f["available"].numpy(), s["available"].numpy()[perm])


def test_small_image_is_padded(phantom_manifest):
    m = load_manifest(phantom_manifest)
    p = prepare_case(m["case000"], CLASSES, spacing=12.0)
    ds = PatchDataset([p], (16, 16, 16), CLASSES)
    assert any(s < 16 for s in p.shape)
    assert ds[0]["image"].shape == (1, 16, 16, 16)


def test_small_image_is_padded_like_the_sliding_window_inference():
    from universal.data import AugmentConfig, PreparedCase

    # an image of ones smaller than the patch on two axes: the patch holds it centred, zeros around (MONAI's split)
    image = np.ones((1, 11, 20, 6), np.float32)
    target = np.zeros((len(CLASSES), 11, 20, 6), bool)
    target[0, 3:8, 5:15, 1:5] = True
    case = PreparedCase(
        "small", image, target, np.ones(len(CLASSES), bool), np.eye(4), np.flatnonzero(target[0])
    )
    ds = PatchDataset([case], (16, 16, 16), CLASSES, augment=AugmentConfig(intensity_prob=0.0), seed=0)
    for i in range(4):
        patch = np.asarray(ds[i]["image"][0])
        tgt = np.asarray(ds[i]["target"][0])
        assert patch.shape == (16, 16, 16)
        assert patch[2:13, :, 5:11].all() and patch.sum() == 11 * 16 * 6  # x: 5 missing → 2 before, 3 after
        assert tgt[2 + 3 : 2 + 8, :, 5 + 1 : 5 + 5].any() and tgt.sum() <= target[0].sum()


# --------------------------------------------------------------------------------------------------- real data
def test_real_partially_labeled_assembly(shared_data, tmp_path):
    data = {
        "cases": [
            {
                "name": "ts",
                "image": str(shared_data / "ts_abdomen_3mm/ct.nii.gz"),
                "label": str(shared_data / "ts_abdomen_3mm/labels_totalseg.nii.gz"),
                "dataset": "totalsegmentator_v2",
            },
            {
                "name": "lung1",
                "image": str(shared_data / "radiomics_lung_tumor/lung1_image.nrrd"),
                "label": str(shared_data / "radiomics_lung_tumor/lung1_label.nrrd"),
                "dataset": "radiomics_lung_tumor",
            },
            {
                "name": "liver3",
                "image": str(shared_data / "dcmqi_liver_3slice"),
                "label": str(shared_data / "dcmqi_liver_3slice/liver_seg.nrrd"),
                "dataset": "dcmqi_liver",
            },
            {
                "name": "unlabeled",
                "image": str(shared_data / "ts_abdomen_3mm_unlabeled/ct.nii.gz"),
                "label": None,
            },
        ]
    }
    p = tmp_path / "real.json"
    p.write_text(json.dumps(data))
    m = load_manifest(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TS holds many classes without a universal counterpart (warned)
        assert validate_manifest(m, read_labels=True) == []
    classes = ["liver", "right kidney", "left kidney", "spleen", "lung tumor", "liver tumor"]
    avail = np.stack([c.availability(classes) for c in m])
    assert avail.tolist() == [
        [True, True, True, True, False, False],
        [False, False, False, False, True, False],
        [True, False, False, False, False, False],
        [False] * 6,
    ]
    from universal.io import load_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = m["ts"]
        vol = load_volume(ts.image)
        masks = case_targets(ts, vol, classes)
    assert masks.shape == (6, *vol.shape)
    assert masks[0].sum() > 1000  # liver present
    rk, lk = masks[1], masks[2]
    assert rk.any() and lk.any() and not (rk & lk).any()
    x = lambda mk: float(vol.affine[0, :3] @ np.argwhere(mk).mean(0) + vol.affine[0, 3])  # noqa: E731
    assert x(rk) > x(lk)  # RAS+: the patient's right kidney at larger world x
    assert x(masks[0]) > x(masks[3])  # liver right of spleen
    assert not masks[4:].any()  # lung / liver tumour not annotated by TS
