"""The live streaming server: one loaded pipeline, a job queue, HTTP + WebSocket API and a web page.

    helios serve --model PATH [--host 127.0.0.1] [--port 8000] [--token T]

See docs/serving.md for the protocol.
"""

from helios.serve.limits import Limits, RequestError, check_bind, is_loopback


def create_app(*args, **kwargs):
    """See helios.serve.app.create_app (imported lazily: FastAPI is an optional dependency)."""
    from helios.serve.app import create_app as _create

    return _create(*args, **kwargs)


def run_server(*args, **kwargs) -> None:
    """See helios.serve.server.run_server."""
    from helios.serve.server import run_server as _run

    _run(*args, **kwargs)


__all__ = ["Limits", "RequestError", "check_bind", "is_loopback", "create_app", "run_server"]
