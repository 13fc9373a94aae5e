"""`hf-vitseg app` in a real browser (issue 12 item 5): headless Chromium loads the page, uploads an image, waits
for the result and checks it against the Python-level prediction; the screenshot is docs/app.png
(refreshed with `HF_VITSEG_UPDATE_SCREENSHOTS=1`).

Chromium is Debian's package (`apt-get install chromium`, which `.ci/run` installs); nothing is downloaded at test
time. It is driven through the DevTools protocol over a pipe (`--remote-debugging-pipe`: NUL-terminated JSON on file
descriptors 3 and 4), so no driver and no websocket library are needed. The page must load offline: every request
the browser makes goes to the app's own server.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

if importlib.util.find_spec("gradio") is None:  # found, not imported: the app's own process imports it
    pytest.skip("the web app's optional dependency gradio (the dev extra installs it)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "app.png"
CHROMIUM = next(filter(None, (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome"))), None)
if CHROMIUM is None:
    if os.environ.get("HF_VITSEG_REQUIRE_BROWSER") == "1":  # set by .ci/run, which installs Debian's chromium
        raise RuntimeError("HF_VITSEG_REQUIRE_BROWSER=1 but no Chromium: apt-get install chromium (.ci/run does).")
    pytest.skip("no Chromium on this machine (apt-get install chromium); CI installs it", allow_module_level=True)


class DevTools:
    """A headless Chromium driven by the DevTools protocol over `--remote-debugging-pipe`."""

    def __init__(self, profile: Path, size=(1280, 960)):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def pipes_as_3_and_4():  # in the child: the protocol's fixed descriptors
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "about:blank"]
        self.process = subprocess.Popen([CHROMIUM, *flags], preexec_fn=pipes_as_3_and_4, close_fds=False,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _read(self):
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._changed:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self._changed.notify_all()

    def call(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        with self._changed:
            if not self._changed.wait_for(lambda: self._next_id in self._replies, timeout=timeout):
                raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
            reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def page(self, method: str, **params) -> dict:
        return self.call(method, session=True, **params)

    def evaluate(self, expression: str):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        text = self.evaluate("document.body.innerText")
        raise TimeoutError(f"{what}: not there after {timeout} s; page text: {text!r}")

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_browser)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served_app(tmp_path):
    """`hf-vitseg app FOLDER --port N` in its own process on a tiny saved model; yields `(url, folder, wait)`, where
    `wait()` returns once the page answers (the test computes its expectations meanwhile)."""
    from hf_vitseg import ViTSegImageProcessor

    folder = tmp_path / "tiny-nuclei-model"  # the page's title
    tiny_model(num_labels=3, id2label={0: "background", 1: "nucleus", 2: "border"}).save_pretrained(folder)
    ViTSegImageProcessor(patch_size=8).save_pretrained(folder)
    port = free_port()
    log = (tmp_path / "app.log").open("w")
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, "-c", "import sys; from hf_vitseg.cli import main; sys.exit(main())",
                               "app", str(folder), "--port", str(port), "--device", "cpu"],
                              stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}/"

    def wait():
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"hf-vitseg app exited: {(tmp_path / 'app.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no page at {url}: {(tmp_path / 'app.log').read_text()}") from None
                time.sleep(0.3)

    try:
        yield url, folder, wait
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_the_page_segments_an_uploaded_image_offline(served_app, tmp_path):
    url, folder, wait = served_app
    from hf_vitseg.inference.app import SegmentationApp

    image_path = tmp_path / "cells.png"
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 192 x 256 blocks
    Image.fromarray(pixels).save(image_path)
    expected = SegmentationApp.from_pretrained(folder).predict(image_path)  # what the page must show
    wait()

    with tempfile.TemporaryDirectory(prefix="hf_vitseg_chromium_") as profile:
        browser = DevTools(Path(profile))
        try:
            browser.page("Network.enable")
            browser.page("Page.enable")
            browser.page("Page.navigate", url=url)
            file_input = "#hf-vitseg-input input[type=file]"
            browser.wait_for(f"document.querySelector({file_input!r}) !== null", 30, "the upload field")
            root = browser.page("DOM.getDocument")["root"]["nodeId"]
            node = browser.page("DOM.querySelector", nodeId=root, selector=file_input)["nodeId"]
            browser.page("DOM.setFileInputFiles", nodeId=node, files=[str(image_path)])

            # the result: the area table's rows, the overlay image, the label map download, the status line
            table = browser.wait_for(
                "(() => { const rows = [...document.querySelectorAll('#hf-vitseg-areas div[role=row][data-index]')]"
                ".map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()));"
                " return rows.length && rows[0].length >= 5 && rows[0][3] !== '' ? rows : null })()",
                40, "the area table")
            overlay_loaded = browser.wait_for(
                "(() => { const img = document.querySelector('#hf-vitseg-overlay img');"
                " return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null })()",
                20, "the overlay image")
            download = browser.wait_for(
                "(() => { const a = document.querySelector('#hf-vitseg-label-map a');"
                " return a ? a.href : null })()", 20, "the label map download")
            status = browser.evaluate("document.querySelector('#hf-vitseg-status').innerText")
            screenshot = browser.page("Page.captureScreenshot", format="png")["data"]
        finally:
            browser.close()

    rows = [row[:5] for row in table if any(row)]
    assert [[int(r[0]), r[1], r[2], int(r[3]), float(r[4])] for r in rows] == expected.areas
    assert sum(int(r[3]) for r in rows) == 192 * 256
    assert overlay_loaded[0] == expected.overlay.width and overlay_loaded[1] == expected.overlay.height
    assert download.endswith("/cells_labels.png")
    with urllib.request.urlopen(download, timeout=10) as response:  # the file the page offers
        served = Image.open(response)
        served.load()
    np.testing.assert_array_equal(np.asarray(served), expected.label_map)
    assert "256 x 192 pixels" in status and f"{len(rows)} classes present" in status

    # offline: the browser asked only the app's own server (and data: / blob: URLs) for anything
    requested = {event["params"]["request"]["url"] for event in browser.events
                 if event.get("method") == "Network.requestWillBeSent"}
    foreign = {u for u in requested if not u.startswith((url.rstrip("/"), "data:", "blob:", "about:"))}
    assert requested and not foreign, f"requests beyond the app's server: {sorted(foreign)[:5]}"

    # the screenshot shows the page with its result (not a blank or error page); docs/app.png is refreshed on request
    shot = tmp_path / "app.png"
    shot.write_bytes(base64.b64decode(screenshot))
    with Image.open(shot) as picture:
        colors = picture.convert("RGB").getcolors(1 << 20) or ()
        assert picture.width == 1280 and picture.height > 600 and len(colors) > 100
    if os.environ.get("HF_VITSEG_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    assert SCREENSHOT.is_file(), "docs/app.png: run with HF_VITSEG_UPDATE_SCREENSHOTS=1 to write it"
