"""The dashboard's Correct tab driven with AppTest: edits change the run's masks and volumes (undo/redo), a
corrected case is saved with exactly its corrected classes, a fine-tune runs in the background, and the new model
appears in the Model box."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from universal import corrections  # noqa: E402

pytestmark = [pytest.mark.app, pytest.mark.slow]

APP = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrections")
    previous = os.environ.get("UNIVERSAL_CORRECTIONS_DIR")
    os.environ["UNIVERSAL_CORRECTIONS_DIR"] = str(folder)  # AppTest runs the script in this process
    yield folder
    if previous is None:
        os.environ.pop("UNIVERSAL_CORRECTIONS_DIR")
    else:
        os.environ["UNIVERSAL_CORRECTIONS_DIR"] = previous


@pytest.fixture(scope="module")
def at(root) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=300).run()
    at.multiselect(key="classes").set_value(["liver", "spleen"])
    at.toggle(key="fast").set_value(True)
    at.button(key="run").click().run()
    at.session_state["tab"] = "Correct"
    at.run()
    _ok(at)
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _volume(at: AppTest, name: str) -> float:
    return at.session_state["state"].run.seg.volumes_ml[name]


def test_edits_change_the_masks_and_undo_restores_them(at):
    assert {"fix_class", "fix_undo", "fix_redo", "fix_copy", "fix_save", "ft_start"} <= {
        w.key for w in [*at.selectbox, *at.button]
    }
    assert at.button(key="fix_undo").disabled  # nothing to undo yet
    at.selectbox(key="fix_class").set_value("liver").run()
    before = _volume(at, "liver")
    at.button(key="fix_copy").click().run()  # the middle slice of the liver onto two slices each side
    _ok(at)
    edited = _volume(at, "liver")
    assert edited != before
    state = at.session_state["state"]
    assert state.correction.history.corrected == ["liver"] and "liver" in state.correction.last
    assert state.mesh is None  # the 3-D view recomputes from the edited masks when it opens
    at.button(key="fix_undo").click().run()
    assert _volume(at, "liver") == pytest.approx(before)
    at.button(key="fix_redo").click().run()
    assert _volume(at, "liver") == pytest.approx(edited)
    at.session_state["tab"] = "Segmentation"
    at.run()
    table = next(d.value for d in at.dataframe if "volume (mL)" in d.value.columns)
    assert float(table.set_index("class").loc["liver", "volume (mL)"]) == pytest.approx(edited, rel=1e-3)
    at.session_state["tab"] = "Correct"
    at.run()


def test_save_as_training_case_annotates_the_corrected_classes(at, root):
    pick = next(m for m in at.multiselect if m.key and m.key.startswith("fix_annotate"))
    assert pick.value == ["liver"]  # the corrected class is proposed
    at.button(key="fix_save").click().run()
    _ok(at)
    assert any("Saved case phantom" in s.value for s in at.success)
    (case,) = corrections.list_cases(root / "dataset")
    assert case.annotated == ("liver",)
    assert any("1 case(s)" in m.value for m in at.markdown)


def test_finetune_in_the_background_and_the_model_box_lists_it(at, root):
    at.number_input(key="ft_steps").set_value(1).run()
    at.button(key="ft_start").click().run()
    _ok(at)
    job = at.session_state["finetune_job"]
    job.wait(600)
    assert job.error is None and job.result is not None and not job.result.stopped
    at.run()
    _ok(at)
    assert job.result.checkpoint.is_file() and job.result.checkpoint.parent == root / "models"
    label = f"{job.result.checkpoint.stem} (fine-tuned, local)"
    assert label in at.selectbox(key="model").options  # the Model box offers it
    assert any("fine-tuned builtin on 1 case(s) (liver)" in s.value for s in at.success)
