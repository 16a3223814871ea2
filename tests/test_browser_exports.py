"""The dashboard's export downloads in a real browser: choose the DICOM sample (``../shared/data/ts_dicom_series``),
segment it, download the DICOM-SEG from the Download tab and read it back with highdicom (segments, referenced
series and instances). Needs Debian's ``chromium``; skipped with a reason otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_support import ARTIFACTS, streamlit_server, wait_idle, wait_ready

from universal import app_logic as al

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def server():
    if not (DATA / "ts_dicom_series" / "dicom").is_dir():
        pytest.skip(
            f"{DATA / 'ts_dicom_series'} is absent: the DICOM sample needs ../shared beside the project"
        )
    with streamlit_server(
        env={"UNIVERSAL_DATA_DIR": str(DATA)}, log_name="browser_exports_streamlit.log"
    ) as url:
        yield url


def test_the_dicom_sample_downloads_a_dicom_seg_that_references_its_series(server, browser, tmp_path):
    import highdicom as hd
    from playwright.sync_api import expect

    from universal import exports
    from universal.io import load_volume

    sample = {s.key: s for s in al.list_samples(DATA)}["ts_dicom_series"]
    label = sample.label
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    try:
        page.goto(server, wait_until="domcontentloaded")
        wait_ready(page)
        page.locator(".st-key-sample").click()
        page.get_by_role("option", name=label).click()
        expect(page.get_by_text(sample.description[:40], exact=False)).to_be_visible(timeout=30_000)
        wait_idle(page, 120_000)
        wait_ready(page, 120_000)
        page.locator(".st-key-run button").click()
        page.get_by_text("Segmented", exact=False).first.wait_for(state="visible", timeout=400_000)
        wait_idle(page, 120_000)

        page.get_by_role("tab", name="Download").click()
        button = page.locator(".st-key-dl_dicom-seg button")
        expect(button).to_be_visible(timeout=60_000)
        expect(page.locator(".st-key-dl_rtstruct button")).to_be_visible()
        expect(page.locator(".st-key-dl_seg_nrrd button")).to_be_visible()
        expect(page.locator(".st-key-dl_report_html button")).to_be_visible()
        expect(page.locator('[data-testid="stException"]')).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "browser_exports_download.png"))
        with page.expect_download(timeout=180_000) as info:
            button.click()
        assert info.value.suggested_filename.endswith("_seg.dcm")
        path = tmp_path / "seg.dcm"
        info.value.save_as(path)
    finally:
        page.close()
    seg = hd.seg.segread(path)
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert "liver" in labels and len(labels) >= 2
    assert all(
        seg.get_segment_description(i + 1).segmented_property_category.meaning
        in ("Anatomical Structure", "Morphologically Abnormal Structure")
        for i in range(len(labels))
    )
    volume = load_volume(DATA / "ts_dicom_series" / "dicom")
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == exports.dicom_references(volume).series_uid
    source = {str(h.file_meta.MediaStorageSOPInstanceUID) for h in volume.source.headers}
    assert {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence} == source
