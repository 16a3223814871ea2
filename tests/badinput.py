"""Shared helpers of the bad-input and fault catalogue (``tests/test_bad_inputs*.py``).

Each catalogue entry is a :class:`Kind`: how the input is made, what the user runs, the expected exit code (CLI) or
exception type (API), a fragment of the one-line message. :func:`check_kind` runs it and asserts the house rules:
one clear line (no traceback), the right code, inputs unchanged (checksums), nothing left behind (no temporary file,
no partial case folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: names that only a half-written or interrupted run leaves behind
LEFTOVER_PATTERNS = (r"\.tmp", r"\.part$", r"^\.", r"~$", r"\.partial")


def checksums(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), keyed by path; symlinks by their target text."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        files = [p] if not p.is_dir() or p.is_symlink() else sorted(q for q in p.rglob("*") if not q.is_dir())
        for f in files:
            if f.is_symlink():
                out[str(f)] = "link:" + os.readlink(f)
            elif f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """Files or folders under ``folder`` whose names look temporary or hidden (a half-written result)."""
    folder = Path(folder)
    if not folder.exists():
        return []
    found = []
    for q in folder.rglob("*"):
        if any(re.search(pat, q.name) for pat in LEFTOVER_PATTERNS):
            found.append(str(q.relative_to(folder)))
    return sorted(found)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``universal.cli.main(argv)`` in this process → (exit code, stdout, stderr)."""
    from universal.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse errors
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


@dataclass
class Kind:
    """One kind of bad input or fault.

    Attributes:
        name: Short id (the test id).
        make: ``make(tmp_path) -> dict`` building the inputs; returns at least ``argv`` (CLI) or ``call`` (a
            zero-argument callable for the API), and optionally ``inputs`` (paths whose checksums must not change)
            and ``out`` (the output folder that must hold no partial case and no temporary file).
        code: Expected CLI exit code (``None`` for API kinds).
        raises: Expected exception type for API kinds.
        fragment: A regular expression the message must contain (searched case-insensitively).
        before: What today's main did before the fix (for the catalogue table), e.g. ``"traceback"``, ``"ok"``.
        warns: For kinds that succeed with a warning: the warning's fragment (the code is then usually 0).
    """

    name: str
    make: Callable[[Path], dict[str, Any]]
    code: int | None = 2
    raises: type[BaseException] | None = None
    fragment: str = ""
    before: str = "ok"
    warns: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_kind(kind: Kind, tmp_path: Path) -> None:
    """Run ``kind`` and assert the house rules (see the module docstring)."""
    import warnings

    import pytest

    made = kind.make(tmp_path)
    inputs = [Path(p) for p in made.get("inputs", [])]
    before = checksums(inputs)
    out = Path(made["out"]) if made.get("out") else None
    existed = sorted(str(q) for q in out.rglob("*")) if out is not None and out.is_dir() else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if "argv" in made:
            rc, stdout, stderr = run_cli([str(a) for a in made["argv"]])
            assert rc == kind.code, f"{kind.name}: exit {rc}, expected {kind.code}\nstderr: {stderr}"
            assert "Traceback" not in stderr, f"{kind.name}: traceback\n{stderr}"
            text = stderr + stdout
            if kind.code not in (0, None):
                errors = [line for line in stderr.splitlines() if line.startswith("error:") or "failed:" in line]
                assert errors, f"{kind.name}: no one-line error\n{stderr}"
        else:
            assert kind.raises is not None, f"{kind.name}: an API kind needs raises="
            with pytest.raises(kind.raises) as info:
                made["call"]()
            text = str(info.value)
            assert "\n" not in text.strip() or kind.extra.get("multiline"), f"{kind.name}: not one line: {text}"
    if kind.fragment:
        assert re.search(kind.fragment, text, re.I | re.S), f"{kind.name}: {kind.fragment!r} not in {text!r}"
    if kind.warns:
        messages = " | ".join(str(w.message) for w in caught) + " " + text
        assert re.search(kind.warns, messages, re.I), f"{kind.name}: no warning {kind.warns!r} in {messages!r}"
    assert checksums(inputs) == before, f"{kind.name}: an input was changed"
    if out is not None:
        assert leftovers(out) == [], f"{kind.name}: leftovers {leftovers(out)}"
        if kind.code not in (0, None) and not kind.extra.get("partial_ok"):
            now = sorted(str(q) for q in out.rglob("*")) if out.is_dir() else []
            assert now == existed, f"{kind.name}: a failed run changed the output folder: {set(now) - set(existed)}"


def tiny_checkpoint(path: Path, classes: list[str]) -> Path:
    """A tiny random-weights SegResNet checkpoint for ``classes`` (one-hot prompts, 6 mm, 16³ windows): a model
    that runs a small CT in a fraction of a second, for tests of what happens around inference."""
    import numpy as np

    from universal.model import create_model, save_checkpoint
    from universal.preprocess import PreprocessConfig
    from universal.spec import InferenceDefaults

    model = create_model(
        "segresnet",
        classes=classes,
        encoder="onehot",
        embeddings=np.eye(len(classes), 32, dtype="float32"),
        preprocessing=PreprocessConfig(spacing_mm=6.0),
        inference=InferenceDefaults(patch_size=(16, 16, 16)),
    )
    return Path(save_checkpoint(model, path))
