"""Plumbing of the browser tests: a ``streamlit run app.py`` server on a free localhost port (with an environment
of the test's choosing) and headless Debian Chromium driven by Playwright. Each browser test module builds its own
fixtures from these, so a test that needs, e.g., a local weights server sets its own environment variables."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"streamlit did not become healthy within {timeout:.0f} s")


def need_browser() -> None:
    """Skip (with the reason) unless Debian's Chromium and the playwright package are there."""
    if not CHROMIUM.exists():
        pytest.skip(
            "/usr/bin/chromium is absent: run scripts/ensure_chromium.sh (apt-get chromium chromium-driver)"
        )
    pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")


@contextlib.contextmanager
def streamlit_server(
    env: Mapping[str, str] | None = None, log_name: str = "browser_streamlit.log"
) -> Iterator[str]:
    """``streamlit run app.py`` on a free 127.0.0.1 port with ``os.environ`` updated by ``env``; yields its URL and
    stops the whole process group afterwards."""
    need_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log = open(ARTIFACTS / log_name, "w")  # noqa: SIM115 - closed below
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
        "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
    ]  # fmt: skip
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=full_env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
        log.close()


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Debian Chromium (Playwright), closed afterwards."""
    need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def wait_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit's script run is over (its status widget says 'Running' while busy)."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText.includes('Running')",
        timeout=timeout_ms,
    )


def wait_ready(page, timeout_ms: int = 60_000) -> None:
    """Wait until the page's Segment button is enabled and the first image is drawn."""
    page.locator(".st-key-run button").wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function(
        "() => { const b = document.querySelector('.st-key-run button'); return b && !b.disabled; }",
        timeout=timeout_ms,
    )
