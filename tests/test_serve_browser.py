"""The review page as a user sees it: headless Chromium against a live ``pneumodet serve`` app.

Real RSNA sample DICOMs are chosen in the page's file input (as a user would), the page's drawn boxes
(exposed on each canvas as ``data-boxes``) are compared with the API's own answer for the same file, the
threshold slider is moved with the keyboard and the boxes re-filtered, the JSON is downloaded, and a
screenshot is kept (in the test's folder, and as ``docs/images/serve_page.png`` for the README).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from _helpers import assert_same_detections
from _serve_helpers import THRESHOLD, LiveServer, dicom_files, make_served_run, parts, wait_for
from pneumodet.serve import ServedModel, ServeSettings, create_app
from test_report_browser import _screenshot, driver  # noqa: F401 - the same headless Chromium fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DOCS_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "images" / "serve_page.png"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    run = make_served_run(tmp_path_factory.mktemp("served"))
    app = create_app(ServedModel(run, device="cpu", precision="fp32"), ServeSettings(max_batch=4, max_wait_ms=10))
    with LiveServer(app) as server:
        yield server


def _xyxy(rows) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    return np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1), rows[:, 4]


def _api_rows(answer: dict, threshold: float) -> list[list[float]]:
    return [[*box, score] for box, score in zip(answer["boxes"], answer["scores"], strict=True) if score >= threshold]


def _cards(browser) -> list[dict]:
    return browser.execute_script("""
        return [...document.querySelectorAll('article.result')].map(a => ({
            file: a.dataset.file, state: a.dataset.state, count: a.dataset.boxCount,
            patient: a.dataset.patientId || null, message: a.querySelector('.message').textContent,
            boxes: a.querySelector('canvas').dataset.boxes || null,
            probs: [...a.querySelectorAll('.prob')].map(p => [p.dataset.className, Number(p.dataset.probability)]),
            drawn: a.querySelector('canvas').width}));""")


def test_review_page_draws_the_api_boxes_and_filters_them(driver, live, real_sample, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    files = dicom_files(real_sample)[:2]
    broken = tmp_path / "not_a_dicom.dcm"
    broken.write_bytes(b"patientId,x,y\n" * 20)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    driver.set_window_size(1400, 1000)
    driver.get(live.url + "/")
    assert driver.title == "pneumodet — review"
    wait_for(lambda: driver.find_element(By.ID, "model").get_attribute("data-threshold"), 60, "the model card")
    assert float(driver.find_element(By.ID, "threshold").get_attribute("value")) == THRESHOLD
    assert "resnet18" in driver.find_element(By.ID, "model").text

    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in [*files, broken]))
    wait_for(lambda: all(c["state"] != "pending" for c in _cards(driver)) and len(_cards(driver)) == 3, 120,
             "every file answered")
    cards = {c["file"]: c for c in _cards(driver)}
    assert cards[broken.name]["state"] == "error"
    assert "HTTP 422" in cards[broken.name]["message"] and broken.name in cards[broken.name]["message"]

    with httpx.Client(base_url=live.url, timeout=120) as client:
        api = {p.name: client.post("/v1/predict?threshold=0", files=parts(p)).json()["images"][0] for p in files}
    for path in files:
        card, answer = cards[path.name], api[path.name]
        assert card["state"] == "done" and card["patient"] == answer["patientId"] and card["drawn"] > 100
        drawn = json.loads(card["boxes"])
        assert int(card["count"]) == len(drawn) == len(_api_rows(answer, THRESHOLD)) > 0
        assert_same_detections(*_xyxy(drawn), *_xyxy(_api_rows(answer, THRESHOLD)), box_atol=0.5, score_atol=2e-4)
        np.testing.assert_allclose([p for _, p in card["probs"]], list(answer["class_probs"].values()), atol=1e-4)

    # the slider filters on the page: one step up hides the boxes under the new threshold
    slider = driver.find_element(By.ID, "threshold")
    slider.send_keys(Keys.ARROW_RIGHT)
    moved = float(slider.get_attribute("value"))
    assert moved == pytest.approx(THRESHOLD + 0.01)
    assert driver.find_element(By.ID, "threshold-value").text == f"{moved:.2f}"
    for path in files:
        card = {c["file"]: c for c in _cards(driver)}[path.name]
        drawn, want = json.loads(card["boxes"]), _api_rows(api[path.name], moved)
        assert int(card["count"]) == len(drawn) == len(want) < len(_api_rows(api[path.name], THRESHOLD))
        assert_same_detections(*_xyxy(drawn), *_xyxy(want), box_atol=0.5, score_atol=2e-4)

    driver.find_element(By.ID, "download").click()
    saved = tmp_path / "pneumodet_predictions.json"
    wait_for(saved.exists, 30, "the downloaded JSON")
    downloaded = json.loads(saved.read_text())
    assert downloaded["threshold"] == pytest.approx(moved) and downloaded["run_threshold"] == THRESHOLD
    assert [i["file"] for i in downloaded["images"]] == [p.name for p in files]
    assert all("preview" not in i and min(i["scores"], default=1) >= moved for i in downloaded["images"])

    png = _screenshot(driver)
    (tmp_path / "serve_page.png").write_bytes(png)
    page = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert page.shape[1] >= 1300 and page.std() > 20  # drawn images, not a blank page
    assert not driver.find_element(By.ID, "auth").is_displayed()  # no token asked for: the service has none
    DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "serve_page.png", DOCS_IMAGE)
