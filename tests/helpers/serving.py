"""Helpers for the server tests (tests/serve, tests/serve_ray): a tiny job size, pipelines that
record their inputs or fail on request, polling a job, a live WebSocket session, reading its messages."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import httpx

SIZE = {"height": 64, "width": 64, "steps": 1}


class Spy:
    """The real pipeline, recording what the server hands to `stream` (the tiny random model's frames are
    near-grey whatever the input, so the inputs themselves are what shows the upload was used)."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return self._pipe.stream(prompt, **kwargs)


class Exploding:
    """The real pipeline, except that a prompt containing 'explode' raises inside the engine's second chunk."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, prompt, on_step=None, **kwargs):
        text = prompt.schedule.entries[0][1]

        def step(chunk, stage, i):
            if "explode" in text and chunk == 1:
                raise RuntimeError("the device caught fire")
            if on_step is not None:
                on_step(chunk, stage, i)

        return self._pipe.stream(prompt, on_step=step, **kwargs)


def page_client(url: str, **headers) -> httpx.Client:
    """An HTTP client of a server at `url` with its own client id (as a browser tab would have)."""
    c = httpx.Client(base_url=url, timeout=60, headers=headers)
    r = c.get("/api/config")
    assert r.status_code == 200, r.text
    c.headers["X-Helios-Client"] = r.json()["client"]
    return c


def wait_for(client: httpx.Client, job: str, states=("done", "stopped", "cancelled", "failed"),
             timeout: float = 120) -> dict:
    """Poll a job's status until it is in one of `states`."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/api/jobs/{job}").json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, f"job still {status['state']} after {timeout} s: {status}"
        time.sleep(0.1)


def wait_until(client: httpx.Client, job: str, predicate, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not predicate(status := client.get(f"/api/jobs/{job}").json()):
        assert status["state"] not in ("done", "stopped", "cancelled", "failed"), status
        assert time.monotonic() < deadline, f"gave up waiting: {status}"
        time.sleep(0.02)
    return status


@contextmanager
def live(server, client_id: str | None = None, **start):
    """A WebSocket session whose start message has been sent: yields (socket, accepted message)."""
    from websockets.sync.client import connect

    headers = {"X-Helios-Client": client_id} if client_id else {}
    # max_queue=None: a test that stops reading must still see the close handshake promptly.
    with connect(server.ws_url, additional_headers=headers, max_size=None, max_queue=None, open_timeout=20) as ws:
        upload = start.pop("upload_bytes", None)
        ws.send(json.dumps({"type": "start", **SIZE, **start}))
        if upload is not None:
            ws.send(upload)
        accepted = json.loads(ws.recv(timeout=60))
        yield ws, accepted


def next_json(ws, timeout: float = 120) -> dict:
    """The next JSON message, skipping binary frames."""
    deadline = time.monotonic() + timeout
    while True:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(message, str):
            return json.loads(message)


def next_matching(ws, predicate) -> dict:
    """The next JSON message for which predicate(message) holds, skipping the others."""
    while not predicate(message := next_json(ws)):
        pass
    return message


def assert_wait_cancels_on_hang_up(client: httpx.Client, size: dict, connect_s: float, read_s: float,
                                   settle_s: float) -> None:
    """A `?wait=1` job whose client gives up waiting (read timeout after read_s) ends `cancelled` with
    "the client disconnected" before its last chunk (within settle_s)."""
    import pytest

    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes its connection
        client.post("/api/jobs?wait=1", json={"prompt": "a green dog", "frames": 33 * 40, **size},
                    timeout=httpx.Timeout(connect_s, read=read_s))
    [job] = client.get("/api/jobs").json()["jobs"]
    status = wait_for(client, job["job"], timeout=settle_s)
    assert status["state"] == "cancelled" and status["error"] == "the client disconnected", status
    assert status["chunks_done"] < 40
