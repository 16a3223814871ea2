"""Regression tests from an audit of accepted options (2026-12-02; house rule: every accepted option changes
behaviour, nothing answered wrongly in silence). Each failed before its fix and names the bug it shows in a
comment. Tiny random-weights model on small phantoms; no test depends on speed."""

from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path

import pytest
from badinput import tiny_checkpoint

import universal
from universal import cli, evaluation
from universal.batch import BatchRunner, BatchSettings, collect_cases, plan_batch, resume_key
from universal.errors import InputError, InputWarning
from universal.io import save_volume
from universal.postprocess import PostprocessConfig
from universal.predictor import Predictor, clear_model_cache
from universal.preprocess import PreprocessConfig

CLASSES = ["liver", "spleen", "right kidney"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    ph = universal.make_phantom((40, 40, 32), spacing=(4.0, 4.0, 4.0), seed=0)
    save_volume(ph.volume, d / "case0.nii.gz")
    return {"dir": d, "ct": d / "case0.nii.gz", "weights": tiny_checkpoint(d / "tiny.pt", CLASSES)}


def _predictor(data, **kw):
    return Predictor(str(data["weights"]), device="cpu", postprocess=kw.pop("postprocess", False), **kw)


def _run(predictor, inputs, out, **settings):
    plan = plan_batch([str(i) for i in inputs], out, BatchSettings(**settings))
    return BatchRunner(predictor, plan, echo=lambda line, error=False: None).run()


# BUG 1 (resume ignores --series): the report does not record the series read, and RESUME_KEYS do not compare
# it, so `segment dcm/ -o out --series 2` then `--series 3` skips the case and keeps series 2's masks.
def test_resume_redoes_a_case_read_from_another_series(data, tmp_path):
    from test_dicom_inputs import two_series

    dicom = two_series(tmp_path / "dcm")
    out = tmp_path / "o"
    p = _predictor(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)  # the 6-slice series is thin
        first = _run(p, [dicom], out, series="2")
        second = _run(p, [dicom], out, series="3")
    assert [r.status for r in first.records] == ["ok"]
    assert [r.status for r in second.records] == ["ok"], "a case made from series 2 was kept for --series 3"


# BUG 1b (resume ignores --precision): precision changes the masks but is not a resume key, so a rerun with
# `--precision float32` after a bfloat16 run reports "skipped: complete" and keeps the bfloat16 result.
def test_resume_redoes_a_case_made_with_another_precision(data, tmp_path):
    out = tmp_path / "o"
    _run(_predictor(data, precision="bfloat16"), [data["ct"]], out)
    result = _run(_predictor(data, precision="float32"), [data["ct"]], out)
    assert [r.status for r in result.records] == ["ok"]
    assert json.loads((out / "case0" / "report.json").read_text())["precision"] == "float32"


# BUG 1c (resume/report ignore the post-processing rules): describe()["postprocess"] is a bool, so a
# PostprocessConfig with other rules (or enabled=False) resumes onto a result made with the default rules, and
# the report of PostprocessConfig(enabled=False) says postprocess: true.
def test_postprocessing_rules_are_told_apart(data):
    default = _predictor(data, postprocess=True)
    other = _predictor(data, postprocess=PostprocessConfig(min_component_mm3=1e6))
    off = _predictor(data, postprocess=PostprocessConfig(enabled=False))
    assert resume_key(other) != resume_key(default)
    assert off.describe()["postprocess"] is False


# BUG 1d (resume ignores the weights' content): the resume key holds the --weights label (a path), so a checkpoint
# replaced at the same path (retrained, fine-tuned with -o model.pt) resumes onto the old model's results.
def test_resume_redoes_a_case_made_with_other_weights_at_the_same_path(data, tmp_path):
    import torch

    out, weights = tmp_path / "o", tmp_path / "model.pt"
    weights.write_bytes(data["weights"].read_bytes())
    _run(Predictor(str(weights), device="cpu", postprocess=False), [data["ct"]], out)
    clear_model_cache()
    torch.manual_seed(123)
    tiny_checkpoint(weights, CLASSES)  # other random weights, same path
    result = _run(Predictor(str(weights), device="cpu", postprocess=False), [data["ct"]], out)
    clear_model_cache()
    assert [r.status for r in result.records] == ["ok"]


# BUG 2 (--fast silently a no-op): the shipped builtin model works at 3 mm, the fast spacing, so --fast changes
# nothing, yet it is accepted without a word and every report says "fast": true.
def test_fast_changes_the_run_or_says_it_does_not():
    normal = Predictor("builtin", device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = Predictor("builtin", device="cpu", fast=True)
    changed = fast.resolved.preprocessing != normal.resolved.preprocessing
    said = any(issubclass(w.category, InputWarning) and "fast" in str(w.message) for w in caught)
    assert changed or (said and fast.describe()["fast"] is False)


# BUG 3 (an accepted setting ignored in the API): PredictorSettings(fast=True, preprocessing=...) is accepted,
# fast is dropped, and the report says "fast": true for a run at the given spacing.
def test_fast_with_explicit_preprocessing_is_refused_or_not_claimed(data):
    try:
        p = _predictor(data, fast=True, preprocessing=PreprocessConfig(spacing_mm=6.0))
    except InputError:
        return
    assert p.describe()["fast"] is False


# BUG 4 (incomplete case counted complete): outputs.files lists the folder "masks", not the mask files, so a
# case folder that lost a mask file is "complete", skipped, and stays without that class's mask.
def test_a_case_folder_missing_a_mask_file_is_redone(data, tmp_path):
    out = tmp_path / "o"
    p = _predictor(data)
    _run(p, [data["ct"]], out)
    (out / "case0" / "masks" / "spleen.nii.gz").unlink()
    result = _run(p, [data["ct"]], out)
    assert [r.status for r in result.records] == ["ok"]
    assert (out / "case0" / "masks" / "spleen.nii.gz").is_file()


# BUG 5 (a DICOM folder silently reduced to a stray file): a DICOM series folder that also holds one CT-extension
# file (a preview .nii.gz, an export .zip) becomes a "folder of CTs" of that file only; the series is dropped
# without a word (Predictor.predict(folder) reads the series).
def test_a_dicom_folder_with_a_stray_ct_file_is_not_reduced_to_it(tmp_path):
    folder = tmp_path / "patient"
    folder.mkdir()
    for i in range(3):
        (folder / f"IM{i:04d}.dcm").write_bytes(b"\0" * 128 + b"DICM")
    (folder / "preview.nii.gz").write_bytes(b"x")
    try:
        cases, _ = collect_cases([str(folder)])
    except InputError:
        return
    assert any(Path(c.source) == folder for c in cases), [c.source for c in cases]


# BUG 6 (--series accepted and ignored): with no DICOM input, --series is ignored in silence (the same for
# Predictor.predict(nifti, series=...)); --format dicom-seg is refused in that situation.
def test_series_without_a_dicom_input_is_refused(data, tmp_path):
    with pytest.raises(InputError, match="series"):
        plan_batch([str(data["ct"])], tmp_path / "o", BatchSettings(series="3"))


# BUG 7 (half a batch, a wrong exit code): a case named like the summary (summary.csv.nii.gz in a folder) is
# written to OUTDIR/summary.csv/, then the summary write fails ("error: Is a directory", exit 2, no summary)
# although every case succeeded; plan_batch only checks folders that exist before the run.
def test_a_case_named_like_the_summary_is_caught_before_the_run(data, tmp_path):
    cts = tmp_path / "cts"
    cts.mkdir()
    (cts / "summary.csv.nii.gz").write_bytes(data["ct"].read_bytes())
    (cts / "b.nii.gz").write_bytes(data["ct"].read_bytes())
    try:
        plan = plan_batch([str(cts)], tmp_path / "o", BatchSettings())
    except InputError:
        return
    summary_files = {f"{plan.summary}.csv", f"{plan.summary}.json"}
    assert not {str(plan.case_dir(c)) for c in plan.cases} & summary_files


# BUG 8 (names equal under Unicode normalisation): "café" written NFC and NFD are different names here, but one
# folder on macOS (APFS/HFS+), where the second case then replaces the first in silence.
def test_names_equal_under_unicode_normalisation_are_told_apart(data, tmp_path):
    cts = tmp_path / "u"
    cts.mkdir()
    for name in ("caf\u00e9", "cafe\u0301"):
        (cts / f"{name}.nii.gz").write_bytes(data["ct"].read_bytes())
    cases, _ = collect_cases([str(cts)])
    keys = {unicodedata.normalize("NFC", c.name).casefold() for c in cases}
    assert len(keys) == len(cases), [ascii(c.name) for c in cases]


# BUG 9 (evaluate: an accepted option ignored): --gt-dataset flare23 (and --pred-dataset anything that is not
# refused) given for a folder of masks is accepted and changes nothing; a dataset convention is refused there.
# fixed: evaluation._refuse_convention_for_masks is the one rule (any convention but the default universal is
# refused for masks named by class: a folder, masks by name, a Segmentation), one line naming the option.
def test_evaluate_refuses_a_label_convention_for_a_mask_folder(data, tmp_path, capsys):
    out = tmp_path / "o"
    _run(_predictor(data), [data["ct"]], out)
    case = out / "case0"
    for option in ("--gt-dataset", "--pred-dataset"):
        assert cli.main(["evaluate", str(case), str(case), option, "flare23"]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "folder of masks named by class" in err and f"leave {option} out" in err


# BUG 10 (evaluate: a wrong message): with --classes naming a class that was not segmented, the error says no
# class is "both segmented and annotated" while listing the same classes on both sides; --classes is the cause.
# fixed: evaluation._nothing_requested names the classes asked for and the side that lacks each.
def test_evaluate_says_that_the_requested_classes_are_the_problem(data, tmp_path):
    out = tmp_path / "o"
    _run(_predictor(data), [data["ct"]], out)
    case = out / "case0"
    with pytest.raises(InputError) as err:
        evaluation.evaluate(case, case, classes=["pancreas"])
    message = str(err.value)
    assert "the classes asked for (--classes pancreas) are not segmented in PRED case0" in message
    assert "both segmented and annotated" not in message
