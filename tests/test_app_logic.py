"""universal.app_logic: samples, ground truth conventions, evaluation rules, comparisons, models, session folders."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from universal import app_logic as al
from universal import dashboard as dash
from universal.app_state import (
    CompareRecord,
    DashboardState,
    EvaluationRecord,
    GroundTruthRecord,
    InputRecord,
    MeshRecord,
    RunRecord,
    RunSettings,
)
from universal.errors import CheckpointError, InputError
from universal.io import volume_from_array


def _seg(masks, volumes=None):
    volumes = volumes or {n: float(m.sum()) for n, m in masks.items()}
    return SimpleNamespace(masks=masks, volumes_ml=volumes, timings={"total": 1.0}, info={"fast": True})


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# ------------------------------------------------------------------------------------------------ samples
def test_only_the_phantom_without_a_data_folder(tmp_path):
    assert [s.key for s in al.list_samples(data_dir=None)] == ["phantom"]
    assert [s.key for s in al.list_samples(data_dir=tmp_path)] == ["phantom"]  # a folder without samples


def test_real_samples_come_from_the_configured_data_folder(tmp_path):
    data = tmp_path / "anywhere" / "samples"  # no ../shared: any folder holding the samples' folders
    (data / "ts_abdomen_3mm").mkdir(parents=True)
    (data / "ts_abdomen_3mm" / "ct.nii.gz").write_bytes(b"x")
    samples = al.list_samples(data_dir=data)
    assert [s.key for s in samples] == ["phantom", "ts_abdomen_3mm"]
    assert samples[1].ct == data / "ts_abdomen_3mm" / "ct.nii.gz"
    assert samples[1].gt is None  # no labels next to it: no reference
    (data / "ts_abdomen_3mm" / "labels_totalseg.nii.gz").write_bytes(b"x")
    assert al.list_samples(data_dir=data)[1].gt_dataset == "totalsegmentator_v2"


def test_dashboard_config_from_the_environment_or_the_repository_layout(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    assert al.DashboardConfig.from_env(project, environ={}) == al.DashboardConfig(None, None)
    (project / "app.py").write_text("")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    layout = al.DashboardConfig.from_env(project, environ={})  # the repository layout: one default
    assert layout.app == (project / "app.py").resolve()
    assert layout.data_dir == (tmp_path / "shared" / "data").resolve()
    env = {al.DATA_DIR_ENV: str(tmp_path / "elsewhere"), al.APP_ENV: str(tmp_path / "my_app.py")}
    with pytest.warns(UserWarning, match="elsewhere.*does not exist"):  # a configured folder that is missing
        assert al.DashboardConfig.from_env(project, environ=env).data_dir is None  # is said, never ignored
    (tmp_path / "elsewhere").mkdir()
    configured = al.DashboardConfig.from_env(project, environ=env)  # configuration wins over the layout
    assert configured.data_dir == (tmp_path / "elsewhere").resolve() and configured.app == tmp_path / "my_app.py"
    monkeypatch.chdir(project)  # without a project root: the current folder
    assert al.DashboardConfig.from_env(environ={}).app == (project / "app.py").resolve()


def test_the_package_does_not_assume_the_repository_layout():
    import inspect

    from universal import app_state, dashboard

    for module in (al, app_state, dashboard):
        source = inspect.getsource(module)
        assert "__file__" not in source and "parents[" not in source, module.__name__


def test_load_phantom_sample():
    data = al.load_sample("phantom")
    assert data.volume.shape == (128, 128, 96)
    assert data.volume.spacing == pytest.approx((1.5, 1.5, 1.5))
    assert "liver" in data.classes and set(data.annotated) == set(data.gt_masks)
    assert all(m.shape == data.volume.shape and m.dtype == bool for m in data.gt_masks.values())
    with pytest.raises(InputError):
        al.load_sample("nope")


def test_load_real_sample_with_totalsegmentator_reference(shared_data):
    data = al.load_sample("ts_abdomen_3mm", data_dir=shared_data)
    assert data.volume.shape == (122, 101, 30)
    assert {"liver", "spleen", "right kidney", "left kidney"} <= set(data.classes)
    assert "liver tumor" not in data.annotated  # TotalSegmentator does not annotate liver tumours
    liver, spleen = data.gt_masks["liver"], data.gt_masks["spleen"]
    # RAS+: the liver (patient's right) lies at larger x than the spleen
    assert np.argwhere(liver)[:, 0].mean() > np.argwhere(spleen)[:, 0].mean()


def test_held_out_dicom_sample_with_reference(shared_data):
    keys = [s.key for s in al.list_samples(data_dir=shared_data)]
    assert keys == ["phantom", "ts_abdomen_3mm", "ts_dicom_series"]
    data = al.load_sample("ts_dicom_series", data_dir=shared_data)
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


# ------------------------------------------------------------------------------------------------ session state
def _settings(**changes):
    base = dict(weights=al.WeightsChoice("demo"), device="cpu", classes=("liver",), fast=True)
    return RunSettings(**{**base, **changes})


def _run(seg=None, **changes):
    seg = seg or _seg({"liver": np.ones((4, 4, 4), bool)})
    return RunRecord(seg, "sample:phantom", _settings(**changes))


@pytest.fixture
def state():
    s = DashboardState()
    yield s
    s.folder.close()


def test_state_is_created_once_per_session_and_reopens_its_folder():
    store: dict = {}
    s = DashboardState.of(store)
    try:
        assert DashboardState.of(store) is s and store["state"] is s
        s.folder.close()
        assert not DashboardState.of(store).folder.closed  # a removed folder is replaced
    finally:
        s.folder.close()


def test_a_new_run_clears_what_came_from_the_previous_one(state):
    first = _run()
    state.set_run(first)
    state.set_compare(CompareRecord(first.id, seg=None, table=None))
    state.evaluation = EvaluationRecord((first.id, "gt", None), result="scores")
    state.mesh = MeshRecord((first.id, "segmentation", ("liver",), 60_000), fig=None)
    state.gt = GroundTruthRecord("sample:phantom")
    assert state.current_compare() is not None and state.current_scores() == "scores"
    assert state.n_segment_runs == 2  # run A and run B
    second = _run()
    state.set_run(second)
    assert state.run is second and state.n_segment_runs == 3
    assert state.current_compare() is None and state.evaluation is None and state.mesh is None
    assert state.gt is not None  # the reference belongs to the input, not to the run


def test_a_new_input_clears_the_run_the_reference_and_the_view(state):
    state.set_run(_run())
    state.gt = GroundTruthRecord("sample:phantom")
    state.view_defaults["viewer"] = {"axial": 3}
    state.set_input(InputRecord(id="path:/x.nii.gz"))
    assert state.input.id == "path:/x.nii.gz"
    assert state.run is None and state.gt is None and not state.view_defaults
    assert state.current_downloads() is None


def test_derived_records_are_only_returned_for_their_run(state):
    run = _run()
    state.set_run(run)
    state.compare = CompareRecord("another run", seg=None, table=None)
    state.evaluation = EvaluationRecord(("another run", "gt", None), result="old")
    assert state.current_compare() is None and state.current_scores() is None
    assert state.evaluation_for(("another run", "gt", None)) is not None
    assert state.evaluation_for((run.id, "gt", None)) is None
    key = (run.id, "segmentation", ("liver",), 60_000)
    state.mesh = MeshRecord(key, fig="figure")
    assert state.mesh_for(key).fig == "figure" and state.mesh_for((*key[:3], 20_000)) is None


def test_download_files_are_written_once_per_run(state):
    state.set_run(_run())
    calls = []

    def write(seg):
        calls.append(seg)
        return {"labels.nii.gz": b"L"}

    record = state.current_downloads()
    assert record.files_of(state.run.seg, write) == {"labels.nii.gz": b"L"}
    assert state.current_downloads().files_of(state.run.seg, write) == {"labels.nii.gz": b"L"}
    assert len(calls) == 1
    state.set_run(_run())
    assert state.current_downloads() is not record and state.current_downloads().files is None


def test_changed_settings_are_noticed_but_keep_the_result(state):
    state.set_run(_run())
    assert not state.settings_changed(_settings())
    assert state.settings_changed(_settings(fast=False))
    assert state.run is not None
    assert any(kind == "caption" for kind, _, _ in dash.run_messages(state, _settings(classes=("spleen",))))


# ------------------------------------------------------------------------------------------------ dashboard actions
class _Upload(SimpleNamespace):
    def getvalue(self):
        return self.data


def test_input_refs_name_their_input(tmp_path):
    f = tmp_path / "ct.nii.gz"
    f.write_bytes(b"x")
    assert dash.InputRef("sample", "phantom").id == "sample:phantom"
    assert dash.InputRef("path", str(f)).id.startswith(f"path:{f.resolve()}:")
    assert dash.InputRef("path", str(tmp_path / "nope")).id == f"path:{tmp_path / 'nope'}"
    up = _Upload(file_id="abc", name="ct.nii.gz", size=3, data=b"abc")
    assert dash.InputRef("upload", up).id == "upload:abc:ct.nii.gz:3"


def test_load_input_reads_a_sample_and_turns_errors_into_messages(state, tmp_path):
    phantom = al.SampleData(al.PHANTOM, volume=_vol(), gt_masks={"liver": np.ones((12, 10, 8), bool)})
    rec = dash.load_input(dash.InputRef("sample", "phantom"), state.folder, 512, lambda key: phantom)
    assert rec.id == "sample:phantom" and rec.volume is phantom.volume and rec.error is None
    assert "phantom truth" in rec.gt_label
    missing = dash.load_input(dash.InputRef("path", str(tmp_path / "nope.nii.gz")), state.folder, 512, None)
    assert missing.volume is None and "does not exist" in missing.error
    big = _Upload(file_id="1", name="ct.nii.gz", size=10 * 1024**2, data=b"")
    assert "upload limit" in dash.load_input(dash.InputRef("upload", big), state.folder, 5, None).error
    assert dash.load_input(None, state.folder, 512, None) == InputRecord()
    assert dash.input_messages(missing)[0][0] == "error"
    assert dash.input_messages(rec)[-1][0] == "caption"  # the CT's size line


def test_segment_runs_a_predictor_derived_with_the_run_settings():
    calls = {}

    class Base:
        model = SimpleNamespace(class_names=["liver", "spleen"])

        def with_settings(self, **changes):
            calls.update(changes)
            return SimpleNamespace(
                predict=lambda volume, progress=None: _seg({"liver": np.ones((2, 2, 2), bool)})
            )

    settings = _settings(classes=("Liver", "liver tumor"), template="A photo of a {}")
    run = dash.segment(Base(), volume="ct", settings=settings, input_id="sample:phantom", model_seconds=1.5)
    assert calls == {"classes": ("liver",), "fast": True, "template": "A photo of a {}", "precision": None}
    assert run.skipped == ["liver tumor"] and run.model_seconds == 1.5 and run.settings is settings
    with pytest.raises(InputError, match="none of the chosen classes"):
        dash.segment(Base(), "ct", _settings(classes=("liver tumor",)), None)


def test_fast_with_a_3mm_model_is_said_and_the_summary_states_the_grid_it_ran_on(state):
    """The built-in model works at 3 mm: fast changes nothing, the run's messages say so, and the summary says
    "standard (3 mm)" (it said "standard (1.5 mm)" whatever the model)."""
    import universal

    base = universal.Predictor("builtin", device="cpu", patch_size=(32, 32, 32))
    volume = universal.make_phantom((40, 40, 32), spacing=(4.0, 4.0, 4.0), seed=0).volume
    run = dash.segment(base, volume, _settings(classes=("liver",), fast=True), "sample:phantom")
    assert run.notes and "fast changes nothing for builtin" in run.notes[0] and "3 mm" in run.notes[0]
    state.set_run(run)
    messages = dash.run_messages(state, run.settings)
    assert ("info", run.notes[0], {}) in messages
    summary = next(text for kind, text, _ in messages if kind == "success")
    assert "standard (3 mm)" in summary and "1.5" not in summary
    plain = dash.segment(base, volume, _settings(classes=("liver",), fast=False), "sample:phantom")
    assert plain.notes == [] and "standard (3 mm)" in dash.run_summary(plain)


def test_base_predictor_is_shared_by_the_runs_it_derives():
    from universal.predictor import Predictor

    base = al.base_predictor(al.WeightsChoice(al.DEMO_MODEL, encoder="onehot"), "cpu")
    assert isinstance(base, Predictor) and len(base.classes) == 32
    run = base.with_settings(classes=("liver", "spleen"), fast=True)
    assert run.model is base.model  # the same weights: nothing reloaded or copied
    assert run.classes == ["liver", "spleen"] and run.resolved.fast


def test_stage_progress_drives_one_bar_per_stage():
    bars: dict[str, list] = {}

    class Bar:
        def __init__(self, stage):
            self.stage = stage
            bars[stage] = []

        def progress(self, value, text=""):
            bars[self.stage].append((round(value, 3), text))

    progress = dash.StageProgress(Bar)
    progress("preprocess", 0.05)
    progress("inference", 0.475)  # half of the inference stage (0.1 .. 0.85)
    progress("done", 1.0)
    assert bars["preprocess"][-1] == (1.0, "preprocess ✓")
    assert bars["inference"][0] == (0.5, "inference — 50%") and bars["inference"][-1][0] == 1.0
    assert "done" not in bars


def test_warm_up_builds_the_default_predictor_once(monkeypatch):
    monkeypatch.setattr(al, "model_choices", lambda: [al.ModelChoice(al.DEMO_MODEL, "demo")])
    built = []

    def build(weights, device):
        built.append((weights, device))
        return "predictor"

    warm = dash.WarmUp(build=build)
    warm.page_drawn.set()
    assert warm.take(al.WeightsChoice(al.DEMO_MODEL), "auto") == "predictor"
    assert warm.take(al.WeightsChoice(al.DEMO_MODEL), "cpu") is None
    assert warm.take(al.WeightsChoice("builtin"), "auto") is None
    assert built == [(al.WeightsChoice(al.DEMO_MODEL), "auto")]


def test_ground_truth_is_loaded_once_and_errors_are_kept(state, tmp_path):
    masks = {"liver": np.ones((12, 10, 8), bool)}
    state.set_input(InputRecord(id="sample:phantom", volume=_vol(), gt_masks=masks, annotated=["liver"]))
    gt = dash.ground_truth(state, dash.GroundTruthRef("sample", "sample:phantom"), 512)
    assert gt.id == "sample:sample:phantom" and gt.error is None
    assert gt.reference.annotated == ("liver",) and gt.reference.masks["liver"].all()
    assert dash.ground_truth(state, dash.GroundTruthRef("sample", "sample:phantom"), 512) is gt
    bad = dash.ground_truth(
        state, dash.GroundTruthRef("path", str(tmp_path / "no.nii.gz"), "universal ids"), 512
    )
    assert bad.error and bad is state.gt
    assert dash.kept_upload(state) is None  # only a loaded upload is kept
    state.gt = GroundTruthRecord("upload:1:universal ids (1-32)", name="lab.nii.gz")
    assert dash.kept_upload(state).name == "lab.nii.gz"
    assert dash.GroundTruthRef("kept", state.gt.id).id == state.gt.id


def test_evaluation_is_computed_once_per_run_reference_and_rules(state):
    shape = (12, 10, 8)
    liver = _box(shape, (2, 2, 2), (8, 8, 6))
    state.set_input(InputRecord(id="x", volume=_vol(shape), gt_masks={"liver": liver}, annotated=["liver"]))
    state.set_run(_run(_seg({"liver": liver})))
    gt = dash.ground_truth(state, dash.GroundTruthRef("sample", "x"), 512)
    ev = dash.evaluation(state, gt, None)
    assert ev.error is None and ev.result["liver"].dsc == 1.0
    assert dash.evaluation(state, gt, None) is ev
    assert dash.score_summary(ev.result) == [
        ("Mean DSC", "1.000"),
        ("Mean NSD", "1.000"),
        ("Classes scored", "1 / 1"),
    ]
    assert "not annotated" in dash.evaluation_caption(ev)
    assert list(dash.metrics_table(ev.result)["class"]) == ["liver"]
    rules = dash.evaluation_rules()
    assert list(rules.values()) == ["flare23", None] and list(rules)[0].startswith("FLARE 2023")
    assert dash.evaluation(state, gt, "flare23") is not ev


def test_choices_come_from_the_library():
    from universal.predictor import DEVICE_CHOICES
    from universal.prompts import TEMPLATES
    from universal.spec import PRECISIONS
    from universal.taxonomy import CLASSES

    assert dash.template_options() == [*TEMPLATES, dash.CUSTOM]
    assert dash.template_of("photo") == TEMPLATES["photo"] and dash.template_of(dash.CUSTOM, "x {}") == "x {}"
    assert dash.precision_options() == [dash.MODEL_OWN, *PRECISIONS]
    assert dash.precision_of(dash.MODEL_OWN) is None and dash.precision_of("bfloat16") == "bfloat16"
    devices = al.available_devices()
    assert devices[:2] == ["auto", "cpu"] and set(devices) <= set(DEVICE_CHOICES)
    assert sorted(dash.class_options()) == sorted(c.name for c in CLASSES)
    groups = dash.class_groups(["spleen", "not a class"])
    assert groups["this scan's reference classes"] == ["spleen"]
    assert dash.initial_classes(InputRecord()) == list(dash.COMMON_CLASSES)
    assert dash.encoder_options("model's own") == ["model's own", *al.ENCODER_KEYWORDS, dash.CUSTOM]


def test_model_selector_labels_and_notes():
    choices = {
        "builtin": al.ModelChoice("builtin", "built-in", False, "builtin.pt is missing"),
        al.DEMO_MODEL: al.ModelChoice(al.DEMO_MODEL, "demo"),
    }
    assert al.choice_label(choices, "builtin") == "built-in — unavailable"
    assert al.choice_label(choices, al.CHECKPOINT).startswith("a local checkpoint")
    kinds = [kind for kind, _, _ in al.model_notes(choices, "builtin")]
    assert kinds == ["warning", "caption"]
    assert [kind for kind, _, _ in al.model_notes(choices, al.DEMO_MODEL)] == ["caption", "info"]
    assert not al.WeightsChoice(al.CHECKPOINT).ready and al.WeightsChoice(al.CHECKPOINT, "m.pt").ready


def test_view_helpers():
    shape = (10, 10, 10)
    assert dash.mask_centres({"liver": _box(shape, (2, 4, 6), (5, 7, 9))}) == {
        "axial": 7,
        "coronal": 5,
        "sagittal": 3,
    }
    assert dash.mask_centres({"liver": np.zeros(shape, bool)}) == {}
    assert "liver" in dash.legend_html(["liver"])
    assert dash.slice_caption("coronal", 4).startswith("coronal slice 4 ")
    assert dash.window_label("bone").startswith("bone (")
