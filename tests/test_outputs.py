"""What `universal segment` and `Segmentation.save` leave on disk: whole case folders or nothing (issue #13).

A case folder is written into a hidden temporary sibling and renamed into place (``universal.io.atomic_folder``);
an earlier case folder is replaced as a whole; colliding case names get distinct folders; a full disk, an
unexpected error, Ctrl+C or SIGTERM leave no partial case and no temporary file; what can be checked before the
model loads is. Faults are injected deterministically (a patched writer, reader or sliding window that raises or
sends its own process a signal on its N-th call): no test depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from badinput import checksums, leftovers, run_cli, tiny_checkpoint

import universal
from universal import cli, inference
from universal.errors import InputWarning
from universal.inference import Segmentation
from universal.io import atomic_folder, save_volume

CLASSES = ["liver", "spleen", "right kidney", "left kidney", "liver tumor"]
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def phantom():
    return universal.make_phantom((48, 48, 36), spacing=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def files(tmp_path_factory, phantom):
    """Two small CTs with the same file name in two folders, and a tiny random-weights checkpoint."""
    d = tmp_path_factory.mktemp("outputs")
    a = save_volume(phantom.volume, d / "a" / "ct.nii.gz")
    b = save_volume(phantom.volume, d / "b" / "ct.nii.gz")
    weights = tiny_checkpoint(d / "tiny.pt", CLASSES)
    return {"dir": d, "a": Path(a), "b": Path(b), "weights": Path(weights)}


@pytest.fixture()
def sigint_raises():
    """SIGINT raises KeyboardInterrupt here (as in an interactive shell), whatever the test runner inherited."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def segment_argv(files, *inputs, out, classes=None):
    argv = ["segment", *map(str, inputs), "-o", str(out), "--weights", str(files["weights"])]
    return argv + (["--classes", *classes] if classes else [])


def messages(stderr: str) -> list[str]:
    """The lines of stderr that are not progress-bar redraws."""
    return [s.strip() for s in re.split(r"[\r\n]", stderr) if s.strip() and "%|" not in s]


def calls_then(n: int, action, original):
    """``original`` wrapped so that its ``n``-th call first runs ``action()`` (raise, or send a signal)."""
    count = [0]

    def hooked(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            action()
        return original(*args, **kwargs)

    return hooked


def raiser(exc: BaseException):
    def action():
        raise exc

    return action


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def tiny_segmentation(
    phantom, classes=("liver", "spleen", "liver tumor"), noisy: bool = False
) -> Segmentation:
    """A Segmentation built directly (no model): the phantom's masks, or random ones that compress badly."""
    rng = np.random.default_rng(0)
    masks = {
        c: (rng.random(phantom.volume.shape) < 0.5) if noisy else np.asarray(phantom.masks[c], dtype=bool)
        for c in classes
    }
    return Segmentation(masks=masks, volume=phantom.volume, info={"backbone": "none"})


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, *options: str):
    """A tmpfs of ``size`` mounted at ``folder`` (root only); the test is skipped where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
    except OSError as exc:
        pytest.skip(f"no mount command: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def assert_whole_case(folder: Path, classes) -> None:
    from universal.inference import mask_file_stem

    assert sorted(p.name for p in (folder / "masks").iterdir()) == sorted(
        f"{mask_file_stem(c)}.nii.gz" for c in classes
    )
    assert (folder / "labels.nii.gz").is_file()
    assert json.loads((folder / "report.json").read_text())["classes"] == list(classes)


# ------------------------------------------------------------------------------------------- atomic_folder
def test_atomic_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "case"
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".case.") and tmp.name.endswith(".tmp")
        (tmp / "a.txt").write_text("1")
        assert not target.exists()  # nothing visible until the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced as a whole, a.txt is gone
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_atomic_folder_keeps_the_old_folder_on_any_exception(tmp_path, exc):
    target = tmp_path / "case"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(exc)):
        with atomic_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise exc
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_atomic_folder_refuses_a_file(tmp_path):
    (tmp_path / "case").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_folder(tmp_path / "case"):
            pytest.fail("entered")
    assert (tmp_path / "case").read_text() == "x" and leftovers(tmp_path) == []


def test_a_signal_during_the_swap_is_held_back_until_the_folder_is_in_place(
    tmp_path, monkeypatch, sigint_raises
):
    target = tmp_path / "case"
    target.mkdir()
    (target / "old.txt").write_text("old")
    monkeypatch.setattr(os, "rename", calls_then(1, lambda: signal.raise_signal(signal.SIGINT), os.rename))
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [
        "new.txt"
    ]  # the swap finished, then Ctrl+C was raised
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ Segmentation.save
def test_save_replaces_an_earlier_case_folder_as_a_whole(tmp_path, phantom):
    out = tmp_path / "case"
    tiny_segmentation(phantom, ("liver", "spleen", "liver tumor")).save(out)
    written = tiny_segmentation(phantom, ("liver",)).save(out)
    assert written == {"masks": out / "masks", "labels": out / "labels.nii.gz", "report": out / "report.json"}
    assert_whole_case(out, ["liver"])  # no spleen / liver tumour mask of the earlier run
    assert leftovers(tmp_path) == []


def test_save_replaces_a_half_written_case_of_an_older_version(tmp_path, phantom):
    out = tmp_path / "case"
    (out / "masks").mkdir(parents=True)
    for name in ("liver.nii.gz", "spleen.nii.gz", ".liver_tumor.nii.gz.1a2b3c4d.tmp.nii.gz"):
        (out / "masks" / name).write_bytes(b"")  # 2 of 3 masks and a 0-byte temporary file, no labels/report
    tiny_segmentation(phantom, ("liver",)).save(out)
    assert_whole_case(out, ["liver"]) and leftovers(tmp_path) == []


@pytest.mark.parametrize("what", ["file", "folder of other files", "folder with a foreign report.json"])
def test_save_never_replaces_something_that_is_not_a_case(tmp_path, phantom, what):
    out = tmp_path / "case"
    if what == "file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / "ct.nii.gz").write_bytes(b"my data")
        if what.endswith("report.json"):
            (out / "report.json").write_text('{"something": "else"}')
    before = checksums([tmp_path])
    with pytest.raises(FileExistsError, match="not a"):
        tiny_segmentation(phantom).save(out)
    assert checksums([tmp_path]) == before


@pytest.mark.parametrize("exc", [enospc(), KeyboardInterrupt(), RuntimeError("boom")])
def test_save_failing_midway_leaves_the_earlier_case_untouched(tmp_path, phantom, monkeypatch, exc):
    out = tmp_path / "case"
    tiny_segmentation(phantom, ("liver", "spleen")).save(out)
    before = checksums([out])
    monkeypatch.setattr(inference, "save_mask", calls_then(3, raiser(exc), inference.save_mask))
    with pytest.raises(type(exc)):
        tiny_segmentation(phantom, ("liver", "spleen", "liver tumor")).save(out)
    assert checksums([out]) == before
    assert leftovers(tmp_path) == []


def test_save_on_a_full_tmpfs_leaves_nothing(tmp_path, phantom):
    with tmpfs(tmp_path / "full", "64k") as full:
        seg = tiny_segmentation(
            phantom, ("liver", "spleen", "right kidney", "left kidney", "liver tumor"), noisy=True
        )
        with pytest.raises(OSError) as info:
            seg.save(full / "case")
        assert info.value.errno == errno.ENOSPC
        assert list(full.iterdir()) == []  # no partial case, no temporary file


# ------------------------------------------------------------------------------------------------ naming
def test_case_names_rule():
    assert cli._case_names(["x/ct.nii.gz", "y/liver.nrrd"]) == ["ct", "liver"]
    assert cli._case_names(["a/ct.nii.gz", "b/ct.nii.gz"]) == ["a_ct", "b_ct"]
    assert cli._case_names(["a/CT.nii.gz", "b/ct.nrrd"]) == ["a_CT", "b_ct"]  # names compared ignoring case
    assert cli._case_names(["p1/a/ct.nii.gz", "p2/a/ct.nii.gz", "b/ct.nii.gz"]) == ["a_ct", "a_ct_2", "b_ct"]
    assert cli._case_names(["d/.hidden.nii.gz"]) == ["hidden"]
    assert cli._case_names(["p/ct.nii.gz", "q/ct.nii.gz"]) == cli._case_names(["p/ct.nii.gz", "q/ct.nii.gz"])


def test_colliding_inputs_get_distinct_folders(files, tmp_path):
    out = tmp_path / "o2"
    rc, stdout, stderr = run_cli(segment_argv(files, files["a"], files["b"], out=out))
    assert rc == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_ct", "b_ct"]
    for name in ("a_ct", "b_ct"):
        assert_whole_case(out / name, CLASSES)
    assert "a_ct" in stdout and "b_ct" in stdout


def test_rerun_with_fewer_classes_replaces_the_case(files, tmp_path):
    out = tmp_path / "o"
    assert run_cli(segment_argv(files, files["a"], out=out))[0] == 0
    rc, _, stderr = run_cli(segment_argv(files, files["a"], out=out, classes=["liver"]))
    assert rc == 0, stderr
    assert_whole_case(out / "ct", ["liver"])
    assert leftovers(out) == []


# ------------------------------------------------------------------------------- checks before the model loads
@pytest.fixture()
def no_model_load(monkeypatch):
    import universal.model as um

    monkeypatch.setattr(um, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        ("output is a file", "is a file"),
        ("output's parent is a file", "is a file"),
        ("a file where the case folder goes", "not a folder"),
        ("a folder of other files where the case folder goes", "not a case folder"),
        ("the same input twice", "given twice"),
    ],
)
def test_output_problems_are_said_before_the_model_loads(files, tmp_path, no_model_load, setup, fragment):
    out = tmp_path / "o"
    inputs = [files["a"]]
    if setup == "output is a file":
        out.write_text("x")
    elif setup == "output's parent is a file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "o"
    elif setup == "a file where the case folder goes":
        out.mkdir()
        (out / "ct").write_text("x")
    elif setup == "a folder of other files where the case folder goes":
        (out / "ct").mkdir(parents=True)
        (out / "ct" / "notes.txt").write_text("x")
    else:
        inputs = [files["a"], files["a"].parent / "." / "ct.nii.gz"]
    before = checksums([tmp_path])
    rc, _, stderr = run_cli(segment_argv(files, *inputs, out=out))
    assert rc == 2 and "Traceback" not in stderr
    said = messages(stderr)
    assert len(said) == 1 and said[0].startswith("error:") and fragment in said[0], said
    assert checksums([tmp_path]) == before and leftovers(tmp_path) == []


def test_a_case_folder_that_would_hold_its_input_is_refused(files, tmp_path, no_model_load):
    series = tmp_path / "scans" / "series"
    series.mkdir(parents=True)
    (series / "slice.dcm").write_bytes(b"DICM")
    rc, _, stderr = run_cli(segment_argv(files, series, out=tmp_path / "scans"))
    assert rc == 2 and "holds that input" in stderr
    assert sorted(p.name for p in series.iterdir()) == ["slice.dcm"]


def test_output_on_a_full_disk_is_refused_before_the_model_loads(files, tmp_path, no_model_load):
    with tmpfs(tmp_path / "full", "64k") as full:
        rc, _, stderr = run_cli(segment_argv(files, files["a"], out=full))
        assert rc == 2 and "free" in stderr and "Traceback" not in stderr
        assert list(full.iterdir()) == []


def test_read_only_output_is_refused_before_the_model_loads(files, tmp_path, no_model_load):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        rc, _, stderr = run_cli(segment_argv(files, files["a"], out=ro / "o"))
        assert rc == 2 and "Read-only" in stderr and "Traceback" not in stderr


def test_a_failed_run_removes_the_output_folder_it_created(files, tmp_path):
    out = tmp_path / "new" / "o"
    rc, _, _ = run_cli(segment_argv(files, files["a"], out=out) + ["--classes", "pancreas"])
    assert rc == 2 and not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------- faults during a batch
def test_disk_full_midway_is_one_line_and_leaves_nothing(files, tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setattr(inference, "save_mask", calls_then(3, raiser(enospc()), inference.save_mask))
    rc, _, stderr = run_cli(segment_argv(files, files["a"], out=out))
    assert rc == 2 and "Traceback" not in stderr
    failed = [m for m in messages(stderr) if "failed:" in m]
    assert len(failed) == 1 and "No space left on device" in failed[0] and str(out / "ct") in failed[0]
    assert not out.exists() or (list(out.iterdir()) == [])


def test_disk_full_midway_on_a_real_tmpfs(files, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_MIN_FREE_BYTES", 0)  # let the run start on an almost full disk
    with tmpfs(tmp_path / "full", "12k") as full:
        rc, _, stderr = run_cli(segment_argv(files, files["a"], out=full))
        assert rc == 2 and "No space left on device" in stderr and "Traceback" not in stderr
        assert list(full.iterdir()) == []


@pytest.mark.parametrize(
    ("exc", "fragment"),
    [
        (RuntimeError("CUDA error: an illegal memory access"), "unexpected RuntimeError: CUDA error"),
        (MemoryError("Unable to allocate 2.1 GiB"), "out of memory"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    ],
)
def test_an_unexpected_error_in_one_case_does_not_stop_the_batch(files, tmp_path, monkeypatch, exc, fragment):
    out = tmp_path / "o"
    monkeypatch.setattr(
        inference, "sliding_window_predict", calls_then(1, raiser(exc), inference.sliding_window_predict)
    )
    rc, _, stderr = run_cli(segment_argv(files, files["a"], files["b"], out=out))
    assert rc == 1 and "Traceback" not in stderr
    failed = [m for m in messages(stderr) if m.startswith("[1/2]")]
    assert len(failed) == 1 and "failed:" in failed[0] and fragment in failed[0]
    assert sorted(p.name for p in out.iterdir()) == ["b_ct"]
    assert_whole_case(out / "b_ct", CLASSES)


def test_a_warning_during_a_case_starts_on_its_own_line(files, tmp_path, monkeypatch):
    def warn_then(*args, **kwargs):
        kwargs["progress"](0.5)  # the bar is drawn mid-line
        warnings.warn("thin slices (a test warning)", InputWarning, stacklevel=1)
        return original(*args, **kwargs)

    original = inference.sliding_window_predict
    monkeypatch.setattr(inference, "sliding_window_predict", warn_then)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # print warnings to stderr (pytest records them otherwise)
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line)
        )
        rc, _, stderr = run_cli(segment_argv(files, files["a"], out=tmp_path / "o"))
    assert rc == 0
    line = next(s for s in re.split(r"[\r\n]", stderr) if "thin slices" in s)
    assert "%|" not in line and "[1/1]" not in line  # not glued onto the end of the progress bar


def test_sigterm_handler_is_restored_after_main(files, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(segment_argv(files, files["a"], out=tmp_path / "o"))[0] == 0
    assert signal.getsignal(signal.SIGTERM) == before
    monkeypatch.setattr(
        inference,
        "sliding_window_predict",
        calls_then(1, lambda: signal.raise_signal(signal.SIGTERM), inference.sliding_window_predict),
    )
    rc, _, stderr = run_cli(segment_argv(files, files["a"], out=tmp_path / "o2"))
    assert rc == cli.EXIT_TERMINATED and messages(stderr) == ["interrupted (SIGTERM)"]
    assert signal.getsignal(signal.SIGTERM) == before


# --------------------------------------------------------------------------- real signals, in a subprocess
DRIVER = '''
"""Run universal.cli.main once per scenario; a hook sends this very process a signal on its N-th call."""
import contextlib, importlib, io, json, signal, sys, warnings

from universal.errors import InputWarning

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive shell
from universal.cli import main  # noqa: E402

results, rc = [], 0
for sc in json.loads(sys.argv[1]):
    module_name, attr = sc["target"].rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, calls = getattr(module, attr), [0]

    def hooked(*args, _original=original, _sc=sc, _calls=calls, **kwargs):
        _calls[0] += 1
        if _calls[0] == _sc["n"]:
            if _sc["signal"] == "warn":
                warnings.warn("thin slices (a test warning)", InputWarning)
            else:  # raise_signal: delivered to this thread at once (os.kill may reach another thread first)
                signal.raise_signal(getattr(signal, _sc["signal"]))
        return _original(*args, **kwargs)

    setattr(module, attr, hooked)
    handler = signal.getsignal(signal.SIGTERM)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(sc["argv"])
    finally:
        setattr(module, attr, original)
    results.append({"rc": rc, "stderr": err.getvalue(), "calls": calls[0],
                    "handler_restored": signal.getsignal(signal.SIGTERM) == handler})
print("RESULTS " + json.dumps(results))
sys.exit(rc)
'''


def test_real_signals_at_each_moment_leave_no_partial_case(files, tmp_path):
    """SIGINT / SIGTERM while reading, during inference, while writing masks, labels, the report, during the final
    rename, while re-running over an earlier case, and while reading the second case of a batch."""
    a, b = files["a"], files["b"]
    earlier = tmp_path / "earlier"
    assert run_cli(segment_argv(files, a, out=earlier, classes=["liver"]))[0] == 0
    earlier_sums = checksums([earlier])
    n_masks = len(CLASSES)
    plan = [  # (name, target, n-th call, signal, inputs, expected)
        ("int-read", "nibabel.load", 1, "SIGINT", [a], "nothing"),
        ("term-read", "nibabel.load", 1, "SIGTERM", [a], "nothing"),
        ("int-infer", "universal.inference.sliding_window_predict", 1, "SIGINT", [a], "nothing"),
        ("term-infer", "universal.inference.sliding_window_predict", 1, "SIGTERM", [a], "nothing"),
        ("int-masks", "universal.inference.save_mask", 3, "SIGINT", [a], "nothing"),
        ("term-masks", "universal.inference.save_mask", 3, "SIGTERM", [a], "nothing"),
        ("term-labels", "universal.inference.save_mask", n_masks + 1, "SIGTERM", [a], "nothing"),
        ("int-report", "universal.inference.atomic_write_text", 1, "SIGINT", [a], "nothing"),
        ("term-rename", "os.rename", 1, "SIGTERM", [a], "whole"),
        ("term-rerun", "universal.inference.save_mask", 2, "SIGTERM", [a], "earlier"),
        ("int-second-read", "nibabel.load", 2, "SIGINT", [a, b], "first only"),
        ("warn", "universal.inference.sliding_window_predict", 1, "warn", [a], "whole"),
        (
            "term-last",
            "universal.inference.save_mask",
            1,
            "SIGTERM",
            [a],
            "nothing",
        ),  # the process's exit code
    ]
    outs = {name: (earlier if expected == "earlier" else tmp_path / name) for name, *_, expected in plan}
    # reading the second case *after* the first is written is the sequential order (prefetch reads it meanwhile)
    sequential = lambda name: ["--prefetch", "0"] if name == "int-second-read" else []  # noqa: E731
    scenarios = [
        {"target": t, "n": n, "signal": s, "argv": segment_argv(files, *inputs, out=outs[name]) + sequential(name)}
        for name, t, n, s, inputs, _ in plan
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    done = subprocess.run(
        [sys.executable, str(driver), json.dumps(scenarios)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [s for s in done.stdout.splitlines() if s.startswith("RESULTS ")]
    assert lines, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    results = json.loads(lines[0][len("RESULTS ") :])
    assert done.returncode == cli.EXIT_TERMINATED  # the process itself exits 143 after SIGTERM
    for (name, _, n, sig, inputs, expected), res in zip(plan, results):
        out, said = outs[name], messages(res["stderr"])
        assert res["calls"] >= n, f"{name}: the hook was reached {res['calls']} times"
        assert res["handler_restored"], f"{name}: the SIGTERM handler was not restored"
        assert "Traceback" not in res["stderr"], f"{name}: {res['stderr']}"
        assert leftovers(out) == [], f"{name}: leftovers {leftovers(out)}"
        if sig == "warn":
            assert res["rc"] == 0
            line = next(s for s in re.split(r"[\r\n]", res["stderr"]) if "thin slices" in s)
            assert "%|" not in line, f"{name}: the warning is glued to the progress bar: {line!r}"
        else:
            code, text = (143, "interrupted (SIGTERM)") if sig == "SIGTERM" else (130, "interrupted")
            assert res["rc"] == code, f"{name}: exit {res['rc']}\n{res['stderr']}"
            if len(inputs) > 1:  # a batch: the one line also says how to resume
                text += ": 1 of 2 cases done; run the same command again to resume (complete cases are skipped)"
            assert said == [text], f"{name}: {said}"
        if expected == "nothing":
            assert not out.exists() or list(out.iterdir()) == [], f"{name}: {list(out.rglob('*'))}"
        elif expected == "whole":
            assert_whole_case(out / "ct", CLASSES)
        elif expected == "earlier":
            assert checksums([earlier]) == earlier_sums, f"{name}: the earlier case changed"
        else:
            assert sorted(p.name for p in out.iterdir()) == ["a_ct"]
            assert_whole_case(out / "a_ct", CLASSES)
