"""The exploration report as a user sees it: opened offline in headless Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install-system-deps.sh``, run by
``make test``). The driver is passed explicitly so that selenium never tries to download one.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # starts a browser and builds a report: ~15 s

CHROMEDRIVER = Path("/usr/bin/chromedriver")
SECTIONS = ("overview", "boxes-per-patient", "classes", "dicom", "samples", "box-analysis")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def driver():
    if not CHROMEDRIVER.exists() or _chromium() is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            pytest.fail("chromium/chromedriver missing although they can be installed: "
                        "run `bash scripts/install-system-deps.sh` (make test does)")
        pytest.skip("chromium/chromedriver not installed and cannot be (not root or no apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield browser
    browser.quit()


@pytest.fixture()
def real_report(real_eda_report) -> Path:
    return real_eda_report[0] / "report.html"


def _screenshot(browser, element=None) -> bytes:
    """A PNG of the whole page (or of one element), beyond the window height."""
    rect = browser.execute_script(
        "const e = arguments[0] || document.documentElement, r = e.getBoundingClientRect();"
        "return [r.left + scrollX, r.top + scrollY, r.width, r.height];", element)
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": rect[0], "y": rect[1], "width": rect[2], "height": rect[3], "scale": 1}})
    return base64.b64decode(shot["data"])


def test_report_opens_with_every_section_and_image(driver, real_report, tmp_path):
    from selenium.webdriver.common.by import By

    driver.set_window_size(1400, 1000)
    driver.get(real_report.as_uri())
    assert driver.title == "pneumodet — data exploration"

    ids = [s.get_attribute("id") for s in driver.find_elements(By.CSS_SELECTOR, "section.report-section")]
    assert set(SECTIONS) <= set(ids)
    toc = [a.get_attribute("href").rsplit("#", 1)[1] for a in driver.find_elements(By.CSS_SELECTOR, "nav.toc a")]
    assert toc == ids  # every section listed, in order, and every link has a target

    n_embedded = real_report.read_text(encoding="utf-8").count('src="data:image/png;base64,')
    widths = driver.execute_script(
        "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1)")
    assert len(widths) == n_embedded > 20  # charts plus the 16 real images' thumbnails
    assert all(w > 0 for w in widths), f"images that did not load: {[i for i, w in enumerate(widths) if w <= 0]}"

    samples = driver.find_element(By.ID, "samples")
    captions = [c.text for c in samples.find_elements(By.TAG_NAME, "figcaption")]
    assert captions and all("Target" in c and "CR" in c and "age" in c for c in captions)

    # the page never scrolls sideways: wide tables and the DICOM header scroll inside their boxes
    for width in (1400, 420):
        driver.set_window_size(width, 1000)
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"page wider than a {width}px window by {overflow}px"

    driver.set_window_size(1400, 1000)
    png = _screenshot(driver)
    (tmp_path / "report.png").write_bytes(png)
    page = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert page.shape[1] >= 1300 and page.shape[0] > 3000
    assert page.std() > 20  # drawn content, not a blank page
    for section_id in SECTIONS:
        shot = _screenshot(driver, driver.find_element(By.ID, section_id))
        (tmp_path / f"eda_{section_id}.png").write_bytes(shot)
        assert Image.open(io.BytesIO(shot)).height > 100
