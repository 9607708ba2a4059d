"""Serve tests: one tiny model, and real uvicorn servers on 127.0.0.1 in a thread, one per test.

The model folder comes from the `model_folder` fixture only, so swapping in the bundled small model
is a one-line change. Jobs in these tests use 64x64 frames and one step per pyramid stage.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers.serving import page_client




@pytest.fixture(scope="session")
def model_folder() -> Path:
    """The small model shipped in the package (base, 64x64: 20 steps, CFG 2)."""
    from helios.cli import default_model

    return default_model()


@pytest.fixture(scope="session")
def pipe(model_folder):
    from helios.engine.pipeline import load_pipeline

    return load_pipeline(model_folder)


class LiveServer:
    """A uvicorn server for one app, on a free loopback port, run in a thread."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.ws_url = f"ws://{host}:{self.port}/ws"
        self._sock = sock
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=8 << 20,
                                                     timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def worker(self):
        return self.app.state.server.worker

    def start(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    def client(self, **headers) -> httpx.Client:
        """An HTTP client with its own client id (as a browser tab would have)."""
        return page_client(self.url, **headers)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.worker.stats()["running"] or self.worker.stats()["queued"]:
            assert time.monotonic() < deadline, f"the worker is still busy: {self.worker.stats()}"
            time.sleep(0.05)


@pytest.fixture
def serve(pipe, tmp_path):
    """serve(**create_app kwargs) -> a started LiveServer; all are stopped after the test."""
    from helios.serve.app import create_app

    servers = []

    def start(**kwargs) -> LiveServer:
        kwargs.setdefault("workdir", tmp_path / "serve")
        if "engines" not in kwargs:  # (engines= serves those instead of the one pipeline)
            kwargs["pipe"] = kwargs.pop("pipeline", pipe)
        server = LiveServer(create_app(**kwargs)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(serve) -> LiveServer:
    return serve()
