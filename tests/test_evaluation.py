"""universal.evaluation: reference conventions, the classes scored, presets; the CLI, dashboard and bench use it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from universal import app_logic, evaluation, taxonomy
from universal.cli import main
from universal.errors import InputError
from universal.evaluation import (
    FLARE23,
    NOT_ANNOTATED,
    NOT_SEGMENTED,
    UNIVERSAL,
    choose_classes,
    evaluate,
    read_prediction,
    read_reference,
)
from universal.io import volume_from_array
from universal.phantom import make_phantom

TS = "totalsegmentator_v2"
PRESETS = [None, *evaluation.PRESETS]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(64, 64, 48), spacing=(3.0, 3.0, 3.0), seed=3)


def _encode(masks: dict[str, np.ndarray], convention: str) -> np.ndarray:
    """A label map of one-vs-all universal masks in ``convention``'s ids (what a dataset would have drawn)."""
    if convention == UNIVERSAL:
        return taxonomy.masks_to_label_map(masks)
    if convention == FLARE23:
        return taxonomy.flare23_label_map(masks).astype(np.int16)
    ds = taxonomy.dataset(convention)
    lab = np.zeros(next(iter(masks.values())).shape, np.int16)
    drawn: set[tuple[str, ...]] = set()
    values = sorted(set(ds.labels) | set(ds.split_lr))
    tumour_last = sorted(
        values, key=lambda v: any(taxonomy.resolve_class(c).is_tumor for c in ds.labels.get(v, ()))
    )
    for v in tumour_last:
        classes, pair = tuple(ds.labels.get(v, ())), ds.split_lr.get(v)
        key = classes or pair
        if key in drawn or not all(c in masks for c in classes):
            continue
        if classes:
            region = np.logical_and.reduce([masks[c] for c in classes])
        else:
            region = np.logical_or.reduce([masks[c] for c in pair if c in masks])
        drawn.add(key)
        lab[region] = v
    return lab


def _save(array: np.ndarray, path: Path, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, np.int16), affine), path)
    return path


def _segment_folder(root: Path, masks: dict[str, np.ndarray], affine: np.ndarray) -> Path:
    """A fake output folder of `universal segment`: masks/<class_name>.nii.gz."""
    (root / "masks").mkdir(parents=True)
    for name, m in masks.items():
        nib.save(
            nib.Nifti1Image(np.asarray(m, np.uint8), affine),
            root / "masks" / f"{name.replace(' ', '_')}.nii.gz",
        )
    return root


@pytest.fixture(scope="module")
def ts(shared_data, tmp_path_factory):
    """The real TotalSegmentator reference, a segment folder with its liver, and its universal / FLARE encodings."""
    path = shared_data / "ts_abdomen_3mm" / "labels_totalseg.nii.gz"
    img = nib.load(path)
    lab = np.asarray(img.dataobj)
    d = tmp_path_factory.mktemp("ts")
    liver = lab == 5  # TotalSegmentator v2: liver = 5
    eroded = ndimage.binary_erosion(liver, iterations=1)
    ref = read_reference(path, TS)
    universal_masks = {n: ref.masks[n] for n in ref.annotated}
    return SimpleNamespace(
        gt=path,
        liver=liver,
        seg=_segment_folder(d / "seg", {"liver": liver}, img.affine),
        eroded=_segment_folder(d / "eroded", {"liver": eroded}, img.affine),
        universal=_save(_encode(universal_masks, UNIVERSAL), d / "universal.nii.gz", img.affine),
        flare=_save(_encode(universal_masks, FLARE23), d / "flare.nii.gz", img.affine),
        affine=img.affine,
        dir=d,
    )


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["evaluate", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------------ the two bugs
def test_gt_dataset_is_honoured_under_the_flare23_preset(ts, tmp_path, capsys):
    """--gt-dataset totalsegmentator_v2 --preset flare23 used to read TotalSegmentator ids as FLARE ids."""
    js = tmp_path / "m.json"
    rc, out, _ = _cli(capsys, ts.seg, ts.gt, "--gt-dataset", TS, "--preset", "flare23", "--json", js)
    assert rc == 0
    data = json.loads(js.read_text())
    assert data["classes"]["liver"]["dsc"] == pytest.approx(1.0)
    assert data["classes"]["liver"]["nsd"] == pytest.approx(1.0)
    assert data["scored"] == ["liver"] and data["convention"] == TS and data["preset"] == "flare23"
    assert data["mean"]["dsc"] == pytest.approx(1.0)
    assert "scored (1): liver" in out and "dataset: totalsegmentator_v2" in out


def test_default_scores_only_segmented_and_annotated_classes_and_says_so(ts, tmp_path, capsys):
    """--gt-dataset alone used to score 19 classes never segmented (mean 0.23 for a good liver)."""
    js = tmp_path / "m.json"
    rc, out, _ = _cli(capsys, ts.eroded, ts.gt, "--gt-dataset", TS, "--json", js)
    assert rc == 0
    data = json.loads(js.read_text())
    liver = data["classes"]["liver"]["dsc"]
    assert 0.6 < liver < 0.95  # an eroded liver: good, not perfect
    assert list(data["classes"]) == ["liver"] and data["mean"]["dsc"] == pytest.approx(liver)
    not_segmented = set(taxonomy.dataset(TS).annotated) - {"liver"}
    assert data["skipped"] == {n: NOT_SEGMENTED for n in taxonomy.dataset(TS).annotated if n != "liver"}
    assert f"skipped, not segmented ({len(not_segmented)}):" in out and "scored (1): liver" in out
    # the dashboard answers the same question the same way
    vol = volume_from_array(np.zeros(ts.liver.shape, np.float32), affine=ts.affine, check=False)
    masks, annotated = app_logic.ground_truth_from_file(ts.gt, vol, f"dataset: {TS}")
    seg = SimpleNamespace(masks={"liver": ndimage.binary_erosion(ts.liver, iterations=1)}, volume=vol)
    res = app_logic.evaluate_segmentation(seg, masks, annotated, vol.spacing, preset=None)
    assert res.mean()["dsc"] == pytest.approx(data["mean"]["dsc"]) and res.skipped == data["skipped"]


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("which", ["universal", "flare23", TS])
def test_liver_from_the_reference_scores_one_under_every_convention(ts, capsys, preset, which):
    gt = {"universal": ts.universal, "flare23": ts.flare, TS: ts.gt}[which]
    args = [ts.seg, gt, "--gt-dataset", which] + (["--preset", preset] if preset else [])
    rc, out, err = _cli(capsys, *args)
    assert rc == 0, err
    assert "scored (1): liver" in out
    res = evaluate(ts.seg, gt, preset=preset, convention=which)
    assert res["liver"].dsc == pytest.approx(1.0) and res["liver"].nsd == pytest.approx(1.0)
    assert res.scored == ["liver"] and res.convention == which


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gt-dataset", "flare23", "--preset", "flare23"], "not FLARE 2023 ids"),
        (["--gt-dataset", "universal"], "not universal ids"),
        ([], "not universal ids"),  # the default convention: universal ids
        (["--preset", "flare23"], "say which ids"),  # the FLARE preset no longer implies FLARE ids
        (["--gt-dataset", "msd_liver"], "not dataset: msd_liver"),
    ],
)
def test_refused_combinations_exit_2_with_one_line(ts, capsys, args, message):
    rc, out, err = _cli(capsys, ts.seg, ts.gt, *args)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert TS in err or "say which" in err  # the message says what to do


def test_refused_folder_conventions_and_nothing_to_score(ts, tmp_path, capsys):
    colon = _segment_folder(tmp_path / "colon", {"colon": ts.liver}, ts.affine)
    rc, _, err = _cli(capsys, colon, ts.gt, "--gt-dataset", TS, "--preset", "flare23")
    assert rc == 2 and "nothing to score under the flare23 preset" in err and err.count("\n") == 1
    rc, _, err = _cli(capsys, ts.seg, ts.seg, "--gt-dataset", TS)  # a folder of masks has no ids
    assert rc == 2 and "folder of masks named by class" in err
    with pytest.raises(SystemExit) as exc:  # argparse refuses it: the choices are evaluation.conventions()
        _cli(capsys, ts.seg, ts.gt, "--gt-dataset", "no_such_dataset")
    assert exc.value.code == 2 and "invalid choice: 'no_such_dataset'" in capsys.readouterr().err


def test_cli_choices_come_from_the_library():
    from universal.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["evaluate"]
    by_dest = {a.dest: a for a in sub._actions}
    assert list(by_dest["preset"].choices) == list(evaluation.PRESETS)
    assert list(by_dest["gt_dataset"].choices) == evaluation.conventions()
    assert list(by_dest["pred_dataset"].choices) == evaluation.conventions()


def test_predicted_label_map_and_segmentation_objects(ts, tmp_path):
    pred_map = _save(np.where(ts.liver, 6, 0), tmp_path / "pred.nii.gz", ts.affine)  # universal id 6: liver
    pred = read_prediction(pred_map)
    assert pred.segmented == ("liver",)
    res = evaluate(pred_map, ts.gt, convention=TS)
    assert res.scored == ["liver"] and res["liver"].dsc == 1.0
    with pytest.raises(InputError, match="say which ids the prediction"):
        evaluate(pred_map, ts.gt, preset="flare23", convention=TS)
    res = evaluate(pred_map, ts.gt, preset="flare23", convention=TS, prediction_convention="universal")
    assert res["liver"].dsc == 1.0
    # a Segmentation: the reference is read onto its volume's grid
    vol = volume_from_array(np.zeros(ts.liver.shape, np.float32), affine=ts.affine, check=False)
    seg = SimpleNamespace(masks={"liver": ts.liver, "liver tumor": np.zeros_like(ts.liver)}, volume=vol)
    res = evaluate(seg, ts.gt, preset="flare23", convention=TS)
    assert res.scored == ["liver"] and res["liver"].dsc == 1.0
    assert res.skipped["lesion"] == NOT_ANNOTATED  # TotalSegmentator annotates no tumour
    assert list(res.scores) == ["liver", "lesion"] and res.mean()["dsc"] == 1.0


# ------------------------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("convention", evaluation.conventions())
def test_every_preset_and_convention(phantom, preset, convention):
    """The phantom's own masks, drawn in each convention's ids, score 1 on every class scored."""
    masks = {n: np.asarray(m, bool) for n, m in phantom.masks.items()}
    ref = read_reference(_encode(masks, convention), convention, like=phantom.volume)
    assert ref.convention == convention
    seg = SimpleNamespace(masks=masks, volume=phantom.volume)
    if not set(ref.annotated) & set(masks):  # MSD colon / hepatic vessel: nothing the phantom has
        with pytest.raises(InputError, match="nothing to score"):
            evaluate(seg, ref, preset=preset)
        return
    res = evaluate(seg, ref, preset=preset)
    assert res.scored, res.summary()
    for n in res.scored:
        assert res[n].dsc == pytest.approx(1.0), (n, res.summary())
        assert res[n].nsd == pytest.approx(1.0), (n, res.summary())
    scored, skipped = choose_classes(read_prediction(seg), ref, preset=preset)
    assert res.scored == scored and dict(res.skipped) == skipped
    assert set(scored).isdisjoint(skipped)
    if preset is not None:
        assert set(scored) <= set(evaluation.metrics.PRESETS[preset].classes)
        assert all(why == "not a flare23 class" for n, why in skipped.items() if n == "colon")
    elif convention not in (UNIVERSAL, FLARE23):
        annotated = set(taxonomy.dataset(convention).annotated)
        assert set(scored) == annotated & set(masks)


@pytest.mark.parametrize("convention", evaluation.conventions())
def test_ids_outside_a_convention_are_refused(phantom, convention):
    lab = np.zeros(phantom.volume.shape, np.int16)
    lab[0, 0, 0] = evaluation._max_id(convention) + 1
    with pytest.raises(InputError, match="are not"):
        read_reference(lab, convention, like=phantom.volume)


def test_flare23_preset_builds_the_lesion_from_the_tumour_classes_the_reference_annotates(phantom):
    masks = {n: np.asarray(m, bool) for n, m in phantom.masks.items()}
    ref = read_reference(_encode(masks, "msd_liver"), "msd_liver", like=phantom.volume)
    res = evaluate(SimpleNamespace(masks=masks, volume=phantom.volume), ref, preset="flare23")
    # the phantom's kidney and lung tumours are not counted as false lesions: MSD Liver annotates liver tumours only
    assert res.scored == ["liver", "lesion"] and res["lesion"].dsc == 1.0
    assert res.skipped["kidney tumor"] == res.skipped["lung tumor"] == NOT_ANNOTATED
    assert res.skipped["colon"] == "not a flare23 class" and res.skipped["spleen"] == NOT_ANNOTATED
    assert list(res.scores) == [
        "liver", "right kidney", "spleen", "pancreas", "aorta", "inferior vena cava", "right adrenal gland",
        "left adrenal gland", "gallbladder", "esophagus", "stomach", "duodenum", "left kidney", "lesion",
    ]  # fmt: skip
    assert res.evaluated == ["liver", "lesion"]


def test_flare_reference_puts_the_prediction_into_a_flare_label_map(phantom):
    """FLARE labels exclude lesion voxels from organs: the prediction's one-vs-all liver is compared the same way."""
    masks = {n: np.asarray(m, bool) for n, m in phantom.masks.items()}
    ref = read_reference(taxonomy.flare23_label_map(masks), FLARE23, like=phantom.volume)
    assert not (ref.masks["liver"] & masks["liver tumor"]).any()
    for preset in PRESETS:
        res = evaluate({"liver": masks["liver"], "liver tumor": masks["liver tumor"]}, ref, preset=preset)
        assert res.scored == ["liver", "lesion"] and res["liver"].dsc == 1.0
        assert res.skipped["spleen"] == NOT_SEGMENTED


# ------------------------------------------------------------------------------------------------ pieces
def test_choose_classes_reasons_and_requests():
    assert choose_classes(["liver", "colon"], ["liver", "spleen"]) == (
        ["liver"],
        {"spleen": NOT_SEGMENTED, "colon": NOT_ANNOTATED},
    )
    scored, skipped = choose_classes(
        ["liver", "liver tumor", "colon"], ["liver", "liver tumor"], preset="flare23"
    )
    assert scored == ["liver", "lesion"] and skipped == {"colon": "not a flare23 class"}
    scored, skipped = choose_classes(["liver"], ["liver", "spleen"], ["spleen", "Liver"])
    assert scored == ["liver"] and skipped == {"spleen": NOT_SEGMENTED}
    with pytest.raises(InputError, match="not flare23 classes"):
        choose_classes(["colon"], ["colon"], ["colon"], preset="flare23")


def test_conventions_names_labels_and_aliases():
    names = evaluation.conventions()
    assert names[:2] == [UNIVERSAL, FLARE23] and TS in names and names.count(FLARE23) == 1
    for n in names:
        assert evaluation.resolve_convention(evaluation.convention_label(n)) == n
    assert evaluation.resolve_convention("TotalSegmentator") == TS
    assert evaluation.resolve_convention("FLARE 2023") == FLARE23  # the taxonomy's flare23 dataset
    assert app_logic.gt_conventions() == [evaluation.convention_label(n) for n in names]
    with pytest.raises(InputError, match="unknown label convention"):
        evaluation.resolve_convention("totalseg v9")


def test_reference_folder_of_masks_and_annotated_override(phantom, tmp_path):
    liver = np.asarray(phantom.masks["liver"], bool)
    folder = _segment_folder(
        tmp_path / "ref", {"liver": liver, "spleen": np.zeros_like(liver)}, phantom.affine
    )
    ref = read_reference(folder)
    assert ref.annotated == ("liver", "spleen") and ref.spacing == pytest.approx((3.0, 3.0, 3.0))
    res = evaluate({"liver": liver, "spleen": liver}, ref)
    assert res["liver"].dsc == 1.0 and res["spleen"].dsc == 0.0  # an annotated empty class: a miss
    ref = read_reference(
        _encode({"liver": liver}, UNIVERSAL), like=phantom.volume, annotated=["liver", "spleen"]
    )
    assert evaluate({"spleen": liver}, ref)["spleen"].dsc == 0.0
    with pytest.raises(InputError, match="not on the reference's grid"):
        evaluate({"liver": liver[:-1]}, ref)
    with pytest.raises(InputError, match="need"):
        read_reference({"liver": liver})  # masks in memory: their grid (spacing) is needed


def test_result_table_and_json_state_what_was_skipped(phantom):
    masks = {n: np.asarray(m, bool) for n, m in phantom.masks.items()}
    ref = read_reference({"liver": masks["liver"], "spleen": masks["spleen"]}, like=phantom.volume)
    res = evaluate({"liver": masks["liver"], "colon": masks["colon"]}, ref)
    text = res.table()
    assert "scored (1): liver" in text and "skipped, not segmented (1): spleen" in text
    assert "skipped, not annotated by the reference (1): colon" in text
    data = res.to_dict()
    assert data["skipped"] == {"spleen": NOT_SEGMENTED, "colon": NOT_ANNOTATED}
    assert data["classes"]["colon"]["status"] == NOT_ANNOTATED and data["classes"]["colon"]["dsc"] is None
    json.dumps(data, allow_nan=False)
