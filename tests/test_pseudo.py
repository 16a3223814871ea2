"""universal.pseudo: pseudo-labels never overwrite ground truth; confidence rules; quality report."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from universal.data import case_targets, load_manifest, prepare_case, validate_manifest, write_phantom_dataset
from universal.errors import InputError
from universal.predictor import Predictor
from universal.preprocess import PreprocessConfig
from universal.pseudo import PseudoLabelConfig, merge_with_ground_truth, pseudo_label, quality_flags

CLASSES = ["spleen", "right kidney", "left kidney", "liver", "liver tumor", "lung tumor"]
LABEL_SETS = {
    "organs": ["liver", "spleen", "right kidney", "left kidney"],
    "liver_tumour": ["liver", "liver tumor"],
    "lung_tumour": ["lung tumor"],
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_phantom_dataset(
        tmp_path_factory.mktemp("ds"), 3, (48, 48, 40), (3.0, 3.0, 3.0), LABEL_SETS, unlabeled=1
    )


@pytest.fixture(scope="module")
def model():
    from universal.model import create_model

    torch.manual_seed(0)
    m = create_model(
        "segresnet",
        classes=CLASSES,
        encoder="onehot",
        embed_dim=len(CLASSES),
        embeddings=np.eye(len(CLASSES), dtype=np.float32),
        preprocessing=PreprocessConfig(spacing_mm=3.0),
        init_filters=16,
        blocks_down=[1, 1, 1],
        blocks_up=[1, 1],
    )
    return m.eval()


def _targets(case, classes):
    from universal.io import load_volume

    vol = load_volume(case.image)
    return case_targets(case, vol, classes)


def test_pseudo_labels_never_overwrite_ground_truth(manifest, model, tmp_path):
    # an untrained model with no confidence bar: large, wrong predictions everywhere stress the merge
    teacher = Predictor(model, patch_size=32, device="cpu")
    rules = PseudoLabelConfig(min_confidence=0.0, empty_as_negative=True)  # every class annotated, GT or pseudo
    new_path, report = pseudo_label(manifest, teacher, tmp_path, rules)
    old, new = load_manifest(manifest), load_manifest(new_path)
    assert new.problems == () and validate_manifest(new, read_labels=True) == []
    assert new.names == old.names
    for o, n in zip(old.cases, new.cases):
        gt = [c for c in o.annotated_classes() if c in CLASSES]
        assert n.ground_truth_classes() == tuple(gt)
        assert set(n.annotated_classes()) == set(CLASSES)  # every class is now annotated (GT or pseudo)
        assert set(n.pseudo) == set(CLASSES) - set(gt)
        assert n.meta["source_dataset"] == o.dataset
        if gt:
            np.testing.assert_array_equal(_targets(n, gt), _targets(o, gt))  # ground truth, voxel for voxel
        assert n.availability(CLASSES).all()
    # report: JSON + CSV, one row per case and class
    assert [c["case"] for c in report["cases"]] == old.names
    saved = json.loads((tmp_path / "quality_report.json").read_text())
    assert saved["manifest"] == str(new_path)
    rows = list(csv.DictReader(open(tmp_path / "quality_report.csv")))
    assert len(rows) == len(old.names) * len(CLASSES)
    liver = report["cases"][0]["classes"]["liver"]
    assert liver["source"] == "ground truth" and liver["volume_ml"] > 0 and 0 <= liver["agreement_dsc"] <= 1
    # the pseudo-labelled manifest trains: availability all True, masks on the training grid
    prepared = prepare_case(new["case002"], CLASSES, spacing=3.0)
    assert prepared.available.all()


def test_unconfident_predictions_stay_unannotated(manifest, model, tmp_path):
    teacher = Predictor(model, patch_size=32)
    new_path, report = pseudo_label(manifest, teacher, tmp_path, PseudoLabelConfig(min_confidence=0.999))
    new = load_manifest(new_path)
    case = new["case002"]  # lung tumour only in its ground truth
    rows = report["cases"][2]["classes"]
    dropped = [c for c, r in rows.items() if r["source"] == "dropped"]
    assert dropped, "an untrained model cannot reach a mean probability of 0.999"
    assert not set(dropped) & set(case.annotated_classes())
    assert "lung tumor" in case.annotated_classes()
    assert any("low confidence" in f for f in report["cases"][2]["flags"])
    assert report["flagged"]


def test_merge_keeps_ground_truth_and_parents():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (20, 12, 10)
    liver = np.zeros(shape, bool)
    liver[2:9, 2:10, 2:8] = True
    tumour = np.zeros(shape, bool)
    tumour[7:12, 4:7, 3:6] = True  # pseudo tumour half outside the ground-truth liver
    spleen = np.zeros(shape, bool)
    spleen[5:16, 3:9, 2:8] = True  # pseudo spleen overlapping the liver
    rk = np.zeros(shape, bool)
    rk[14:18, 2:6, 2:6] = True  # right kidney: larger x
    lk = np.zeros(shape, bool)
    lk[1:4, 10:12, 8:10] = True
    ktum = np.zeros(shape, bool)
    ktum[15:17, 3:5, 3:5] = True
    classes = ["spleen", "right kidney", "left kidney", "liver", "kidney tumor", "liver tumor"]
    label, decoded = merge_with_ground_truth(
        {"liver": liver, "right kidney": rk, "left kidney": lk},
        {"liver tumor": tumour, "spleen": spleen, "kidney tumor": ktum},
        affine,
        classes,
    )
    for name, gt in (("liver", liver), ("right kidney", rk), ("left kidney", lk)):
        np.testing.assert_array_equal(decoded[name], gt)
    np.testing.assert_array_equal(decoded["liver tumor"], tumour & liver)  # clipped to its GT parent
    assert not (decoded["spleen"] & liver).any()  # a pseudo organ never paints over a GT organ
    np.testing.assert_array_equal(decoded["kidney tumor"], ktum)
    assert label.dtype == np.int16 and set(np.unique(label)) <= {0, 1, 2, 3, 6, 26, 27}


def test_left_right_plausibility_flag():
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    right, left = np.zeros((20, 8, 8), bool), np.zeros((20, 8, 8), bool)
    right[2:5, 2:5, 2:5] = True  # right kidney at *smaller* world x: implausible in RAS+
    left[14:17, 2:5, 2:5] = True
    rows = {
        "right kidney": {"source": "pseudo", "components": 1, "mean_confidence": 0.95},
        "left kidney": {"source": "pseudo", "components": 1, "mean_confidence": 0.95},
    }
    flags = quality_flags({"right kidney": right, "left kidney": left}, affine, rows, PseudoLabelConfig())
    assert any("left/right implausible" in f for f in flags)
    flags = quality_flags({"right kidney": left, "left kidney": right}, affine, rows, PseudoLabelConfig())
    assert flags == []


def test_real_dicom_ground_truth_survives(shared_data, model, tmp_path):
    src = tmp_path / "real.json"
    src.write_text(
        json.dumps(
            {
                "cases": [
                    {
                        "name": "liver3",
                        "image": str(shared_data / "dcmqi_liver_3slice"),
                        "label": str(shared_data / "dcmqi_liver_3slice/liver_seg.nrrd"),
                        "dataset": "dcmqi_liver",
                    }
                ]
            }
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 slices: io warns about the thin volume
        teacher = Predictor(model, patch_size=32)
        new_path, report = pseudo_label(src, teacher, tmp_path / "out", PseudoLabelConfig(min_confidence=0.0))
        old, new = load_manifest(src)["liver3"], load_manifest(new_path)["liver3"]
        a, b = _targets(old, ["liver"]), _targets(new, ["liver"])
    assert a.sum() > 10_000
    np.testing.assert_array_equal(a, b)
    assert new.ground_truth_classes() == ("liver",)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_confidence": 1.5},
        {"min_confidence": "high"},
        {"review_max_components": 0},
        {"review_min_dsc": -1},
    ],
)
def test_rules_are_validated_where_they_enter(kwargs):
    with pytest.raises(InputError):
        PseudoLabelConfig(**kwargs)


def test_the_teacher_settings_decide_the_predictions_and_the_report_says_so(manifest, model, tmp_path):
    teacher = Predictor(model, patch_size=32, threshold=0.9, postprocess=False)
    _, strict = pseudo_label(manifest, teacher, tmp_path / "a", PseudoLabelConfig(min_confidence=0.0))
    _, loose = pseudo_label(
        manifest, teacher.with_settings(threshold=0.1), tmp_path / "b", PseudoLabelConfig(min_confidence=0.0)
    )
    assert strict["settings"]["threshold"] == 0.9 and loose["settings"]["threshold"] == 0.1
    assert strict["settings"]["teacher"]["postprocess"] is False
    vol = [sum((r.get("volume_ml") or 0) for r in c["classes"].values()) for c in strict["cases"]]
    vol_loose = [sum((r.get("volume_ml") or 0) for r in c["classes"].values()) for c in loose["cases"]]
    assert vol != vol_loose


def test_empty_predictions_stay_unannotated_by_default(manifest, model, tmp_path):
    """The default never turns "predicted nowhere" into an annotated "absent" (the naive suppression)."""
    teacher = Predictor(model, patch_size=32, threshold=0.999999, postprocess=False)  # predicts nothing
    new_path, report = pseudo_label(manifest, teacher, tmp_path, PseudoLabelConfig(min_confidence=0.0))
    old, new = load_manifest(manifest), load_manifest(new_path)
    for o, n in zip(old.cases, new.cases):
        assert set(n.annotated_classes()) == {c for c in o.annotated_classes() if c in CLASSES}
    flags = [f for c in report["cases"] for f in c["flags"]]
    assert any("predicted nowhere" in f for f in flags) and not any("p=nan" in f for f in flags)


def test_ground_truth_outside_the_teacher_classes_is_kept_voxel_for_voxel(manifest, tmp_path):
    """A teacher of liver and spleen only: the organs cases keep both kidneys' ground truth (and the report row)."""
    from universal.model import create_model

    torch.manual_seed(0)
    small = create_model(
        "segresnet", classes=["liver", "spleen"], encoder="onehot", embed_dim=2,
        embeddings=np.eye(2, dtype=np.float32), preprocessing=PreprocessConfig(spacing_mm=3.0),
        init_filters=16, blocks_down=[1, 1, 1], blocks_up=[1, 1],
    ).eval()  # fmt: skip
    new_path, report = pseudo_label(manifest, Predictor(small, patch_size=32), tmp_path / "ps",
                                    PseudoLabelConfig(min_confidence=0.0))  # fmt: skip
    old, new = load_manifest(manifest), load_manifest(new_path)
    kidneys = ["right kidney", "left kidney"]
    organs = [(o, n) for o, n in zip(old.cases, new.cases) if "right kidney" in o.ground_truth_classes()]
    assert organs
    for o, n in organs:
        assert set(o.annotated_classes()) <= set(n.annotated_classes())
        assert set(kidneys) <= set(n.ground_truth_classes())
        before, after = _targets(o, kidneys), _targets(n, kidneys)
        assert before.any() and np.array_equal(before, after)
    rows = {c["case"]: c["classes"] for c in report["cases"]}
    assert rows[organs[0][0].name]["left kidney"]["source"] == "ground truth"


def test_a_rerun_replaces_the_earlier_output_whole_and_other_folders_are_refused(manifest, model, tmp_path):
    out = tmp_path / "ps"
    teacher = Predictor(model, patch_size=32)
    pseudo_label(manifest, teacher, out, PseudoLabelConfig(min_confidence=0.0))
    (out / "labels" / "stale.nii.gz").write_bytes(b"from an older run")
    pseudo_label(manifest, teacher, out, PseudoLabelConfig(min_confidence=0.0))
    assert not (out / "labels" / "stale.nii.gz").exists()  # replaced as a whole, not file by file
    assert [p.name for p in tmp_path.iterdir()] == ["ps"]  # no temporary sibling left
    assert validate_manifest(load_manifest(out / "manifest.json"), read_labels=True) == []
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an earlier pseudo-label output"):
        pseudo_label(manifest, teacher, out, PseudoLabelConfig(min_confidence=0.0))
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="lie in the output folder"):  # a round's output into its own folder
        pseudo_label(out / "manifest.json", teacher, out.parent, PseudoLabelConfig(min_confidence=0.0))
