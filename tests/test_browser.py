"""The dashboard in a real browser: ``streamlit run app.py`` on a free localhost port, driven by headless Chromium.

Runs the built-in sample, checks that the overlay and the metrics table appear, measures page load, the fast
segmentation and a slider interaction, and saves screenshots to ``test-artifacts/`` (gitignored).
Needs Debian's ``chromium`` (``scripts/ensure_chromium.sh`` installs it); skipped with a reason otherwise.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from browser_support import ARTIFACTS, streamlit_server
from browser_support import wait_idle as _wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server():
    with streamlit_server() as url:
        yield url


def test_sample_in_a_real_browser(server, browser):
    from playwright.sync_api import expect

    timings: dict[str, float] = {}
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    try:
        t0 = time.perf_counter()
        page.goto(server, wait_until="domcontentloaded")
        run = page.locator(".st-key-run button")
        run.wait_for(state="visible", timeout=60_000)
        page.wait_for_function(
            "() => { const b = document.querySelector('.st-key-run button'); return b && !b.disabled; }",
            timeout=60_000,
        )
        page.locator('[data-testid="stImage"] img').first.wait_for(state="visible", timeout=60_000)
        timings["page_interactive_s"] = time.perf_counter() - t0

        # the sample is preselected: run it in fast mode (the default)
        t0 = time.perf_counter()
        run.click()
        page.get_by_text("Segmented", exact=False).first.wait_for(state="visible", timeout=240_000)
        timings["click_to_result_s"] = time.perf_counter() - t0
        success = page.get_by_text("Segmented", exact=False).first.inner_text()
        timings["segment_total_s"] = float(success.split(" in ")[1].split(" s")[0])
        timings["model_load_s"] = float(success.split("model load ")[1].split(" s")[0])
        # the rest of the tab (viewer, tables) is drawn after the success message
        page.locator(".st-key-timing_table").wait_for(state="visible", timeout=120_000)
        timings["click_to_page_done_s"] = time.perf_counter() - t0

        # the overlay image and the volume table
        overlay = page.locator('[data-testid="stImage"] img').first
        expect(overlay).to_be_visible(timeout=30_000)
        expect(page.locator(".st-key-volume_table")).to_be_visible(timeout=30_000)
        expect(page.locator(".st-key-timing_table")).to_be_visible(timeout=30_000)

        # slider interactions: the slice (its caption) changes, the segmentation is not recomputed
        caption = page.locator('[data-testid="stImageCaption"]').first
        thumb = page.locator(".st-key-viewer_slice_axial input[type='range']")
        page.wait_for_timeout(1000)  # let the browser finish drawing the results
        latencies = []
        for _ in range(5):
            start = int(thumb.get_attribute("value"))
            thumb.focus()
            t0 = time.perf_counter()
            page.keyboard.press("ArrowRight")
            # poll every animation frame (expect() polls at growing intervals, which would blur the latency)
            page.wait_for_function(
                "(text) => { const c = document.querySelector('[data-testid=\"stImageCaption\"]');"
                " return c && c.innerText.includes(text); }",
                arg=f"slice {start + 1} ",
                polling="raf",
                timeout=30_000,
            )
            latencies.append(time.perf_counter() - t0)
        timings["slider_interaction_s"] = sorted(latencies)[len(latencies) // 2]
        timings["slider_interaction_max_s"] = max(latencies)
        # far below a re-segmentation (the target, < 1 s, is reported, not asserted: CI machines are shared)
        assert max(latencies) < 5.0, latencies
        expect(page.get_by_text("Segmented", exact=False).first).to_be_visible()
        page.set_viewport_size({"width": 1500, "height": 2100})
        _wait_idle(page)
        page.screenshot(path=str(ARTIFACTS / "browser_app.png"))

        # the sample's reference overlay in the same viewer (coronal view)
        page.locator(".st-key-overlay_source").get_by_text("reference").click()
        page.locator(".st-key-viewer_view").get_by_text("coronal").click()
        expect(caption).to_contain_text("coronal slice", timeout=30_000)
        _wait_idle(page)
        page.screenshot(path=str(ARTIFACTS / "browser_reference.png"))

        # the evaluate tab with the sample's reference: the metrics table and the bar chart
        page.get_by_role("tab", name="Evaluate").click()
        expect(page.locator(".st-key-metrics_table")).to_be_visible(timeout=60_000)
        expect(page.locator(".st-key-metrics_chart")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Mean DSC").first).to_be_visible(timeout=30_000)
        expect(page.locator(".st-key-metrics_table")).to_contain_text("liver")
        page.screenshot(path=str(ARTIFACTS / "browser_evaluate.png"))

        # the 3-D tab draws meshes
        page.get_by_role("tab", name="3-D").click()
        expect(page.locator(".st-key-mesh_chart")).to_be_visible(timeout=60_000)
        page.wait_for_timeout(1500)  # WebGL draw
        page.screenshot(path=str(ARTIFACTS / "browser_3d.png"))
        page.locator(".st-key-mesh_source").get_by_text("reference").click()
        expect(page.locator(".st-key-mesh_chart")).to_be_visible(timeout=60_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=str(ARTIFACTS / "browser_3d_reference.png"))

        # a download: the label map is a gzip file made on click
        page.get_by_role("tab", name="Download").click()
        with page.expect_download(timeout=120_000) as info:
            page.locator(".st-key-dl_labels button").click()
        data = Path(info.value.path()).read_bytes()
        assert data[:2] == b"\x1f\x8b" and len(data) > 1000
    finally:
        timings["load_average_1min"] = os.getloadavg()[0]  # context: the machine may be shared
        timings["cpu_count"] = os.cpu_count() or 0
        (ARTIFACTS / "browser_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        page.close()
    assert (ARTIFACTS / "browser_app.png").stat().st_size > 10_000
    print("browser timings:", timings)
