"""The Streamlit dashboard driven headlessly with ``streamlit.testing.v1.AppTest``: the sample path end to end,
the error paths (a PNG, a 2-D image, a corrupt file), cached results, and separate sessions."""

from __future__ import annotations

import gzip
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

pytestmark = pytest.mark.app

APP = Path(__file__).resolve().parents[1] / "app.py"
SAMPLE_CLASSES = ["liver", "spleen", "right kidney", "left kidney", "liver tumor"]


def _app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=300)


def _state(at: AppTest):
    """The session's one typed state object (``universal.app_state.DashboardState``)."""
    return at.session_state["state"]


def _no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _frames(at: AppTest) -> list:
    return [d.value for d in at.dataframe]


def _frame_with(at: AppTest, column: str):
    found = [f for f in _frames(at) if column in f.columns]
    assert found, f"no table with a {column!r} column; tables: {[list(f.columns) for f in _frames(at)]}"
    return found[0]


def _open_tab(at: AppTest, name: str) -> None:
    """Select a tab (the app's tabs are stateful: only the open one runs)."""
    at.session_state["tab"] = name
    at.run()


def _png_bytes(w: int = 8, h: int = 8) -> bytes:
    raw = b"".join(b"\x00" + bytes(range(w)) for _ in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    import nibabel as nib

    d = tmp_path_factory.mktemp("bad_inputs")
    png = d / "photo.png"
    png.write_bytes(_png_bytes())
    flat = d / "slice2d.nii.gz"
    nib.save(nib.Nifti1Image(np.full((32, 32), -1000, np.int16), np.eye(4)), str(flat))
    corrupt = d / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    return {"png": png, "flat": flat, "corrupt": corrupt}


# package messages (universal.io.load_volume) the app must show as they are
EXPECTED = {"png": "PNG picture", "flat": "2-D", "corrupt": "could not be read as NIfTI"}


def test_page_loads_with_the_sample_and_no_error():
    t0 = time.perf_counter()
    at = _app().run()
    elapsed = time.perf_counter() - t0
    _no_exception(at)
    assert not at.error
    assert any(m.value.startswith("### universal") for m in at.markdown)
    assert at.selectbox(key="sample").value == "phantom"
    assert at.image, "the CT preview (a slice image) is shown before any run"
    assert [t.label for t in at.tabs] == [
        "Segmentation", "Correct", "3-D", "Evaluate", "Compare prompts", "Download"
    ]  # fmt: skip
    assert elapsed < 60  # generous: first import of the package and the phantom in a busy test process


def test_sample_end_to_end_with_cached_results_and_evaluation():
    at = _app().run()
    _no_exception(at)
    at.multiselect(key="classes").set_value(SAMPLE_CLASSES)
    at.toggle(key="fast").set_value(True)
    at.button(key="run").click().run()
    _no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert _state(at).n_segment_runs == 1
    assert any("Segmented 5 classes" in s.value for s in at.success)
    assert at.image, "overlay image"
    vols = _frame_with(at, "volume (mL)")
    assert list(vols["class"]) == SAMPLE_CLASSES
    timing = _frame_with(at, "seconds")
    assert {"inference", "total"} <= set(timing["stage"])
    assert not [f for f in _frames(at) if "dsc" in f.columns], "closed tabs do not run"

    # the sample's own reference: DSC/NSD with the FLARE 2023 preset (the Evaluate tab)
    _open_tab(at, "Evaluate")
    _no_exception(at)
    metrics = _frame_with(at, "dsc")
    assert {"liver", "spleen", "right kidney", "left kidney", "lesion"} <= set(metrics["class"])
    assert metrics["dsc"].between(0, 1).all()

    # moving sliders and switching views never recomputes the segmentation
    _open_tab(at, "Segmentation")
    t0 = time.perf_counter()
    at.slider(key="viewer_slice_axial").set_value(10).run()
    at.slider(key="opacity").set_value(0.8).run()
    at.radio(key="window").set_value("bone").run()
    at.radio(key="viewer_view").set_value("coronal").run()
    at.checkbox(key="show_liver").uncheck().run()
    per_interaction = (time.perf_counter() - t0) / 5
    _no_exception(at)
    assert _state(at).n_segment_runs == 1
    assert (
        per_interaction < 5.0
    )  # AppTest reruns the whole script; the browser test measures the real latency

    # the viewer keeps its settings while another tab is open
    _open_tab(at, "3-D")
    _no_exception(at)
    _open_tab(at, "Segmentation")
    assert at.radio(key="viewer_view").value == "coronal"
    assert at.radio(key="window").value == "bone"

    # switching the evaluation rules re-scores without re-segmenting
    _open_tab(at, "Evaluate")
    at.radio(key="eval_preset").set_value(at.radio(key="eval_preset").options[1]).run()
    _no_exception(at)
    generic = _frame_with(at, "dsc")
    assert set(generic["class"]) == set(SAMPLE_CLASSES)
    assert _state(at).n_segment_runs == 1

    # downloads exist: labels, masks zip, report.json and the metrics CSV
    _open_tab(at, "Download")
    _no_exception(at)
    labels = {b.label for b in at.get("download_button")}
    assert {"labels.nii.gz", "masks (zip)", "report.json", "metrics.csv"} <= labels


def test_compare_prompt_templates():
    at = _app().run()
    at.multiselect(key="classes").set_value(["liver", "spleen"])
    at.button(key="run").click().run()
    _no_exception(at)
    _open_tab(at, "Compare prompts")
    at.selectbox(key="template_b_key").set_value("photo")
    at.button(key="run_b").click().run()
    _no_exception(at)
    assert not at.error, [e.value for e in at.error]
    assert _state(at).n_segment_runs == 2
    table = _frame_with(at, "DSC(A,B)")
    assert list(table["class"]) == ["liver", "spleen"]
    assert table["DSC(A,B)"].between(0, 1).all()
    assert len(at.image) == 3  # A, B and the difference map (only the open tab runs)
    assert any("mean cosine similarity" in c.value for c in at.caption)


@pytest.mark.slow
@pytest.mark.parametrize("sample", ["ts_abdomen_3mm", "ts_dicom_series"])
def test_real_sample_marks_classes_the_reference_does_not_annotate(shared_data, sample):
    at = _app().run()
    at.selectbox(key="sample").set_value(sample).run()
    _no_exception(at)
    assert not at.error and _state(at).input.id == f"sample:{sample}"
    at.multiselect(key="classes").set_value(["liver", "spleen", "liver tumor"])
    at.button(key="run").click().run()
    _no_exception(at)
    assert not at.error, [e.value for e in at.error]
    _open_tab(at, "Evaluate")
    at.radio(key="eval_preset").set_value(at.radio(key="eval_preset").options[1]).run()
    _no_exception(at)
    metrics = _frame_with(at, "dsc").set_index("class")
    assert metrics.loc["liver tumor", "status"] == "not annotated"  # TotalSegmentator has no liver tumours
    assert metrics.loc["liver", "status"] == "ok"


@pytest.mark.parametrize("kind", ["png", "flat", "corrupt"])
def test_bad_path_inputs_show_the_package_message(kind, bad_inputs):
    at = _app().run()
    at.radio(key="source").set_value("Path on the server").run()
    at.text_input(key="server_path").input(str(bad_inputs[kind])).run()
    _no_exception(at)
    errors = [e.value for e in at.error]
    assert errors and EXPECTED[kind] in errors[0], errors
    assert at.button(key="run").disabled


@pytest.mark.parametrize("kind", ["png", "flat", "corrupt"])
def test_bad_uploads_show_the_package_message(kind, bad_inputs):
    at = _app().run()
    at.radio(key="source").set_value("Upload a file").run()
    f = bad_inputs[kind]
    at.file_uploader(key="upload").upload(f.name, f.read_bytes(), "application/octet-stream").run()
    _no_exception(at)
    errors = [e.value for e in at.error]
    assert errors and EXPECTED[kind] in errors[0], errors


def test_missing_server_path_is_a_readable_error(tmp_path):
    at = _app().run()
    at.radio(key="source").set_value("Path on the server").run()
    at.text_input(key="server_path").input(str(tmp_path / "nope.nii.gz")).run()
    _no_exception(at)
    assert any("does not exist" in e.value for e in at.error)


def test_two_sessions_do_not_share_uploads_or_results(bad_inputs):
    a, b = _app().run(), _app().run()
    fa, fb = _state(a).folder, _state(b).folder
    assert fa.path != fb.path
    a.radio(key="source").set_value("Upload a file").run()
    f = bad_inputs["flat"]
    a.file_uploader(key="upload").upload(f.name, f.read_bytes(), "application/octet-stream").run()
    assert (fa.path / "uploads" / f.name).is_file()
    assert not any(fb.path.rglob("*.nii.gz"))
    b.run()
    assert not b.error and _state(b).input.id == "sample:phantom"
    fa.close()
    assert not fa.path.exists()
