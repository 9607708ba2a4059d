"""The web page in headless Chromium: it plays the first chunks while later ones are still generated.

Driven over the Chrome DevTools protocol with the `websockets` client the server already depends on
(no selenium / chromedriver needed). Saves docs/serve-screenshot.png.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve-screenshot.png"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900", "--remote-debugging-port=0"]


def chromium_binary() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class Page:
    """Just enough CDP: evaluate JavaScript, navigate, take screenshots."""

    def __init__(self, ws):
        self.ws = ws
        self._ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == i:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value


@pytest.fixture
def chromium(tmp_path):
    from websockets.sync.client import connect

    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
        with connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=None,
                     open_timeout=30) as ws:
            yield Page(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_page_plays_frames_before_generation_ends(serve, model_folder, chromium):
    server = serve(model_name=model_folder.name)
    page = chromium
    page.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
    page.call("Page.navigate", url=server.url + "/")
    page.wait("window.helios && window.helios.config !== null")
    assert page.js("document.getElementById('preset').options.length") >= 1
    page.js("""(() => {
        const set = (id, v) => {
            const el = document.getElementById(id);
            el.value = v;
            el.dispatchEvent(new Event('input'));
        };
        set('prompt', 'a red fox running through snow');
        set('frames', '1452'); set('height', '64'); set('width', '64'); set('steps', '1');
        document.getElementById('start').click();
    })()""")
    page.wait("window.helios.shown >= 12")  # half a second of video on screen
    # Playing, and the job is still generating: the server has made only some of its 44 chunks.
    [job] = server.worker.running_jobs()
    assert job.id == page.js("window.helios.job")
    assert job.state.value == "running" and job.chunks_done < job.request.chunks
    assert page.js("window.helios.state") == "running"
    page.wait("document.getElementById('st-chunks').textContent.includes('/44')")
    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(shot)
    assert job.finished.is_set() is False  # the screenshot was taken mid-generation

    # The page's own controls: steer, then stop; the download link then serves the mp4.
    page.js("""(() => { document.getElementById('steer').value = 'a blue dog';
                        document.getElementById('steer-send').click(); })()""")
    page.wait("[...document.querySelectorAll('#log li')].some(li => li.textContent.includes('a blue dog'))")
    page.js("document.getElementById('stop').click()")
    page.wait("window.helios.state === 'stopped'")
    href = page.wait("!document.getElementById('download').classList.contains('hidden') && "
                     "document.getElementById('download').getAttribute('href')")
    assert href == f"/api/jobs/{job.id}/video"
    size = page.js(f"fetch('{href}').then(r => r.ok ? r.blob().then(b => b.size) : -r.status)")
    assert size > 1000
    assert job.state.value == "stopped" and 0 < job.chunks_done < 44
