"""The browser page (/ui) in headless Chromium: upload a digit, read the answer off the page."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from loadtest.servers import serve
from tests.model_store import import_model
from tests.onnx_models import build_onnx_classifier

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")  # both installed by `make test` (Debian packages)


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # The flags the machine notes prescribe: no sandbox as root, and no background networking
    # (this machine's closed network refuses it, many connections at a time).
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,900",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def upload(browser, url: str, path: Path) -> None:
    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "file").send_keys(str(path))


def test_uploading_a_digit_shows_its_label(browser, server, heldout, tmp_path, artifacts):
    image, truth = heldout[3]
    path = tmp_path / "digit.png"
    image.save(path)
    upload(browser, server.url, path)
    wait = WebDriverWait(browser, 30)
    wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
    assert browser.find_element(By.ID, "label").text == str(truth)
    assert browser.find_element(By.ID, "version").text == "digits-cnn:v1"
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 5 and bars[0].find_element(By.CLASS_NAME, "name").text == str(truth)
    assert float(browser.find_element(By.ID, "latency").text) > 0
    assert browser.find_element(By.ID, "preview").is_displayed()
    wait.until(lambda b: "digits-cnn:v1" in b.find_element(By.ID, "model").text)
    browser.save_screenshot(str(artifacts / "ui-prediction.png"))


def test_a_bad_file_is_explained_in_words(browser, server, tmp_path, artifacts):
    path = tmp_path / "notes.png"
    path.write_text("these are notes, not a picture")
    upload(browser, server.url, path)
    error = WebDriverWait(browser, 30).until(
        expected_conditions.visibility_of_element_located((By.ID, "error"))
    )
    assert "UNSUPPORTED_MEDIA_TYPE" in error.text and "not a supported image" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()
    browser.save_screenshot(str(artifacts / "ui-error.png"))


def test_a_model_with_fewer_than_five_labels_shows_all_of_them(browser, tmp_path, artifacts):
    # The page asked every model for its top 5: a 3-label model refused each upload with 400.
    home = tmp_path / "home"
    import_model(home, build_onnx_classifier(tmp_path / "three", labels=3), "three-labels:v1")
    path = tmp_path / "picture.png"
    Image.new("L", (28, 28), 128).save(path)
    env = {"MODEL_TAG": "three-labels:v1", "SERVED_MODEL_FILE": str(tmp_path / "none.json")}
    with serve(home, artifacts / "server-three-labels.log", env=env) as three:
        upload(browser, three.url, path)
        WebDriverWait(browser, 30).until(
            expected_conditions.visibility_of_element_located((By.ID, "result"))
        )
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 3
