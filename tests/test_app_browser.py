"""``p2pz app`` in a real browser: headless Debian chromium uploads a PNG to the page the command serves,
waits for the edit and reads the shown image back; it must equal ``p2pz apply``'s output on the same PNG.

Slow tier: it starts the command (torch, the student) and a browser. ``.ci/install_chromium.sh`` installs
chromium and chromium-driver; without them the test is skipped with the reason.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_app import export_small_package, scene

from p2pz.cli.main import main

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# headless, and nothing that reaches the network (the machine's is closed)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,800",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(package: Path, port: int, *options: str) -> subprocess.Popen:
    """``p2pz app PACKAGE --port PORT`` as a user starts it; returns once it answers on 127.0.0.1."""
    command = [sys.executable, "-m", "p2pz", "app", str(package), "--port", str(port), "--device", "cpu"]
    command += options
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"p2pz app exited with {process.returncode}: {process.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail("p2pz app did not open its port within 120 s")


def chrome(profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, DRIVER):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is not installed (.ci/install_chromium.sh installs chromium and its driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))


@pytest.mark.slow
def test_the_page_edits_an_upload_like_p2pz_apply(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.perf_counter()
    (tmp_path / "pkg").mkdir()
    package = export_small_package(tmp_path / "pkg", edit="circle:square")
    photo = tmp_path / "photo.png"
    scene((96, 72)).save(photo)
    assert main(["apply", str(package), str(photo), "--out", str(tmp_path / "apply"), "--no-progress"]) == 0
    expected = np.asarray(Image.open(tmp_path / "apply" / "photo.png"))

    port = free_port()
    app = start_app(package, port)
    browser = None
    try:
        browser = chrome(tmp_path / "profile")
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
        assert "circle:square" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "output").get_attribute("data-done"))
        browser.save_screenshot(str(tmp_path / "app.png"))
        shown = browser.find_element(By.ID, "output").get_attribute("src")
        assert shown.startswith("data:image/png;base64,")
        edited = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))))
        assert np.array_equal(edited, expected)
        assert "ms in the model" in browser.find_element(By.ID, "latency").text
        assert browser.find_element(By.ID, "download").get_attribute("download") == "edit.png"
    finally:
        if browser is not None:
            browser.quit()
        app.terminate()
        app.wait(timeout=30)
    if os.environ.get("P2PZ_APP_SCREENSHOT"):  # docs/app.png is made this way
        shutil.copy(tmp_path / "app.png", os.environ["P2PZ_APP_SCREENSHOT"])
    print(f"browser test took {time.perf_counter() - started:.1f} s; screenshot {tmp_path / 'app.png'}")
