"""The Correct tab's actions without Streamlit (universal.correct_session): canvas paths and clicks land on the
right voxels, edits update the run's Segmentation (masks, volumes) and drop derived records, undo/redo, saving,
the weights to fine-tune, the fine-tuned models offered in the Model box, the job's messages."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from universal import correct_session as fix
from universal import edit
from universal.app_logic import CHECKPOINT, DEMO_MODEL, WeightsChoice
from universal.app_state import DashboardState, RunRecord, RunSettings
from universal.errors import InputError
from universal.io import volume_from_array


@pytest.fixture
def state():
    hu = np.full((10, 8, 6), -1000.0, np.float32)
    hu[2:6, 2:6, 1:5] = 50.0
    volume = volume_from_array(hu, spacing=(2.0, 2.0, 2.0), check=False, name="ct")
    liver = np.zeros(hu.shape, bool)
    liver[2:6, 2:6, 1:5] = True
    seg = SimpleNamespace(masks={"liver": liver}, volume=volume, volumes_ml={"liver": 64 * 0.008}, mean_hu={})
    s = DashboardState()
    s.run = RunRecord(seg, "ct", RunSettings(WeightsChoice("builtin"), "cpu", ("liver",), True))
    s.mesh = s.evaluation = s.downloads = object()
    yield s
    s.folder.close()


def test_canvas_paths_are_row_col_points_with_half_the_width_as_radius():
    drawing = {
        "objects": [
            {
                "type": "path",
                "strokeWidth": 10,
                "path": [["M", 3.0, 4.0], ["Q", 5, 6, 7.0, 8.0], ["L", 9.0, 10.0]],
            },
            {"type": "rect", "left": 1, "top": 1},
        ]
    }
    assert fix.canvas_strokes(drawing) == [([(4.0, 3.0), (8.0, 7.0), (10.0, 9.0)], 5.0)]
    assert fix.canvas_strokes(None) == [] and fix.canvas_strokes({"objects": []}) == []


def test_a_click_on_a_shrunk_image_maps_to_image_pixels():
    assert fix.click_point({"x": 9, "y": 4, "width": 50, "height": 25}, (50, 100)) == (9.0, 19.0)
    assert fix.click_point(None, (5, 5)) is None


def test_edits_update_the_runs_masks_volumes_and_drop_derived_records(state):
    seg, original = state.run.seg, state.run.seg.masks["liver"]
    # axial slice 2, display 4× enlarged: a dab at display (2, 2) is slice pixel (0, 0) = voxel (9, 7, 2)
    n = fix.apply_strokes(state, "liver", "axial", 2, [([(2.0, 2.0)], 1.0)], "brush", (32, 40))
    assert n == 1 and seg.masks["liver"][9, 7, 2] and not original[9, 7, 2]  # the run's array was copied
    assert seg.volumes_ml["liver"] == pytest.approx(65 * 0.008)
    assert seg.mean_hu["liver"] == pytest.approx((64 * 50.0 - 1000.0) / 65)
    assert state.mesh is None and state.evaluation is None and state.downloads is None
    assert fix.volume_text(state, "liver") == "**liver**: 0.5 mL (segmented: 0.5 mL)"
    removed = fix.remove_component(state, "liver", "axial", 2, (18.0, 18.0), (32, 40))  # voxel (5, 3, 2)
    assert removed == 64 and seg.masks["liver"].sum() == 1
    assert fix.undo(state) and seg.masks["liver"].sum() == 65
    assert fix.redo(state) and seg.masks["liver"].sum() == 1 and "redo" in state.correction.last
    assert fix.copy_to_neighbours(state, "liver", "axial", 2, 1) == 2
    assert state.correction.history.corrected == ["liver"]
    with pytest.raises(InputError, match="not segmented"):
        fix.apply_strokes(state, "spleen", "axial", 2, [([(2.0, 2.0)], 1.0)], "brush", (32, 40))


def test_a_new_run_starts_a_new_history(state):
    fix.copy_to_neighbours(state, "liver", "coronal", 3, 1)
    first = fix.correction_of(state)
    state.set_run(RunRecord(state.run.seg, "ct", state.run.settings))
    assert state.correction is None and fix.correction_of(state) is not first
    state.run = None
    assert fix.correction_of(state) is None and not fix.undo(state)
    with pytest.raises(InputError, match="segmentation first"):
        fix.copy_to_neighbours(state, "liver", "axial", 2, 1)


def test_save_training_case_and_the_cases_table(state, tmp_path):
    state.run.seg.volume = volume_from_array(
        np.rint(state.run.seg.volume.array), spacing=(2, 2, 2), check=False
    )
    case = fix.save_training_case(state, ["liver"], root=tmp_path)
    assert case.annotated == ("liver",) and case.source == "builtin"
    (row,) = fix.cases_table(tmp_path)
    assert row["classes"] == "liver" and row["from"] == "builtin"


def test_weights_to_finetune_and_the_models_offered(tmp_path):
    assert fix.finetune_weights(WeightsChoice("builtin")) == "builtin"
    assert fix.finetune_weights(WeightsChoice(CHECKPOINT, "/m/x.pt")) == "/m/x.pt"
    with pytest.raises(InputError, match="random weights"):
        fix.finetune_weights(WeightsChoice(DEMO_MODEL))
    assert fix.finetuned_choices(tmp_path) == []
    (tmp_path / "models").mkdir()
    for i, name in enumerate(["old.pt", "new.pt"]):
        (tmp_path / "models" / name).write_bytes(b"x")
        os.utime(tmp_path / "models" / name, (1000 + i, 1000 + i))
    choices = fix.finetuned_choices(tmp_path)
    assert [c.key for c in choices] == [str(tmp_path / "models" / n) for n in ("new.pt", "old.pt")]
    assert choices[0].label == "new (fine-tuned, local)" and choices[0].available
    path = fix.new_model_path(tmp_path, "builtin")
    assert path.parent == tmp_path / "models" and path.name.startswith("builtin-ft-")
    assert fix.corrections_root({"UNIVERSAL_CORRECTIONS_DIR": "/x/y"}) == type(path)("/x/y")
    assert fix.corrections_root({"UNIVERSAL_CACHE_DIR": "/c"}) == type(path)("/c/corrections")


def test_job_messages(tmp_path):
    job = fix.FinetuneJob(tmp_path / "dataset", "builtin", tmp_path / "m.pt")  # never started
    assert fix.job_message(job)[0] == "info"
    job.error = "fine-tuning failed: x"
    assert fix.job_message(job) == ("error", "fine-tuning failed: x")
    job.error, job.result = None, SimpleNamespace(stopped=True, message="stopped after 1 of 5 steps")
    assert fix.job_message(job) == ("warning", "stopped after 1 of 5 steps")
    job.result = SimpleNamespace(stopped=False, message="fine-tuned builtin")
    assert fix.job_message(job)[0] == "success" and "Model box" in fix.job_message(job)[1]
    assert fix.stroke_css("liver", "Eraser") == "rgba(255, 255, 255, 0.6)"
    assert edit.MODES == ("brush", "eraser") and set(fix.TOOLS.values()) == {"brush", "eraser", "component"}
