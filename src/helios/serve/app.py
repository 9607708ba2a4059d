"""The ASGI app: HTTP job API, the /ws live session, and the web page, around one Worker (its queue
and engines).

Every /api route and /ws needs the token when the server has one; every job route answers only
the client that made the job (anyone else gets the same 404 as for a job that never existed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from fastapi import Depends, FastAPI, Request, Response, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from helios.model_folder import CHUNK_FRAMES
from helios.serve.auth import ClientIds, authorized, same_origin
from helios.serve.bodies import FORM_SLACK, LimitedReceive, check_length, json_body
from helios.serve.engines import Engine
from helios.serve.jobs import FINAL, Job, State, Worker
from helios.serve.limits import Limits, RequestError, check_known_fields, check_prompt
from helios.serve.params import attach_upload, parse_params
from helios.serve.protocol import CLIENT_COOKIE, status_url
from helios.serve.session import live_session

log = logging.getLogger("helios.serve")

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    # The page needs nothing from elsewhere: no CDN, no inline scripts.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                               "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


RUN_PREFIX = "helios-serve-"
OWNER_FILE = "owner"  # "HOST PID" of the server that made a run folder


def remove_stale_run_dirs(root: Path) -> list[Path]:
    """Delete run folders that servers of this host left behind when killed (their process is gone),
    so repeated crashes do not fill the disk. A folder of a live server, of another host, or without
    an owner file is left alone. Returns the folders removed."""
    host = socket.gethostname()
    removed = []
    for folder in root.glob(RUN_PREFIX + "*"):
        try:
            owner_host, pid = (folder / OWNER_FILE).read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            continue
        if owner_host != host or _process_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, left by server process %d that is no longer running", folder, pid)
        removed.append(folder)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Server:
    """Everything the routes share."""

    def __init__(self, engines, limits: Limits, token: str | None, workdir: Path, fps: int, model_name: str):
        self.limits, self.token, self.fps, self.model_name = limits, token, fps, model_name
        self.clients = ClientIds()
        self.worker = Worker(engines, workdir, limits)
        # Requests are checked here, against the spec of the (one) model every engine runs.
        self.spec = self.worker.engines[0].spec


def create_app(pipe=None, *, engines: Sequence[Engine] | None = None, limits: Limits | None = None,
               token: str | None = None, workdir: str | Path | None = None, fps: int = 24,
               model_name: str = "") -> FastAPI:
    """An app serving `pipe` (a loaded HeliosVideoPipeline), or `engines` (serve.engines, e.g. from
    load_engines: one queue feeds them all). Files go to a fresh folder under `workdir` (default: the
    system temp folder), removed when the app shuts down. The engines stay up: their owner closes them."""
    if (pipe is None) == (engines is None):
        raise ValueError("give create_app a pipeline or a list of engines (not both)")
    root = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_run_dirs(root)
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=root))
    (run_dir / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    server = Server(pipe if engines is None else list(engines), limits or Limits(), token, run_dir, fps, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        housekeeping = asyncio.create_task(_housekeeping(server.worker))
        try:
            yield
        finally:
            housekeeping.cancel()
            await asyncio.to_thread(server.worker.close)
            shutil.rmtree(run_dir, ignore_errors=True)

    app = FastAPI(title="helios", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "internal server error"}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    def caller(request: Request, response: Response) -> str:
        """The token check, then the caller's client id (issued on first contact, kept in a cookie)."""
        if not authorized(request.headers, request.cookies, server.token):
            raise RequestError("this server needs an access token: send 'Authorization: Bearer <token>' "
                               "(or open the page as /?token=<token>)", status=401)
        client, new = server.clients.resolve(request.headers, request.cookies)
        if new:
            response.set_cookie(CLIENT_COOKIE, client, httponly=True, samesite="strict")
        return client

    def owned(job_id: str, client: str) -> Job:
        job = server.worker.get(job_id, client)
        if job is None:
            raise RequestError("no such job for this client", status=404)
        job.touch()
        return job

    # ---- the page ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- HTTP API ----------------------------------------------------------------------------
    @app.get("/api/config")
    async def config(client: str = Depends(caller)) -> dict:
        stats = server.worker.stats()  # (other clients' job ids stay private)
        engines = [{"devices": e["devices"], "alive": e["alive"], "busy": e["busy"]} for e in stats["engines"]]
        spec = server.spec
        return {"client": client, "model": server.model_name, "device": engines[0]["devices"][0],
                "engines": engines, "devices_per_engine": len(engines[0]["devices"]),
                "default_size": list(spec.default_size), "presets": spec.runnable_presets(),
                "default_preset": spec.default_preset, "example_prompt": spec.example_prompt,
                "fps": server.fps, "chunk_frames": CHUNK_FRAMES,
                "preview": spec.preview,
                "limits": asdict(server.limits), "queued": stats["queued"], "busy": stats["free_engines"] == 0}

    @app.post("/api/jobs", status_code=202)
    async def submit(request: Request, wait: bool = False, client: str = Depends(caller)):
        job = await _job_from_request(request, server, client)
        job.waited = wait
        server.worker.submit(job)
        if wait:
            return await _wait_for(job, request, server)
        return {"client": client, "status_url": status_url(job.id), **job.snapshot()}

    @app.get("/api/jobs")
    async def my_jobs(client: str = Depends(caller)) -> dict:
        return {"jobs": [j.snapshot() for j in server.worker.jobs_of(client)]}

    @app.get("/api/jobs/{job_id}")
    async def status(job_id: str, client: str = Depends(caller)) -> dict:
        return owned(job_id, client).snapshot()

    @app.get("/api/jobs/{job_id}/video")
    async def video(job_id: str, client: str = Depends(caller)):
        job = owned(job_id, client)
        if job.state not in FINAL:
            raise RequestError(f"the video is not finished yet ({job.state.value}, {job.chunks_done}/"
                               f"{job.request.chunks} chunks)", status=409)
        if job.video_path is None or not job.video_path.exists():
            raise RequestError(f"this job has no video ({job.state.value}"
                               f"{': ' + job.error if job.error else ''})", status=410)
        return FileResponse(job.video_path, media_type="video/mp4", filename=f"helios-{job.id[:8]}.mp4")

    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str, client: str = Depends(caller)) -> dict:
        job = owned(job_id, client)
        server.worker.cancel(job, "cancelled on request")
        return job.snapshot()

    @app.post("/api/jobs/{job_id}/{action}")
    async def control(job_id: str, action: str, request: Request, client: str = Depends(caller)) -> dict:
        job = owned(job_id, client)
        if action == "steer":
            body = await json_body(request, limit=64 << 10)
            check_known_fields(body, ("prompt",), "a steer")
            chunk = job.steer(check_prompt(body.get("prompt"), server.limits))
            return {**job.snapshot(), "from_chunk": chunk}
        actions = {"pause": job.pause, "resume": job.resume, "stop": lambda: server.worker.stop(job)}
        if action not in actions:
            raise RequestError(f"unknown action {action!r}: use steer, pause, resume or stop", status=404)
        actions[action]()
        return job.snapshot()

    # ---- live sessions -----------------------------------------------------------------------
    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        if not authorized(websocket.headers, websocket.cookies, server.token):
            await _deny(websocket, 401, "this server needs an access token: send 'Authorization: Bearer <token>'")
            return
        if not same_origin(websocket.headers):
            await _deny(websocket, 403, "cross-origin WebSocket refused")
            return
        client, _ = server.clients.resolve(websocket.headers, websocket.cookies)
        await websocket.accept()
        await live_session(websocket, server, client)

    from helios.serve.openai_api import LocalVideos, openai_app

    app.mount("/v1", openai_app(LocalVideos(server), server.token, server.clients))  # the OpenAI videos API
    return app


async def _housekeeping(worker: Worker) -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            await asyncio.to_thread(worker.reap)
        except Exception:
            log.exception("housekeeping failed")


async def _job_from_request(request: Request, server: Server, client: str) -> Job:
    limits = server.limits
    check_length(request, limits)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload = None
    if kind == "application/json":
        fields = await json_body(request, limit=FORM_SLACK)
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        limited = Request(request.scope, receive=LimitedReceive(request.receive, limits.max_upload_bytes + FORM_SLACK))
        form = await limited.form(max_files=2, max_fields=32)
        try:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            files = {k: v for k, v in form.items() if not isinstance(v, str)}
            unknown = set(files) - {"image", "video"}
            if unknown:
                raise RequestError(f"unexpected file field(s) {sorted(unknown)}: upload as 'image' or 'video'")
            if len(files) > 1:
                raise RequestError("give an image (image-to-video) or a video (video-to-video), not both")
            if files:
                name, file = next(iter(files.items()))
                upload = (name, await file.read(), file.filename or name)
        finally:
            await form.close()
    else:
        raise RequestError("send the job as multipart/form-data (with an optional 'image' or 'video' file) or "
                           "as JSON", status=415)
    request_params = parse_params(fields, server.spec, limits, fps=server.fps)
    if upload is not None:
        request_params = await asyncio.to_thread(attach_upload, request_params, upload[0], upload[1], upload[2],
                                                 limits, server.worker.workdir)
    return Job(request_params, client)


async def _wait_for(job: Job, request: Request, server: Server):
    """?wait=1: hold the request until the video is ready; a client that hangs up cancels the job."""
    while not job.finished.is_set():
        if await request.is_disconnected():
            server.worker.cancel(job, "the client disconnected")
            return Response(status_code=499)
        await asyncio.sleep(0.25)
    if job.state == State.DONE and job.video_path is not None:
        return FileResponse(job.video_path, media_type="video/mp4", filename=f"helios-{job.id[:8]}.mp4",
                            headers={"X-Helios-Job": job.id})
    status = 500 if job.state == State.FAILED else 409
    return JSONResponse({"error": job.error or job.state.value, **job.snapshot()}, status_code=status)


async def _deny(websocket: WebSocket, status: int, message: str) -> None:
    try:  # a plain HTTP answer to the handshake, where the server supports it
        await websocket.send_denial_response(JSONResponse({"error": message}, status_code=status))
    except RuntimeError:
        await websocket.accept()
        await websocket.send_json({"type": "error", "error": message, "status": status})
        await websocket.close(4000 + status)
