"""Shared fixtures: the read-only real data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared beside the project")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder ../shared/data (real CT volumes)."""
    return _need(SHARED / "data")


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """The folder ../shared/reference (facts about the official release)."""
    return _need(SHARED / "reference")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never write into the user's ~/.cache: embeddings and weights go to a per-run folder."""
    import os

    old = os.environ.get("UNIVERSAL_CACHE_DIR")
    os.environ["UNIVERSAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("universal-cache"))
    yield
    if old is None:
        os.environ.pop("UNIVERSAL_CACHE_DIR", None)
    else:
        os.environ["UNIVERSAL_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny
    models gain nothing from more, and a shared CPU makes them spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser():
    """A headless Debian Chromium for one browser-test module (``tests/browser_support.chromium``); skipped with the
    reason when it is absent. Each module starts its own ``streamlit_server`` with its own environment."""
    from browser_support import chromium

    with chromium() as b:
        yield b
