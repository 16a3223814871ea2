"""`universal evaluate` options: a convention given for masks named by class is refused (one rule), --classes
that cannot be scored are named with the side that lacks them, --json is checked before scoring and written
whole. Small synthetic phantom; no test depends on speed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from universal import evaluation, taxonomy
from universal.cli import EXIT_USAGE, main
from universal.errors import InputError
from universal.evaluation import evaluate, read_prediction, read_reference
from universal.phantom import make_phantom


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A phantom, PRED = a segment-style folder (liver, spleen, pancreas), GT = a folder (liver, spleen) and a
    universal-id label map of the same two classes."""
    ph = make_phantom((32, 32, 24), spacing=(5.0, 5.0, 5.0), seed=0)
    d = tmp_path_factory.mktemp("evaluate_options")
    affine = ph.volume.affine
    masks = {n: np.asarray(ph.masks[n], bool) for n in ("liver", "spleen", "pancreas")}
    pred = _folder(d / "pred", masks, affine)
    gt = _folder(d / "gt", {n: masks[n] for n in ("liver", "spleen")}, affine)
    label = taxonomy.masks_to_label_map({n: masks[n] for n in ("liver", "spleen")})
    gt_map = d / "gt.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(label, np.int16), affine), gt_map)
    return SimpleNamespace(ph=ph, masks=masks, pred=pred, gt=gt, gt_map=gt_map)


def _folder(root: Path, masks: dict[str, np.ndarray], affine: np.ndarray) -> Path:
    (root / "masks").mkdir(parents=True)
    for name, m in masks.items():
        nib.save(
            nib.Nifti1Image(m.astype(np.uint8), affine), root / "masks" / f"{name.replace(' ', '_')}.nii.gz"
        )
    return root


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    rc = main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------ BUG 9
@pytest.mark.parametrize("convention", ["flare23", "totalsegmentator_v2"])
def test_a_convention_for_masks_named_by_class_is_refused_everywhere(case, convention):
    with pytest.raises(InputError, match="GT .* is a folder of masks named by class.*leave --gt-dataset out"):
        read_reference(case.gt, convention)
    with pytest.raises(InputError, match="PRED .* is a folder of masks.*leave --pred-dataset out"):
        read_prediction(case.pred, convention)
    with pytest.raises(InputError, match="the reference masks are named by class"):
        read_reference(dict(case.masks), convention, like=case.ph.volume)
    seg = SimpleNamespace(masks=case.masks, volume=case.ph.volume)  # a Segmentation
    with pytest.raises(InputError, match=r"prediction_convention=.*the prediction masks are named by class"):
        evaluate(seg, case.gt, prediction_convention=convention)


def test_the_default_universal_is_accepted_for_masks_and_a_label_map_takes_a_convention(case, capsys):
    plain = evaluate(case.pred, case.gt)
    assert plain.scored == ["spleen", "liver"] and plain.mean()["dsc"] == 1.0
    assert evaluate(case.pred, case.gt, convention="universal", prediction_convention="universal").scored == (
        plain.scored
    )
    # for a label map the convention changes the reading: universal ids 1 (spleen) and 6 (liver) read as FLARE
    # ids are FLARE's liver (1) and inferior vena cava (6)
    flare = read_reference(case.gt_map, "flare23")
    assert flare.masks["liver"].sum() == case.masks["spleen"].sum()
    assert flare.masks["inferior vena cava"].sum() == case.masks["liver"].sum()
    rc, _, err = _cli(capsys, case.pred, case.gt, "--gt-dataset", "universal")
    assert rc == 0 and err == ""


def test_a_convention_for_a_reference_already_read_is_refused(case):
    ref = read_reference(case.gt)
    with pytest.raises(InputError, match="the reference was read already"):
        evaluate(case.pred, ref, convention="flare23")
    assert evaluate(case.pred, ref).scored == ["spleen", "liver"]


def test_cli_refuses_a_convention_for_a_mask_folder_with_one_line(case, capsys):
    for option in ("--gt-dataset", "--pred-dataset"):
        rc, out, err = _cli(capsys, case.pred, case.gt, option, "flare23")
        assert rc == EXIT_USAGE and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1 and f"leave {option} out" in err, err


# ------------------------------------------------------------------------------------------------ BUG 10
def test_requested_classes_not_annotated_say_so_and_name_what_could_be_scored(case):
    with pytest.raises(InputError) as err:
        evaluate(case.pred, case.gt, classes=["pancreas"])
    message = str(err.value)
    assert "the classes asked for (--classes pancreas) are not annotated by GT gt" in message
    assert "(it annotates liver, spleen)" in message or "(it annotates spleen, liver)" in message
    assert "ask for classes both have (" in message and "both segmented and annotated" not in message


def test_requested_classes_missing_on_both_sides_name_each_side(case):
    with pytest.raises(InputError) as err:
        evaluate(case.pred, case.gt, classes=["pancreas", "colon", "right kidney"])
    message = str(err.value)
    assert "--classes pancreas colon 'right kidney'" in message
    assert "cannot be scored: pancreas not annotated by GT gt" in message  # in the order asked for
    assert "; colon, right kidney not segmented in PRED pred (it has liver, pancreas, spleen)" in message


def test_requested_classes_on_the_cli_one_line_exit_2(case, capsys):
    rc, out, err = _cli(capsys, case.pred, case.gt, "--classes", "colon")
    assert rc == EXIT_USAGE and out == "" and err.count("\n") == 1
    assert "the classes asked for (--classes colon) are not segmented in PRED" in err
    # without --classes the old message (what each side has) still applies
    with pytest.raises(InputError, match="no class is both segmented"):
        evaluate({"colon": case.masks["liver"]}, case.gt)


# ------------------------------------------------------------------------------------------------ --json
def test_json_folder_is_checked_before_scoring(case, capsys, monkeypatch, tmp_path):
    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before --json was checked")

    monkeypatch.setattr(evaluation, "evaluate", no_scoring)
    rc, out, err = _cli(capsys, case.pred, case.gt, "--json", tmp_path / "missing" / "m.json")
    assert rc == EXIT_USAGE and out == "" and err.count("\n") == 1
    assert "does not exist: create" in err and str(tmp_path / "missing") in err
    rc, out, err = _cli(capsys, case.pred, case.gt, "--json", tmp_path)
    assert rc == EXIT_USAGE and out == "" and "is a folder: give a file name" in err
    assert not (tmp_path / "missing").exists()


def test_json_is_written_whole_or_not_at_all(case, capsys, monkeypatch, tmp_path):
    js = tmp_path / "m.json"
    rc, out, _ = _cli(capsys, case.pred, case.gt, "--json", js)
    assert rc == 0 and f"wrote {js}" in out
    data = json.loads(js.read_text())
    assert data["scored"] == ["spleen", "liver"] and data["skipped"] == {"pancreas": "not annotated"}
    before = js.read_text()

    def fail_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("universal.io.os.replace", fail_replace)
    with pytest.raises(OSError):
        evaluate(case.pred, case.gt, classes=["liver"]).write_json(js)
    assert js.read_text() == before  # the old file is kept whole
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind
