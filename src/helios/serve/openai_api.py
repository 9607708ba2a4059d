"""The OpenAI videos API (`/v1/videos`) on top of the server's job queue.

    POST   /v1/videos                 create (multipart, as the `openai` client sends it, or JSON)
    GET    /v1/videos                 list (cursor pages: after, limit, order)
    GET    /v1/videos/{id}            retrieve
    GET    /v1/videos/{id}/content    the mp4 (HTTP range requests), or ?variant=thumbnail (JPEG)
    DELETE /v1/videos/{id}            cancel if it runs, then delete it and its files

A video is one of our jobs: `seconds` and `size` become frames and height/width, `input_reference`
an image (I2V) or a video (V2V) upload, our own fields ride along (`extra_body` in the client):
preset, steps, guidance, seed, negative, fast_start, schedule ("CHUNK:prompt" strings), and video
(the id of one of the caller's finished videos, continued as video-to-video). The same
checks and messages as /api apply, in OpenAI's error shape {"error": {"message", "type", "param",
"code"}}. Nothing here touches a device: requests become `JobRequest`s, and a backend (this
server's worker, or the Ray Serve replicas of serve.ray) runs them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from helios.engine.prompts import LivePrompt, PromptSchedule, PromptScheduleError
from helios.serve.auth import ClientIds, authorized
from helios.serve.jobs import FINAL, Job, Worker
from helios.serve.limits import Limits, RequestError, check_prompt
from helios.serve.params import JobRequest, attach_upload, attach_video_file, parse_params
from helios.serve.protocol import CLIENT_HEADER

log = logging.getLogger("helios.serve")

DEFAULT_SECONDS = 4.0  # OpenAI's default clip length
EXTRA_FIELDS = ("preset", "steps", "guidance", "seed", "negative", "fast_start")
ERROR_KINDS = {  # HTTP status -> (OpenAI error type, code)
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"), 409: ("invalid_request_error", "video_not_ready"),
    410: ("invalid_request_error", "video_unavailable"), 413: ("invalid_request_error", "too_large"),
    415: ("invalid_request_error", "unsupported_media_type"), 429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None), 503: ("server_error", "server_busy"),
}


class ApiError(RequestError):
    """A refused /v1 request: RequestError plus the field it is about."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message, status)
        self.param = param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind, code = ERROR_KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- requests -> jobs ----------------------------------------------------------------------------


def parse_size(value: object, spec) -> tuple[int, int]:
    """(height, width) from OpenAI's "WIDTHxHEIGHT"; the model's default size when absent."""
    if value is None or value == "":
        return tuple(spec.default_size)
    text = str(value).strip().lower()
    width, sep, height = text.partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ApiError(f"size must be WIDTHxHEIGHT in pixels, e.g. \"640x384\", got {value!r}", param="size")
    return int(height), int(width)


def seconds_to_frames(value: object, fps: int) -> int:
    if value is None or value == "":
        value = DEFAULT_SECONDS
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ApiError(f"seconds must be a number, got {value!r}", param="seconds") from None
    if not seconds > 0:
        raise ApiError(f"seconds must be more than 0, got {value!r}", param="seconds")
    return max(1, round(seconds * fps))


def flatten_fields(fields: Mapping[str, object]) -> dict:
    """One dict of fields from what clients send: vLLM-style `extra_params` objects (or their form
    keys `extra_params[steps]`) and form lists (`schedule[]`) are unpacked."""
    out: dict = {}
    for key, value in fields.items():
        if key == "extra_params" and isinstance(value, Mapping):
            out.update(value)
        elif key.startswith("extra_params[") and key.endswith("]"):
            out[key[len("extra_params["):-1]] = value
        elif key.endswith("[]"):
            out.setdefault(key[:-2], [])
            out[key[:-2]] += value if isinstance(value, list) else [value]
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class VideoOrder:
    """A checked /v1/videos create request: the job, its prompt schedule, the model asked for, and
    the id of the caller's finished video to continue (video-to-video), if any."""

    request: JobRequest
    schedule: PromptSchedule | None
    model: str | None
    source: str | None


def job_from_fields(fields: Mapping[str, object], spec, limits: Limits, fps: int) -> VideoOrder:
    """The order of a /v1/videos create request's fields (uploads aside); ApiError if refused."""
    fields = flatten_fields(fields)
    if "input_reference" in fields:  # a URL, a file id or a path: never fetched nor opened
        raise ApiError("input_reference must be an uploaded file (an image, or a video for video-to-video); this "
                       "server fetches no URLs and opens no file ids or paths", param="input_reference")
    known = {"prompt", "model", "seconds", "size", "schedule", "video", *EXTRA_FIELDS}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ApiError(f"unknown parameter {unknown[0]!r}: this server takes prompt, model, seconds, size, "
                       f"input_reference and (extra_body) {', '.join(EXTRA_FIELDS)}, schedule, video",
                       param=unknown[0])
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"model must be a name, got {model!r}", param="model")
    source = check_video_id(fields.get("video"))
    frames = seconds_to_frames(fields.get("seconds"), fps)
    height, width = parse_size(fields.get("size"), spec)
    ours = {k: fields[k] for k in EXTRA_FIELDS if k in fields}
    try:
        request = parse_params({"prompt": fields.get("prompt"), "frames": frames, "height": height, "width": width,
                                **ours}, spec, limits, fps=fps)
    except RequestError as e:
        param = _param_of(e.message)
        if param == "seconds":  # say it in the caller's unit, then in ours (the /api message)
            raise ApiError(f"seconds={fields.get('seconds')} is {frames} frames at {fps} fps: {e.message}",
                           e.status, "seconds") from None
        raise ApiError(e.message, e.status, param) from None
    schedule = parse_schedule(fields.get("schedule"), request, limits)
    return VideoOrder(request, schedule, model, source)


def check_video_id(value: object) -> str | None:
    """extra_body `video`: the id of one of the caller's videos on this server (never a path or URL)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64 or not value.replace("-", "").replace("_", "").isalnum():
        raise ApiError(f"video must be the id of one of your finished videos on this server (upload a file as "
                       f"input_reference instead), got {str(value)[:80]!r}", param="video")
    return value


def _param_of(message: str) -> str | None:
    """Which field an /api refusal is about (for OpenAI's `param`)."""
    for prefix, param in (("frames", "seconds"), ("the prompt", "prompt"), ("steps", "steps"),
                          ("guidance", "guidance"), ("seed", "seed"), ("preset", "preset"),
                          ("the negative", "negative"), ("fast_start", "fast_start")):
        if message.startswith(prefix):
            return param
    if "x" in message.split(" ")[0] or message.startswith(("height", "width")):
        return "size"  # "1408x384 is larger than ...", "height=65: ..."
    return None


def parse_schedule(value: object, request: JobRequest, limits: Limits) -> PromptSchedule | None:
    """Prompt changes as "CHUNK:prompt" strings (as `helios generate --then`), or [chunk, prompt] pairs."""
    if value is None or value == [] or value == "":
        return None
    items = value if isinstance(value, list) else [value]
    specs = []
    for item in items:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            item = f"{item[0]}:{item[1]}"
        if not isinstance(item, str):
            raise ApiError(f"schedule entries must be \"CHUNK:prompt\" strings, got {item!r}", param="schedule")
        specs.append(item)
    try:
        schedule = PromptSchedule.parse([request.prompt, *specs])
    except PromptScheduleError as e:
        raise ApiError(str(e), param="schedule") from None
    for start, prompt in schedule.entries[1:]:
        check_prompt(prompt, limits, what=f"prompt for chunk {start}")
        if start >= request.chunks:
            raise ApiError(f"the schedule changes the prompt at chunk {start}, but the video has {request.chunks} "
                           f"chunks (0..{request.chunks - 1}): ask for more seconds or an earlier chunk",
                           param="schedule")
    return schedule


def upload_kind(field: str, filename: str, content_type: str | None) -> str:
    """input_reference is an image (image-to-video) or a video (video-to-video); `video` is a video."""
    if field == "video":
        return "video"
    kind = (content_type or "").split("/")[0].lower()
    if kind in ("image", "video"):
        return kind
    suffix = Path(filename or "").suffix.lower()
    return "video" if suffix in (".mp4", ".webm", ".mkv", ".mov") else "image"


# ---- jobs -> video objects -----------------------------------------------------------------------


def wall_time(monotonic: float | None) -> int | None:
    """A time.monotonic() stamp as Unix seconds."""
    return None if monotonic is None else int(time.time() - (time.monotonic() - monotonic))


def job_record(job: Job, **extra) -> dict:
    """A job's status with Unix times: what /v1 objects are made from (also sent between Ray processes)."""
    return {**job.snapshot(), "created_at": wall_time(job.created), "completed_at": wall_time(job.finished_at),
            **extra}


def video_object(record: Mapping, model: str, limits: Limits) -> dict:
    state = record["state"]
    status = {"queued": "queued", "running": "in_progress", "paused": "in_progress", "done": "completed",
              "stopped": "completed"}.get(state, "failed")
    total = max(1, record["chunks_total"])
    progress = 100 if status == "completed" else int(100 * record["chunks_done"] / total)
    error = None
    if status == "failed":
        error = {"code": "cancelled" if state == "cancelled" else "generation_failed",
                 "message": record.get("error") or state}
    params = record["params"]
    completed = record.get("completed_at")
    return {
        "id": record["job"], "object": "video", "model": model, "status": status, "progress": progress,
        "created_at": record["created_at"], "completed_at": completed if status == "completed" else None,
        "expires_at": completed + int(limits.keep_finished_s) if completed and status == "completed" else None,
        "error": error, "prompt": params["prompt"], "seconds": f"{params['frames'] / params['fps']:.2f}",
        "size": f"{params['width']}x{params['height']}", "remixed_from_video_id": None,
        "helios": {k: record.get(k) for k in ("state", "chunks_done", "chunks_total", "frames_done", "frames_total",
                                               "prompt", "next_prompt", "engine", "replica", "mode")},
    }


class JobTable:
    """The job operations behind /v1 (and the Ray replicas' /api), over one Worker. Blocking-free:
    every method only flips flags and reads state, so routes may call it on the event loop."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def create(self, request: JobRequest, owner: str, schedule: PromptSchedule | None = None,
               live: bool = False) -> Job:
        job = Job(request, owner, live=live)
        if schedule is not None:
            job.prompt = LivePrompt(schedule)
        # An API job runs to its end whether or not anyone polls it, as OpenAI's video jobs do
        # (a live one still ends with its socket).
        job.waited = not live
        self.worker.submit(job)
        return job

    def get(self, job_id: str, owner: str) -> Job:
        job = self.worker.get(job_id, owner)
        if job is None:
            raise ApiError(f"no video {job_id!r} for this client", status=404, param="video_id")
        job.touch()
        return job

    def records(self, owner: str) -> list[dict]:
        return [job_record(j) for j in sorted(self.worker.jobs_of(owner), key=lambda j: j.created)]

    def delete(self, job_id: str, owner: str) -> None:
        self.worker.forget(self.get(job_id, owner))

    def video(self, job_id: str, owner: str) -> Path:
        job = self.get(job_id, owner)
        if job.state not in FINAL:
            raise ApiError(f"the video is not finished yet ({job.chunks_done}/{job.request.chunks} chunks)",
                           status=409, param="video_id")
        if job.video_path is None or not job.video_path.exists():
            raise ApiError(f"this video has no content ({job.state.value}{': ' + job.error if job.error else ''})",
                           status=410, param="video_id")
        return job.video_path


# ---- the routes ----------------------------------------------------------------------------------


class Videos(Protocol):
    """What the /v1 routes run on: this server's JobTable (LocalVideos) or serve.ray's replicas."""

    spec: object
    limits: Limits
    fps: int
    model_name: str
    scratch: Path  # where uploads are decoded

    async def create(self, request: JobRequest, schedule: PromptSchedule | None, owner: str) -> dict: ...
    async def record(self, job_id: str, owner: str) -> dict: ...
    async def records(self, owner: str) -> list[dict]: ...
    async def delete(self, job_id: str, owner: str) -> None: ...
    async def video_file(self, job_id: str, owner: str) -> Path: ...


class LocalVideos:
    """Videos on this server's own worker (the plain `helios serve`)."""

    def __init__(self, server):
        self.spec, self.limits, self.fps, self.model_name = server.spec, server.limits, server.fps, server.model_name
        self.table = JobTable(server.worker)
        self.scratch = server.worker.workdir

    async def create(self, request, schedule, owner):
        return job_record(self.table.create(request, owner, schedule))

    async def record(self, job_id, owner):
        return job_record(self.table.get(job_id, owner))

    async def records(self, owner):
        return self.table.records(owner)

    async def delete(self, job_id, owner):
        self.table.delete(job_id, owner)

    async def video_file(self, job_id, owner):
        return self.table.video(job_id, owner)


def api_owner(headers: Mapping[str, str], token: str | None, clients: ClientIds) -> str:
    """Who owns /v1 videos: the X-Helios-Client id when a script sends one, otherwise the API key
    itself (everyone holding the token, as OpenAI's videos belong to a key's project)."""
    client = headers.get(CLIENT_HEADER)
    if clients.valid(client):
        return client
    return "key." + hashlib.sha256((token or "").encode()).hexdigest()[:32]


def openai_app(videos: Videos, token: str | None, clients: ClientIds) -> FastAPI:
    """The /v1 routes as an app to mount at /v1 (its own error handlers give OpenAI's error shape)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.status, getattr(e, "param", None)), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", 500), status_code=500)

    def caller(request: Request) -> str:
        if not authorized(request.headers, {}, token):
            raise ApiError("this server needs an API key: send 'Authorization: Bearer <token>' (the server's "
                           "--token)", status=401)
        return api_owner(request.headers, token, clients)

    def model_of(record: Mapping) -> str:
        return record.get("model") or videos.model_name or "helios"

    @app.post("/videos")
    async def create(request: Request) -> dict:
        owner = caller(request)
        fields, upload = await _read_create(request, videos.limits)
        order = job_from_fields(fields, videos.spec, videos.limits, videos.fps)
        job = await _with_media(order, upload, videos, owner)
        record = await videos.create(job, order.schedule, owner)
        return video_object({**record, "model": order.model}, order.model or model_of(record), videos.limits)

    @app.get("/videos")
    async def list_videos(request: Request) -> dict:
        owner = caller(request)
        q = request.query_params
        limit = q.get("limit", "20")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise ApiError(f"limit must be a whole number from 1 to 100, got {limit!r}", param="limit")
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(f"order must be asc or desc, got {order!r}", param="order")
        records = await videos.records(owner)
        if order == "desc":
            records.reverse()
        after = q.get("after")
        if after:
            ids = [r["job"] for r in records]
            if after not in ids:
                raise ApiError(f"no video {after!r} to list after", status=404, param="after")
            records = records[ids.index(after) + 1:]
        page = records[:int(limit)]
        data = [video_object(r, model_of(r), videos.limits) for r in page]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(records) > len(page)}

    @app.get("/videos/{video_id}")
    async def retrieve(video_id: str, request: Request) -> dict:
        record = await videos.record(video_id, caller(request))
        return video_object(record, model_of(record), videos.limits)

    @app.delete("/videos/{video_id}")
    async def delete(video_id: str, request: Request) -> dict:
        await videos.delete(video_id, caller(request))
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/videos/{video_id}/content")
    async def content(video_id: str, request: Request) -> Response:
        owner = caller(request)
        variant = request.query_params.get("variant", "video")
        if variant not in ("video", "thumbnail"):
            raise ApiError(f"variant {variant!r} is not available: use video or thumbnail", param="variant")
        path = await videos.video_file(video_id, owner)
        if variant == "thumbnail":
            jpeg = await asyncio.to_thread(_thumbnail, path)
            return Response(jpeg, media_type="image/jpeg")
        # FileResponse answers Range requests (206 with Content-Range) and sends Accept-Ranges.
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    return app


async def _with_media(order: VideoOrder, upload: tuple | None, videos: Videos, owner: str) -> JobRequest:
    """The order's job with its image or video: the upload, or the caller's own finished video."""
    if upload is not None and order.source is not None:
        raise ApiError("give one input: an input_reference upload or (extra_body) video, not both", param="video")
    try:
        if upload is not None:
            kind, data, filename = upload
            return await asyncio.to_thread(attach_upload, order.request, kind, data, filename, videos.limits,
                                           videos.scratch)
        if order.source is not None:
            path = await _source_video(videos, order.source, owner)
            return await asyncio.to_thread(attach_video_file, order.request, path, order.source, videos.limits)
    except ApiError:
        raise
    except RequestError as e:
        raise ApiError(e.message, e.status, "input_reference" if upload is not None else "video") from None
    return order.request


async def _source_video(videos: Videos, video_id: str, owner: str) -> Path:
    try:
        return await videos.video_file(video_id, owner)
    except ApiError as e:
        raise ApiError(f"video {video_id!r} cannot be continued: {e.message}", e.status, "video") from None


async def _read_create(request: Request, limits: Limits):
    """(fields, upload or None) of a create request; upload = (kind, bytes, filename)."""
    from helios.serve.bodies import FORM_SLACK as slack, LimitedReceive as limited_receive, check_length, json_body

    try:
        check_length(request, limits)
    except RequestError as e:
        raise ApiError(e.message, e.status, "input_reference") from None
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return await json_body(request, limit=slack), None
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise ApiError("send the video request as multipart/form-data (as the openai client does) or JSON",
                       status=415)
    limited = Request(request.scope, receive=limited_receive(request.receive, limits.max_upload_bytes + slack))
    form = await limited.form(max_files=2, max_fields=64)
    try:
        fields: dict = {}
        files = []
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key.endswith("[]"):
                    fields.setdefault(key, []).append(value)
                else:
                    fields[key] = value
            else:
                files.append((key, value))
        unexpected = [k for k, _ in files if k not in ("input_reference", "video")]
        if unexpected:
            raise ApiError(f"unexpected file field {unexpected[0]!r}: upload the reference as input_reference",
                           param=unexpected[0])
        if len(files) > 1:
            raise ApiError("give one input_reference (an image for image-to-video or a video for video-to-video)",
                           param="input_reference")
        upload = None
        if files:
            key, file = files[0]
            name = file.filename or key
            upload = (upload_kind(key, name, file.content_type), await file.read(), name)
        return fields, upload
    finally:
        await form.close()


def _thumbnail(path: Path) -> bytes:
    from helios.engine.video_io import iter_video
    from helios.serve.protocol import encode_jpeg

    first = next(iter(iter_video(path, chunk_frames=1, max_frames=1)))
    return encode_jpeg(first[0].numpy())
