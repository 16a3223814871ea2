"""The dashboard's Download control in a real browser: a weights registry pointing at a local server on 127.0.0.1
(tests/weights_server.py, serving a copy of the shipped built-in checkpoint under a research-only licence); in the
page the licence is accepted, the checkpoint downloaded, its sha256 shown, the model selected and the built-in
sample segmented with it."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from browser_support import ARTIFACTS, streamlit_server, wait_idle, wait_ready
from weights_server import weights_server

from universal.model.checkpoints import builtin_weights_path

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NAME = "lab-weights"
BLOB = builtin_weights_path().read_bytes()


@pytest.fixture(scope="module")
def weights():
    with weights_server() as srv:
        srv.files["/lab/weights.pt"] = BLOB
        yield srv


@pytest.fixture(scope="module")
def app(weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser-weights")
    registry = folder / "registry.json"
    registry.write_text(
        json.dumps(
            {
                NAME: {
                    "url": f"{weights.url}/lab/weights.pt",
                    "licence": "CC BY-NC-ND 4.0 (research only)",
                    "backbone": "segresnet",
                    "size": len(BLOB),
                    "description": "a lab's weights (a copy of the built-in ones)",
                }
            }
        )
    )
    env = {"UNIVERSAL_WEIGHTS_REGISTRY": str(registry), "UNIVERSAL_CACHE_DIR": str(folder / "cache")}
    with streamlit_server(env=env, log_name="browser_weights_streamlit.log") as url:
        yield url, folder / "cache" / "weights"


def _select_model(page, name: str) -> None:
    page.locator(".st-key-model").click()
    page.get_by_role("option", name=re.compile(re.escape(name))).first.click()
    wait_idle(page)


def test_download_accept_select_and_segment(app, weights, browser):
    from playwright.sync_api import expect

    url, cache = app
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    try:
        page.goto(url, wait_until="domcontentloaded")
        wait_ready(page, timeout_ms=120_000)
        _select_model(page, NAME)
        box = page.locator('[data-testid="stExpander"]').filter(has_text=f"Download {NAME}")
        expect(box).to_be_visible(timeout=30_000)
        expect(box).to_contain_text("CC BY-NC-ND 4.0")
        expect(box).to_contain_text("9.9 MB")
        button = page.locator(f".st-key-download_{NAME} button")
        expect(button).to_be_disabled()  # the licence is not accepted yet
        assert not weights.requests
        page.locator(f".st-key-accept_{NAME}").get_by_text("I accept the licence").click()
        expect(button).to_be_enabled(timeout=30_000)
        button.click()
        sha = hashlib.sha256(BLOB).hexdigest()
        # after the download the page runs again: the box gives way to the checked sha256
        shown = page.get_by_text(f"{NAME}: downloaded", exact=False)
        expect(shown).to_be_visible(timeout=120_000)
        expect(shown).to_contain_text(sha)
        expect(shown).to_contain_text("checked at every load")
        expect(box).to_have_count(0)
        assert (cache / f"{NAME}.pt").read_bytes() == BLOB
        assert any(r["path"] == "/lab/weights.pt" for r in weights.requests)
        wait_idle(page)
        page.screenshot(path=str(ARTIFACTS / "browser_weights_downloaded.png"))

        _select_model(page, NAME)  # listed as available now
        selector = page.get_by_role("combobox", name="Model")
        expect(selector).to_have_value(re.compile(rf"^{re.escape(NAME)} \(segresnet\)"))
        expect(selector).not_to_have_value(re.compile("unavailable"))
        wait_ready(page, timeout_ms=60_000)
        page.locator(".st-key-run button").click()
        page.get_by_text("Segmented", exact=False).first.wait_for(state="visible", timeout=240_000)
        wait_idle(page)
        page.screenshot(path=str(ARTIFACTS / "browser_weights_segmented.png"))
    finally:
        page.close()
