"""The page at / in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium).

Load the page, pick an image, ask, read the streamed answer from the page, and check the anchors were
drawn over the image (yellow outlines on the canvas, as --show-anchors draws them). The screenshot goes to
test-artifacts/serve-page.png (ATTANCHOR_TEST_ARTIFACTS to put it elsewhere).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serve_helpers import ServeProcess, expected_answer

# Headless Chromium on a closed network: no sandbox (root in CI), no GPU, none of its background calls.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900"]
ARTIFACTS = Path(os.environ.get("ATTANCHOR_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))

# Yellow outline pixels (255, 220, 0) on the canvas: the anchors' boxes.
COUNT_OUTLINE = """
const c = document.getElementById('view'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) if (d[i] > 240 && d[i + 1] > 200 && d[i + 1] < 240 && d[i + 2] < 30) n++;
return n;
"""


def browser(profile: Path, log: Path):
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them (.ci/run): missing there is a failure, not a skip
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver, log_output=str(log)), options=options)


def test_page_answers_and_draws_the_anchors(tiny_vqa_fp32, tmp_path):
    from attanchor_runtime import Pipeline
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from attanchor_export.demo import demo_item

    item = demo_item()  # "what color is the triangle?": its colour and shape words are anchored
    expected, anchors = expected_answer(Pipeline.load(tiny_vqa_fp32), item.question, item.image)
    assert anchors, "the check needs a question with anchors"
    server = ServeProcess(tiny_vqa_fp32, log=tmp_path / "serve.log")
    driver = browser(tmp_path / "profile", tmp_path / "chromedriver.log")
    try:
        driver.get(f"{server.url}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: tiny_vqa_fp32.name in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(item.image))
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        driver.find_element(By.ID, "question").send_keys(item.question)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        status = driver.find_element(By.ID, "status").text
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", status
        assert driver.find_element(By.ID, "answer").text == expected
        canvas = driver.find_element(By.ID, "view")
        assert canvas.get_attribute("data-anchors") == str(len(anchors))
        assert driver.execute_script(COUNT_OUTLINE) > 200  # at least one outlined patch
        for anchor in anchors:
            assert f"{anchor['token']} → ({anchor['row']}, {anchor['col']})" in driver.find_element(By.ID, "anchors").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "serve-page.png"))
        browser_errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not browser_errors, browser_errors
    finally:
        driver.quit()
        assert server.stop() == 0
