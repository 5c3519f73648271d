"""The reports as a user sees them: opened offline in headless Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install-system-deps.sh``, run by
``make test``). The driver is passed explicitly so that selenium never tries to download one.

Screenshots go to the test's temporary folder, or to ``$PNEUMODET_SCREENSHOTS`` when set (to look at them).
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


# ---------------------------------------------------------------- every report's pictures at their displayed size
#: The smallest text, in CSS pixels on screen, a chart may show (the pictures' ``data-min-text-px`` scaled by
#: how much the page shrinks them).
MIN_TEXT_PX = 11.0
#: Window widths checked: a common desktop and a common laptop.
WINDOW_WIDTHS = (1400, 1280)


@pytest.fixture(scope="module")
def trained_run(synth_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real run (2 epochs, 64 px, resnet18) with its best model: the run report shows predictions."""
    from pneumodet.config import TrainConfig
    from pneumodet.data.rsna import load_rsna
    from pneumodet.data.split import split_patients, write_split
    from pneumodet.training import train

    root = tmp_path_factory.mktemp("report_runs")
    split = root / "split"
    write_split(split_patients(load_rsna(synth_dataset).records, val=0.2, test=0.2, seed=1), split,
                source=str(synth_dataset))
    config = TrainConfig.with_recipe("default", data_dir=str(synth_dataset), split_dir=str(split),
                                     out_dir=str(root / "resnet18_light"), cache_dir=str(root / "cache"),
                                     encoder="resnet18", image_size=64, batch_size=8, epochs=2, num_workers=0,
                                     aug="light", checkpoint_every_n_steps=0, precision="32-true", lr=1e-3)
    train(config, progress=False)
    return root / "resnet18_light"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(os.environ.get("PNEUMODET_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_report(trained_run: Path) -> Path:
    from pneumodet.reports.runs import write_run_report

    return write_run_report(trained_run, samples=8)


def _comparison_report(trained_run: Path) -> Path:
    """The real run and three made-up ones differing in encoder and augmentation (the case that drew four
    one-point panels), one sharing the real run's augmentation so that a per-factor view has two lines."""
    from _runs_helpers import fake_run
    from pneumodet.reports.runs import compare_runs

    root = trained_run.parent / "fakes"
    runs = [trained_run] + [fake_run(root, encoder, aug, epochs=6, seed=i, template=trained_run)
                            for i, (encoder, aug) in enumerate([("resnet50", "heavy"), ("se_resnext50", "light"),
                                                                ("pnasnet5", "heavy_with_rotations")])]
    return compare_runs(runs, trained_run.parent / "comparison").report


@pytest.mark.parametrize("which", ["run", "comparison", "eda"])
def test_every_picture_is_readable_at_the_size_the_page_shows_it(driver, which, trained_run, real_eda_report,
                                                                 shots) -> None:
    """Each ``<img>`` loaded, never shown larger than drawn (a blurred, upscaled picture), and every chart's
    smallest text at least ``MIN_TEXT_PX`` tall on screen; the page never scrolls sideways. Screenshots of
    the whole page and of each picture are saved."""
    from selenium.webdriver.common.by import By

    report = {"run": lambda: _run_report(trained_run), "comparison": lambda: _comparison_report(trained_run),
              "eda": lambda: real_eda_report[0] / "report.html"}[which]()
    for width in WINDOW_WIDTHS:
        driver.set_window_size(width, 1000)
        driver.get(report.as_uri())
        pictures = driver.execute_script(
            "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
            "natural: i.naturalWidth, shown: i.getBoundingClientRect().width - 2, "  # less the 1 px border
            "text: i.dataset.minTextPx ? parseFloat(i.dataset.minTextPx) : null}))")
        assert pictures and all(p["complete"] and p["natural"] > 0 for p in pictures), pictures
        charts = [p for p in pictures if p["text"] is not None]  # the others are photos, without text
        assert charts, f"the {which} report holds no chart"
        upscaled = [p["alt"] for p in pictures if p["shown"] > p["natural"] + 0.5]
        assert not upscaled, f"{which} report at {width}px: pictures shown larger than drawn: {upscaled}"
        small = {p["alt"]: round(p["text"] * p["shown"] / p["natural"], 1) for p in charts
                 if p["text"] * p["shown"] / p["natural"] < MIN_TEXT_PX}
        assert not small, f"{which} report at {width}px: smallest text on screen (px) under {MIN_TEXT_PX}: {small}"
        overflow = driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"{which} report wider than a {width}px window by {overflow}px"
        page = _screenshot(driver)
        (shots / f"{which}_{width}.png").write_bytes(page)
        assert np.asarray(Image.open(io.BytesIO(page)).convert("L")).std() > 20  # drawn, not blank
        if width == WINDOW_WIDTHS[0]:
            for i, element in enumerate(driver.find_elements(By.CSS_SELECTOR, "img[data-min-text-px]")):
                (shots / f"{which}_chart{i:02d}.png").write_bytes(_screenshot(driver, element))
