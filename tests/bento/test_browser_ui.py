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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for the tests
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def upload(browser, url: str, path: Path, load: bool = True) -> None:
    if load:
        browser.get(f"{url}/ui")
    chooser = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].value = ''", chooser)  # the same file again is a change
    chooser.send_keys(str(path))


def console_errors(browser) -> list[dict]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def shown(browser, element_id: str):
    return WebDriverWait(browser, 30).until(
        expected_conditions.visibility_of_element_located((By.ID, element_id))
    )


def test_uploading_a_digit_shows_its_label(browser, server, heldout, tmp_path, artifacts):
    image, truth = heldout[3]
    path = tmp_path / "digit.png"
    image.save(path)
    console_errors(browser)  # the log so far, emptied
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
    assert console_errors(browser) == []  # no favicon 404, nothing else


def test_a_picture_named_for_another_format_is_classified(browser, server, heldout, tmp_path):
    """The browser's type comes from the extension: a PNG saved as .jpg (a common download) was
    declared image/jpeg and refused with 415."""
    image, truth = heldout[5]
    path = tmp_path / "digit.jpg"
    image.save(path, format="PNG")
    upload(browser, server.url, path)
    shown(browser, "result")
    assert browser.find_element(By.ID, "label").text == str(truth)


def test_a_token_is_asked_for_refused_when_wrong_and_used_when_pasted(
    browser, trained_store, heldout, tmp_path, artifacts
):
    image, truth = heldout[4]
    path = tmp_path / "digit.png"
    image.save(path)
    env = {"API_TOKENS": "right-token"}
    with serve(trained_store, artifacts / "server-ui-token.log", env=env) as guarded:
        browser.get(f"{guarded.url}/ui")
        model = browser.find_element(By.ID, "model")
        WebDriverWait(browser, 30).until(lambda b: "needs an API token" in model.text)

        def paste(token: str) -> None:
            field = browser.find_element(By.ID, "token")
            browser.execute_script("arguments[0].closest('details').open = true", field)
            field.clear()
            field.send_keys(token)
            browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)

        upload(browser, guarded.url, path, load=False)
        assert "needs an API token" in shown(browser, "error").text
        paste("wrong-token")
        upload(browser, guarded.url, path, load=False)
        WebDriverWait(browser, 30).until(
            lambda b: "refused this API token" in b.find_element(By.ID, "error").text
        )
        paste("right-token")
        WebDriverWait(browser, 30).until(lambda b: "digits-cnn:v1" in model.text)
        upload(browser, guarded.url, path, load=False)
        shown(browser, "result")
        assert browser.find_element(By.ID, "label").text == str(truth)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 5  # /info was read
        paste("")  # emptied: no token is sent any more
        upload(browser, guarded.url, path, load=False)
        WebDriverWait(browser, 30).until(
            lambda b: "needs an API token" in b.find_element(By.ID, "error").text
        )


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
