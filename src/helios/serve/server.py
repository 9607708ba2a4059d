"""`helios serve`: load the pipeline once, then run the app under uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

from helios.serve.limits import Limits, check_bind, is_loopback

log = logging.getLogger("helios.serve")


def run_server(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
               device: str = "cpu", dtype: str = "auto", limits: Limits | None = None,
               workdir: str | Path | None = None, fps: int = 24) -> None:
    """Blocks until the server is stopped (Ctrl-C). Raises ValueError for a host/token combination
    that would expose the GPU without a token, before anything is loaded."""
    token = token or None
    check_bind(host, token)
    import torch
    import uvicorn

    from helios.engine.pipeline import load_pipeline
    from helios.serve.app import create_app

    torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype}")
    limits = limits or Limits()
    log.info("loading %s on %s", model, device)
    pipe = load_pipeline(model, dtype=torch_dtype, device=device)
    app = create_app(pipe, limits=limits, token=token, workdir=workdir, fps=fps, model_name=Path(model).name)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving on http://%s:%d/%s", shown, port, "" if is_loopback(host) else "?token=<token>")
    # One message may carry an uploaded image or video on the live socket.
    uvicorn.run(app, host=host, port=port, ws_max_size=limits.max_upload_bytes + (1 << 20), log_level="info",
                timeout_graceful_shutdown=10)
