"""The Correct tab in a real browser: segment the built-in sample, draw one brush stroke on the slice (the
streamlit-drawable-canvas component), and see the class's volume grow; undo brings it back.

Needs Debian's ``chromium``; skipped with a reason otherwise. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import re

import pytest
from browser_support import ARTIFACTS, streamlit_server, wait_idle, wait_ready

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("corrections")


@pytest.fixture(scope="module")
def server(root):
    with streamlit_server(
        env={"UNIVERSAL_CORRECTIONS_DIR": str(root)}, log_name="browser_correct.log"
    ) as url:
        yield url


def _volume(page) -> float:
    text = page.locator(".st-key-fix_volume").inner_text()
    return float(re.search(r":\s*([0-9.]+) mL", text).group(1))


def test_one_stroke_changes_the_volume(server, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    try:
        page.goto(server, wait_until="domcontentloaded")
        wait_ready(page, timeout_ms=120_000)
        page.locator(".st-key-run button").click()
        page.get_by_text("Segmented", exact=False).first.wait_for(state="visible", timeout=300_000)
        page.get_by_role("tab", name="Correct").click()
        volume = page.locator(".st-key-fix_volume")
        expect(volume).to_be_visible(timeout=60_000)
        canvas = page.locator("canvas.upper-canvas").first
        canvas.wait_for(state="visible", timeout=60_000)
        wait_idle(page)
        before = _volume(page)
        box = canvas.bounding_box()
        # a stroke across the top-left corner: air outside the body, where no mask is
        x0, y0 = box["x"] + 0.08 * box["width"], box["y"] + 0.08 * box["height"]
        page.mouse.move(x0, y0)
        page.mouse.down()
        for i in range(1, 11):
            page.mouse.move(x0 + i * 0.02 * box["width"], y0 + i * 0.005 * box["height"])
        page.mouse.up()
        page.wait_for_function(
            "(v) => { const e = document.querySelector('.st-key-fix_volume');"
            " const m = e && e.innerText.match(/:\\s*([0-9.]+) mL/); return m && parseFloat(m[1]) > v; }",
            arg=before,
            timeout=120_000,
        )
        wait_idle(page)
        after = _volume(page)
        assert after > before
        expect(page.get_by_text("brush:", exact=False).first).to_be_visible()
        # the fresh widget, not a stale copy Streamlit keeps on screen while it reruns
        annotate = page.locator('[class*="st-key-fix_annotate"]:not([data-stale="true"])')
        expect(annotate).to_contain_text(
            "spleen", timeout=30_000
        )  # the corrected class is proposed for saving
        page.screenshot(path=str(ARTIFACTS / "browser_correct.png"))
        page.locator(".st-key-fix_undo button").click()
        page.wait_for_function(
            "(v) => { const e = document.querySelector('.st-key-fix_volume');"
            " const m = e && e.innerText.match(/:\\s*([0-9.]+) mL/); return m && Math.abs(parseFloat(m[1]) - v) < 0.05; }",
            arg=before,
            timeout=60_000,
        )
    finally:
        page.close()
