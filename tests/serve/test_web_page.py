"""The web page in a real headless browser (Debian's chromium via Selenium) against a real server: connect with
a key, search by pasted values and by an uploaded image and see the results, enrol and verify."""

import shutil
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@contextmanager
def live_server(asgi):
    """The app served by uvicorn on a free loopback port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=DriverService(DRIVER), options=options)
    except Exception as exc:  # noqa: BLE001 - a browser that cannot start here is a skip, not a failure
        pytest.skip(f"chromium does not start here: {str(exc).splitlines()[0]}")
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _wait_text(driver, element_id, contains, timeout=20):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: contains in d.find_element(By.ID, element_id).text)
    return driver.find_element(By.ID, element_id).text


def test_search_enrol_and_verify_in_a_real_browser(make_client, digits, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    X, y = digits
    client = make_client()
    client("POST", "/v1/collections", json={"name": "digits"})
    items = [{"id": f"d{i}", "input": X[i].tolist(), "label": str(y[i]), "metadata": {"digit": int(y[i])}} for i in range(150)]
    client("POST", "/v1/collections/digits/items", scope="write", json={"items": items[:100]})
    client("POST", "/v1/collections/digits/items", scope="write", json={"items": items[100:]})
    client("POST", "/v1/galleries", json={"name": "people"})
    held_out = [i for d in range(10) for i in np.flatnonzero(y == d)[40:46]]
    client("POST", "/v1/galleries/people/calibrate",
           json={"samples": [{"input": X[i].tolist(), "label": str(y[i])} for i in held_out], "target_far": 0.05})
    with live_server(client.asgi) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "key").send_keys(client.keys["admin"])
        browser.find_element(By.ID, "connect").click()
        assert "64 dimensions" in _wait_text(browser, "info", "connected")
        Select(browser.find_element(By.ID, "collection")).select_by_value("digits")
        # search by pasted raw values: digit 7's own row comes first, at distance ~0
        browser.find_element(By.ID, "query-values").send_keys(", ".join(f"{v:g}" for v in X[7]))
        browser.find_element(By.ID, "search").click()
        assert _wait_text(browser, "search-status", "results") == "5 results"
        rows = browser.find_elements(By.CSS_SELECTOR, "#results tr.result")
        first = [td.text for td in rows[0].find_elements(By.TAG_NAME, "td")]
        assert len(rows) == 5 and first[2] == "d7" and float(first[3]) < 1e-3 and first[4] == str(y[7])
        # search by an uploaded image (an 8×8 digit scaled to 0-255, as the run's pixels are 0-16)
        image = tmp_path / "seven.png"
        Image.fromarray((X[7].reshape(8, 8) * 255 / 16).astype(np.uint8)).save(image)
        browser.find_element(By.ID, "query-values").clear()
        browser.find_element(By.ID, "query-image").send_keys(str(image))
        browser.find_element(By.ID, "search").click()
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "search-status").text == "5 results")
        # an error is shown, not swallowed
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys("0")
        browser.find_element(By.ID, "search").click()
        assert "k must be" in _wait_text(browser, "search-status", "k must be")
        # enrol identity "3" with one sample, then verify another 3 (accepted) through the page
        Select(browser.find_element(By.ID, "gallery")).select_by_value("people")
        browser.find_element(By.ID, "identity").send_keys("3")
        threes = np.flatnonzero(y == 3)
        browser.find_element(By.ID, "face-values").send_keys(", ".join(f"{v:g}" for v in X[threes[0]]))
        browser.find_element(By.ID, "enroll").click()
        assert "enrolled 1 sample(s) of 3" in _wait_text(browser, "gallery-status", "enrolled")
        box = browser.find_element(By.ID, "face-values")
        box.clear()
        box.send_keys(", ".join(f"{v:g}" for v in X[threes[1]]))
        browser.find_element(By.ID, "verify").click()
        verdict = _wait_text(browser, "gallery-status", "distance")
        assert verdict.startswith("accepted") or verdict.startswith("rejected")
        expected = client("POST", "/v1/galleries/people/verify", scope="read",
                          json={"identity": "3", "probe": {"input": X[threes[1]].tolist()}}).json()
        assert verdict.startswith("accepted" if expected["accepted"] else "rejected")
        assert f"{expected['distance']:.4f}" in verdict
