"""`helios serve`: start the engines once, then run the app under uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from helios.serve.limits import Limits, check_bind, is_loopback

log = logging.getLogger("helios.serve")


def run_server(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
               device: str = "cpu", devices: Sequence[Sequence[str]] | None = None, dtype: str = "auto",
               limits: Limits | None = None, workdir: str | Path | None = None, fps: int = 24,
               memory: str | None = None,
               preview_decoder: str | Path | None = None, deterministic: bool = False) -> None:
    """Blocks until the server is stopped (Ctrl-C). Raises ValueError for a host/token combination
    that would expose the GPU without a token, or a bad dtype, before anything is loaded.

    devices: device groups, one engine each (serve.engines.device_groups builds them for --gpus);
    default: one engine on `device`. Raises EngineStartError when an engine group does not start.
    memory: each one-GPU engine's memory budget (helios.engine.memory), e.g. "24gb".
    deterministic: every engine loaded with `load_pipeline(deterministic=True)` (kernel choices by rule; docs/memory.md).
    """
    token = token or None
    check_bind(host, token)
    import uvicorn

    from helios.serve.app import create_app
    from helios.serve.engines import load_engines

    groups = [list(g) for g in devices] if devices is not None else [[device]]
    limits = limits or Limits()
    log.info("loading %s: %d engine(s) on %s", model, len(groups), " | ".join(",".join(g) for g in groups))
    engines = load_engines(model, groups, dtype, memory, preview_decoder=preview_decoder,
                           deterministic=deterministic)
    try:
        app = create_app(engines=engines, limits=limits, token=token, workdir=workdir, fps=fps,
                         model_name=Path(model).name)
        shown = f"[{host}]" if ":" in host else host
        log.info("serving on http://%s:%d/%s", shown, port, "" if is_loopback(host) else "?token=<token>")
        # One message may carry an uploaded image or video on the live socket.
        uvicorn.run(app, host=host, port=port, ws_max_size=limits.max_upload_bytes + (1 << 20), log_level="info",
                    timeout_graceful_shutdown=10)
    finally:
        for engine in engines:
            engine.close()
