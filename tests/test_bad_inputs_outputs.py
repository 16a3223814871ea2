"""Catalogue of output-side faults of `universal segment` (issue #13, "outputs and faults").

Each :class:`badinput.Kind` says how the situation is made, the exit code, a fragment of the one-line message, and
``before=``: what the code before the fix did (recorded with the previous main). The house rules are checked by
:func:`badinput.check_kind` (one line, no traceback, inputs unchanged, no temporary file, a failed run adds nothing
to the output folder); interruptions (exit 130 / 143, one line ``interrupted``, for several CTs followed by how to
resume) by :func:`check_interrupted`
below. Faults are injected by patching a reader, the sliding window or the mask writer to raise, or to send this
very process a signal (``signal.raise_signal``), on its N-th call: deterministic, whatever the machine's speed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from badinput import Kind, check_kind, checksums, leftovers, run_cli, tiny_checkpoint

import universal
from universal import cli

CLASSES = ["liver", "spleen", "right kidney", "left kidney", "liver tumor"]
_SHARED: dict[str, Path] = {}  # the CT and the checkpoint, made once per module


@pytest.fixture(scope="module", autouse=True)
def _shared(tmp_path_factory):
    d = tmp_path_factory.mktemp("catalogue")
    phantom = universal.make_phantom((48, 48, 36), spacing=(4.0, 4.0, 4.0))
    _SHARED["ct"] = Path(universal.io.save_volume(phantom.volume, d / "ct.nii.gz"))
    _SHARED["weights"] = tiny_checkpoint(d / "tiny.pt", CLASSES)
    yield
    _SHARED.clear()


# ------------------------------------------------------------------------------------------------- helpers
def ct(folder: Path, name: str = "ct.nii.gz") -> Path:
    """A copy of the small CT at ``folder/name``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(_SHARED["ct"].read_bytes())
    return folder / name


def argv(*inputs: Any, out: Path, classes: list[str] | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    a = ["segment", *map(str, inputs), "-o", str(out), "--weights", str(_SHARED["weights"]), *extra]
    return a + (["--classes", *classes] if classes else [])


def made(inputs: list[Path], out: Path, *, classes=None, extra=(), more_inputs=()) -> dict[str, Any]:
    return {
        "argv": argv(*inputs, out=out, classes=classes, extra=extra),
        "inputs": [*inputs, *more_inputs],
        "out": out,
    }


def messages(stderr: str) -> list[str]:
    """The lines of stderr that are not progress-bar redraws."""
    return [s.strip() for s in re.split(r"[\r\n]", stderr) if s.strip() and "%|" not in s]


def case_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def whole(folder: Path, classes=CLASSES) -> None:
    from universal.inference import mask_file_stem

    expected = ["labels.nii.gz", *(f"masks/{mask_file_stem(c)}.nii.gz" for c in classes), "report.json"]
    assert case_files(folder) == sorted(expected), f"{folder}: {case_files(folder)}"
    assert json.loads((folder / "report.json").read_text())["classes"] == list(classes)


def on_call(target: str, n: int, action: str | BaseException):
    """A patch: ``target`` (``module.attr``) raises ``action`` or sends the signal named ``action`` on call ``n``."""

    def apply(monkeypatch) -> None:
        import importlib

        module_name, attr = target.rsplit(".", 1)
        module = importlib.import_module(module_name)
        original, count = getattr(module, attr), [0]

        def hooked(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                if isinstance(action, BaseException):
                    raise action
                signal.raise_signal(getattr(signal, action))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attr, hooked)

    return apply


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------------------------- the kinds
def _colliding(tmp: Path):
    return made([ct(tmp / "ts_abdomen_3mm"), ct(tmp / "ts_abdomen_3mm_unlabeled")], tmp / "o2")


def _after_colliding(tmp):
    assert sorted(p.name for p in (tmp / "o2").iterdir()) == [
        "ts_abdomen_3mm_ct",
        "ts_abdomen_3mm_unlabeled_ct",
    ]
    for name in ("ts_abdomen_3mm_ct", "ts_abdomen_3mm_unlabeled_ct"):
        whole(tmp / "o2" / name)


def _earlier_case(tmp: Path) -> None:
    """An earlier run into ``tmp/o`` with three classes (before the fault is patched in)."""
    assert run_cli(argv(ct(tmp / "in"), out=tmp / "o", classes=["liver", "spleen", "liver tumor"]))[0] == 0


def _rerun_fewer(tmp: Path):
    return made([tmp / "in" / "ct.nii.gz"], tmp / "o", classes=["liver"])


def _rerun_fails_midway(tmp: Path):  # the earlier case must stay exactly as it was
    return made([tmp / "in" / "ct.nii.gz"], tmp / "o", more_inputs=[tmp / "o"])


def _output_is_file(tmp: Path):
    (tmp / "results").write_text("not a folder")
    return made([ct(tmp / "in")], tmp / "results", more_inputs=[tmp / "results"])


def _output_parent_is_file(tmp: Path):
    (tmp / "results").write_text("not a folder")
    return made([ct(tmp / "in")], tmp / "results" / "sub", more_inputs=[tmp / "results"])


def _output_is_the_input(tmp: Path):
    a = ct(tmp / "in")
    return made([a], a)


def _existing_file_at_case(tmp: Path):
    (tmp / "o").mkdir()
    (tmp / "o" / "ct").write_text("the user's notes")
    return made([ct(tmp / "in")], tmp / "o", more_inputs=[tmp / "o" / "ct"])


def _existing_folder_at_case(tmp: Path):
    (tmp / "o" / "ct").mkdir(parents=True)
    (tmp / "o" / "ct" / "notes.txt").write_text("the user's notes")
    (tmp / "o" / "ct" / "gt.nii.gz").write_bytes(b"the user's reference")
    return made([ct(tmp / "in")], tmp / "o", more_inputs=[tmp / "o" / "ct"])


def _output_is_input_folder(tmp: Path):
    a = ct(tmp / "in")
    return {"argv": argv(a, out=tmp / "in"), "inputs": [a], "out": tmp / "in"}


def _case_folder_is_input(tmp: Path):
    series = tmp / "scans" / "series"
    series.mkdir(parents=True)
    (series / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM")
    return made([series], tmp / "scans")


def _same_twice(tmp: Path):
    a = ct(tmp / "in")
    return made([a, tmp / "in" / "." / "ct.nii.gz"], tmp / "o")


def _two_cases(tmp: Path):
    return made([ct(tmp / "a"), ct(tmp / "b")], tmp / "o")


def _two_cases_in_turn(tmp: Path):  # the second CT read after the first is written (prefetch reads it meanwhile)
    return made([ct(tmp / "a"), ct(tmp / "b")], tmp / "o", extra=("--prefetch", "0"))


def _after_second_only(tmp):
    assert sorted(p.name for p in (tmp / "o").iterdir()) == ["b_ct"]
    whole(tmp / "o" / "b_ct")


def _one_case(tmp: Path):
    return made([ct(tmp / "in")], tmp / "o")


def _spaces_unicode(tmp: Path):
    return made([ct(tmp / "in")], tmp / "out dir" / "ünïcødé 分割")


def _after_unicode(tmp):
    whole(tmp / "out dir" / "ünïcødé 分割" / "ct")


def _full_disk(tmp: Path):
    return made([ct(tmp / "in")], tmp / "mnt")


def _read_only(tmp: Path):
    return made([ct(tmp / "in")], tmp / "mnt" / "o")


def _after_in_place(tmp):
    whole(tmp / "in" / "ct")


def _after_rerun_fewer(tmp):
    whole(tmp / "o" / "ct", ["liver"])


def _after_whole_one(tmp):
    whole(tmp / "o" / "ct")


def _after_first_only(tmp):
    assert sorted(p.name for p in (tmp / "o").iterdir()) == ["a_ct"]
    whole(tmp / "o" / "a_ct")


def _min_free_zero(monkeypatch):
    monkeypatch.setattr(cli, "_MIN_FREE_BYTES", 0)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


INFER = "universal.inference.sliding_window_predict"
SAVE = "universal.inference.save_mask"
READ = "nibabel.load"
REPORT = "universal.inference.atomic_write_text"

KINDS = [
    Kind("colliding_names", _colliding, code=0, before="exit 0, wrong: both cases written to o2/ct, the second over the first",
         extra={"after": _after_colliding}),
    Kind("rerun_with_fewer_classes", _rerun_fewer, code=0,
         before="exit 0, wrong: the earlier run's spleen / liver tumour masks stay beside the new labels and report",
         extra={"prepare": _earlier_case, "after": _after_rerun_fewer}),
    Kind("rerun_fails_midway_keeps_earlier_case", _rerun_fails_midway, code=2, fragment="No space left on device",
         before="traceback; the earlier case folder half overwritten",
         extra={"prepare": _earlier_case, "patch": [on_call(SAVE, 2, enospc())]}),
    Kind("output_is_a_file", _output_is_file, code=2, fragment="is a file",
         before="traceback (NotADirectoryError) after the whole inference"),
    Kind("output_parent_is_a_file", _output_parent_is_file, code=2, fragment="is a file",
         before="traceback (NotADirectoryError) after the whole inference"),
    Kind("output_is_the_input_file", _output_is_the_input, code=2, fragment="is a file",
         before="traceback (NotADirectoryError) after the whole inference"),
    Kind("output_read_only", _read_only, code=2, fragment="read-only",
         before="traceback (OSError EROFS) after the whole inference", extra={"mount": ("1m", "ro")}),
    Kind("output_path_spaces_non_ascii", _spaces_unicode, code=0, before="ok", extra={"after": _after_unicode}),
    Kind("output_full_disk_64k", _full_disk, code=2, fragment="KiB free",
         before="exit 0 for this tiny CT (it fits); traceback, 13 of 19 masks, no labels/report for ts_abdomen_3mm",
         extra={"mount": ("64k",)}),
    Kind("output_full_disk_midway_tmpfs", _full_disk, code=2, fragment="No space left on device",
         before="traceback, partial case (3 of 5 masks, no labels/report)",
         extra={"mount": ("12k",), "patch": [_min_free_zero]}),
    Kind("disk_full_midway_patched_writer", _one_case, code=2, fragment="No space left on device",
         before="traceback, partial case (2 of 5 masks, no labels/report)",
         extra={"patch": [on_call(SAVE, 3, enospc())]}),
    Kind("existing_file_where_the_case_goes", _existing_file_at_case, code=2, fragment="not a folder",
         before="traceback (NotADirectoryError) after the whole inference"),
    Kind("existing_non_case_folder", _existing_folder_at_case, code=2, fragment="not a case folder",
         before="exit 0, wrong: masks/labels/report written into the user's folder beside their files"),
    Kind("output_is_the_input_folder", _output_is_input_folder, code=0, before="ok",
         extra={"after": _after_in_place}),
    Kind("case_folder_is_the_input_dicom_folder", _case_folder_is_input, code=2, fragment="holds that input",
         before="exit 0, wrong: masks/, labels.nii.gz, report.json written into the input DICOM folder"),
    Kind("same_input_twice", _same_twice, code=2, fragment="given twice",
         before="exit 0: the case computed twice into one folder"),
    Kind("unreadable_first_case_then_good", _two_cases, code=1, fragment="Permission denied",
         before="exit 2, batch stopped: the good second case never ran (message glued to the progress bar)",
         extra={"patch": [on_call("universal.inference.load_volume", 1, PermissionError(errno.EACCES,
                "Permission denied", "a/ct.nii.gz"))], "partial_ok": True, "after": _after_second_only}),
    Kind("unexpected_runtime_error_in_one_case", _two_cases, code=1, fragment="unexpected RuntimeError",
         before="traceback, batch stopped",
         extra={"patch": [on_call(INFER, 1, RuntimeError("CUDA error: an illegal memory access"))],
                "partial_ok": True, "after": _after_second_only}),
    Kind("memory_error_in_one_case", _two_cases, code=1, fragment="out of memory",
         before="traceback, batch stopped",
         extra={"patch": [on_call(INFER, 1, MemoryError("Unable to allocate 2.1 GiB"))], "partial_ok": True,
                "after": _after_second_only}),
    Kind("disk_full_while_saving_first_of_two", _two_cases, code=1, fragment="No space left on device",
         before="traceback, batch stopped, partial first case",
         extra={"patch": [on_call(SAVE, 1, enospc())], "partial_ok": True, "after": _after_second_only}),
    Kind("device_cuda_without_gpu", lambda t: made([ct(t / "in")], t / "o", extra=("--device", "cuda")), code=2,
         fragment="cuda", before="traceback (RuntimeError: Found no NVIDIA driver)", extra={"needs": "no_cuda"}),
    Kind("overlap_one", lambda t: made([ct(t / "in")], t / "o", extra=("--overlap", "1.0")), code=2,
         fragment="overlap", before="traceback (ValueError) after the model was loaded"),
    # interruptions: exit 130 (Ctrl+C) or 143 (SIGTERM), one line, nothing half-written
    Kind("sigint_while_reading", _one_case, code=130, before="ok (exit 130, nothing written)",
         extra={"patch": [on_call(READ, 1, "SIGINT")]}),
    Kind("sigterm_while_reading", _one_case, code=143, before="killed without a message",
         extra={"patch": [on_call(READ, 1, "SIGTERM")]}),
    Kind("sigint_during_inference", _one_case, code=130, before="ok (exit 130, nothing written)",
         extra={"patch": [on_call(INFER, 1, "SIGINT")]}),
    Kind("sigterm_during_inference", _one_case, code=143, before="killed without a message",
         extra={"patch": [on_call(INFER, 1, "SIGTERM")]}),
    Kind("sigint_while_saving_masks", _one_case, code=130, before="partial case (2 of 5 masks, no labels/report)",
         extra={"patch": [on_call(SAVE, 3, "SIGINT")]}),
    Kind("sigterm_while_saving_masks", _one_case, code=143,
         before="killed without a message, partial case (2 of 5 masks; 0-byte .tmp.nii.gz files seen)",
         extra={"patch": [on_call(SAVE, 3, "SIGTERM")]}),
    Kind("sigterm_while_saving_labels", _one_case, code=143, before="killed without a message, case without labels/report",
         extra={"patch": [on_call(SAVE, len(CLASSES) + 1, "SIGTERM")]}),
    Kind("sigint_while_saving_report", _one_case, code=130, before="partial case (masks and labels, no report.json)",
         extra={"patch": [on_call(REPORT, 1, "SIGINT")]}),
    Kind("sigterm_during_final_rename", _one_case, code=143,
         before="killed without a message (no final rename then: the last write left a case without report.json)",
         extra={"patch": [on_call("os.rename", 1, "SIGTERM")], "after": _after_whole_one, "partial_ok": True}),
    Kind("sigint_while_reading_second_case", _two_cases_in_turn, code=130, before="ok (first case whole, exit 130)",
         extra={"patch": [on_call(READ, 2, "SIGINT")], "after": _after_first_only, "partial_ok": True}),
    Kind("sigterm_during_rerun_keeps_earlier_case", _rerun_fails_midway, code=143,
         before="killed without a message; the earlier case folder half overwritten",
         extra={"prepare": _earlier_case, "patch": [on_call(SAVE, 2, "SIGTERM")]}),
]  # fmt: skip


class _SigtermReachedTheTest(BaseException):
    """SIGTERM was not handled by ``universal.cli.main`` (raised instead of killing the test run)."""


@pytest.fixture()
def signals_as_in_a_shell():
    """SIGINT raises KeyboardInterrupt (as in an interactive shell); a SIGTERM that main did not take over fails
    the test instead of killing pytest."""

    def not_handled(signum, frame):
        raise _SigtermReachedTheTest()

    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_term = signal.signal(signal.SIGTERM, not_handled)
    yield not_handled
    signal.signal(signal.SIGINT, old_int)
    signal.signal(signal.SIGTERM, old_term)


@pytest.fixture()
def mounted(tmp_path):
    """Mount a tmpfs at ``tmp_path/mnt`` (root only; skipped where mounting is not permitted)."""
    mounts: list[Path] = []

    def mount(size: str, *options: str) -> None:
        mnt = tmp_path / "mnt"
        mnt.mkdir(exist_ok=True)
        opts = ",".join([f"size={size}", *options])
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True
            )
        except OSError as exc:
            pytest.skip(f"no mount command: {exc}")
        if done.returncode != 0:
            pytest.skip(
                f"mounting a tmpfs is not permitted here: {done.stderr.decode(errors='replace').strip()}"
            )
        mounts.append(mnt)

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", str(mnt)], check=False)


def check_interrupted(kind: Kind, tmp_path: Path) -> None:
    """The house rules for an interruption: exit 130 / 143, the one line ``interrupted``, no traceback, inputs
    unchanged, no temporary file, and no case that was not whole before (unless ``after`` checks a whole one)."""
    m = kind.make(tmp_path)
    inputs, out = [Path(p) for p in m.get("inputs", [])], Path(m["out"])
    before = checksums(inputs)
    existed = sorted(str(q) for q in out.rglob("*")) if out.is_dir() else []
    rc, _, stderr = run_cli([str(a) for a in m["argv"]])
    assert rc == kind.code, f"{kind.name}: exit {rc}, expected {kind.code}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    expected = "interrupted (SIGTERM)" if kind.code == cli.EXIT_TERMINATED else "interrupted"
    lines = messages(stderr)  # one line; a batch of several CTs adds how to resume (tests/test_batch.py)
    assert len(lines) == 1 and (
        lines[0] == expected
        or lines[0].startswith(f"{expected}: ") and "run the same command again to resume" in lines[0]
    ), f"{kind.name}: {lines}"
    assert checksums(inputs) == before, f"{kind.name}: an input (or the earlier case) changed"
    assert leftovers(out) == [], f"{kind.name}: leftovers {leftovers(out)}"
    if not kind.extra.get("partial_ok"):
        now = sorted(str(q) for q in out.rglob("*")) if out.is_dir() else []
        assert now == existed, f"{kind.name}: the interrupted run wrote {set(now) - set(existed)}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_output_fault(kind: Kind, tmp_path, monkeypatch, signals_as_in_a_shell, mounted):
    if kind.extra.get("needs") == "no_cuda" and _has_cuda():
        pytest.skip("this machine has a CUDA GPU")
    if "mount" in kind.extra:
        mounted(*kind.extra["mount"])
    if "prepare" in kind.extra:
        kind.extra["prepare"](tmp_path)
    for patch in kind.extra.get("patch", []):
        patch(monkeypatch)
    if kind.code in (cli.EXIT_INTERRUPTED, cli.EXIT_TERMINATED):
        check_interrupted(kind, tmp_path)
    else:
        check_kind(kind, tmp_path)
    if "after" in kind.extra:
        kind.extra["after"](tmp_path)
    assert signal.getsignal(signal.SIGTERM) is signals_as_in_a_shell  # main restored the handler it found


def test_catalogue_is_complete():
    assert len(KINDS) >= 15 and len({k.name for k in KINDS}) == len(KINDS)
    assert all(k.before for k in KINDS)
