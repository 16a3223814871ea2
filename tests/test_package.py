"""The package surface: a small public API, a light import, a console script."""

from __future__ import annotations

import json
import subprocess
import sys

import universal

HEAVY = ["streamlit", "open_clip", "torch", "monai", "SimpleITK", "sentence_transformers", "plotly"]


def test_import_is_light():
    """`import universal` must not pull in the heavy libraries (they load on first use)."""
    code = (
        f"import sys, universal; print(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_public_api_names_resolve():
    assert 8 <= len(universal.__all__) <= 20
    for name in universal.__all__:
        assert getattr(universal, name) is not None, name


def test_unknown_attribute_raises():
    try:
        universal.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "universal.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("segment", "evaluate", "train", "pseudo-label", "embed", "demo"):
        assert cmd in out.stdout
