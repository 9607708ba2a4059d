"""One WebSocket live session: start a job, stream its frames as each chunk is decoded, take controls.

Two tasks per socket: `_send` drains the job's event queue (the only writer to the socket, so
messages never interleave mid-send), `_read` takes steer/pause/resume/stop. Whichever ends first
ends the session; if the job is still going then, the client has gone and the job is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from helios.serve.jobs import FINAL, Interrupted, Job
from helios.serve.limits import RequestError, check_known_fields, check_prompt, parse_json_object
from helios.serve.params import JobRequest, attach_upload, parse_params
from helios.serve.protocol import CLOSE_BAD_REQUEST, CLOSE_DONE, CLOSE_TOO_MANY, frame_messages

log = logging.getLogger("helios.serve")

START_TIMEOUT_S = 60.0
START_FIELDS = ("type", "upload", "filename")  # a start message's own fields beside the job's
MAX_CHUNKS_IN_FLIGHT = 2  # decoded chunks waiting for a slow client before the worker waits too


class SessionListener:
    """Carries a job's events from the worker thread to the session's event loop, with backpressure."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stall_timeout_s: float):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stall_timeout_s = stall_timeout_s
        self._slots = threading.Semaphore(MAX_CHUNKS_IN_FLIGHT)
        self._closed = threading.Event()

    def event(self, message: dict) -> None:
        self._put(message)

    def chunk(self, job: Job, chunk) -> None:
        # Wait (outside the engine) while the client is more than two chunks behind: frames of a
        # client that stopped reading must not pile up in memory.
        deadline = time.monotonic() + self.stall_timeout_s
        while not self._slots.acquire(timeout=0.1):
            job.check()
            if self._closed.is_set():
                raise Interrupted("the client disconnected")
            if time.monotonic() > deadline:
                raise Interrupted(f"the client read no frames for {self.stall_timeout_s:.0f} s")
        self._put(chunk)

    def chunk_sent(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self._closed.set()

    def _put(self, item) -> None:
        if self._closed.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self._closed.set()


async def live_session(ws: WebSocket, server, client: str) -> None:
    """Run one session on an accepted socket: the first message starts the job."""
    try:
        job, listener = await _start(ws, server, client)
    except RequestError as e:
        await _refuse(ws, e)
        return
    except WebSocketDisconnect:
        return
    await ws.send_json({"type": "accepted", "client": client, **job.snapshot()})
    sender = asyncio.create_task(_send(ws, listener))
    reader = asyncio.create_task(_read(ws, job, server, listener))
    try:
        done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, reader):
            task.cancel()
        listener.close()
        if job.state not in FINAL:
            log.info("job %s: client left, cancelling", job.id)
            server.worker.cancel(job, "the client disconnected")
        job.listener = None
    if sender in done and not sender.cancelled() and sender.exception() is None:
        try:
            await ws.close(CLOSE_DONE)
        except (RuntimeError, WebSocketDisconnect):
            pass


async def receive_start(ws: WebSocket, spec, limits, fps: int, scratch) -> JobRequest:
    """The job a live session asks for: its first message ({"type": "start", ...}, within
    START_TIMEOUT_S), checked against `spec` and `limits`, with its upload (one binary message after
    it, written under `scratch`) attached. Used by the one-host server and the Ray ingress alike."""
    try:
        message = await asyncio.wait_for(ws.receive(), START_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(f"no start message within {START_TIMEOUT_S:.0f} s") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect()
    start = _json(message)
    if start.get("type") != "start":
        raise RequestError('the first message must be {"type": "start", "prompt": ...}')
    request = parse_params(start, spec, limits, fps=fps, extra_fields=START_FIELDS)
    kind = start.get("upload")
    if kind:
        if kind not in ("image", "video"):
            raise RequestError(f'"upload" must be "image" or "video", got {kind!r}')
        upload = await ws.receive()
        if upload["type"] == "websocket.disconnect":
            raise WebSocketDisconnect()
        data = upload.get("bytes")
        if data is None:
            raise RequestError(f"expected the {kind} file as one binary message after the start message")
        request = await asyncio.to_thread(attach_upload, request, kind, data, str(start.get("filename") or kind),
                                          limits, scratch)
        del data, upload
    return request


async def _start(ws: WebSocket, server, client: str) -> tuple[Job, SessionListener]:
    request = await receive_start(ws, server.spec, server.limits, server.fps, server.worker.workdir)
    job = Job(request, client, live=True)
    listener = SessionListener(asyncio.get_running_loop(), server.limits.stall_timeout_s)
    job.listener = listener
    server.worker.submit(job)
    return job, listener


async def _refuse(ws: WebSocket, e: RequestError) -> None:
    try:
        await ws.send_json({"type": "error", "error": e.message, "status": e.status})
        await ws.close(CLOSE_TOO_MANY if e.status in (429, 503) else CLOSE_BAD_REQUEST)
    except (RuntimeError, WebSocketDisconnect):
        pass


async def _send(ws: WebSocket, listener: SessionListener) -> None:
    while True:
        item = await listener.queue.get()
        if isinstance(item, dict):
            await ws.send_json(item)
            if item["type"] == "end":
                return
            continue
        try:  # a decoded chunk: JPEG-encode it off the event loop, then send its frames
            messages = await asyncio.to_thread(frame_messages, item.index, item.first_frame, item.frames.numpy())
            await ws.send_json({"type": "chunk", "index": item.index, "first_frame": item.first_frame,
                                "frames": len(messages), "prompt": item.prompt, "total_chunks": item.total_chunks,
                                "seconds": round(item.seconds, 3), "complete": item.complete,
                                "decoder": getattr(item, "decoder", "full")})
            for m in messages:
                await ws.send_bytes(m)
        finally:
            listener.chunk_sent()
        del item, messages


async def _read(ws: WebSocket, job: Job, server, listener: SessionListener) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            _control(_json(message), job, server, listener)
        except RequestError as e:
            listener.queue.put_nowait({"type": "error", "error": e.message, "status": e.status})


def _control(message: dict, job: Job, server, listener: SessionListener) -> None:
    kind = message.get("type")
    check_known_fields(message, ("type", "prompt") if kind == "steer" else ("type",), f"a {str(kind)[:20]!r} message")
    if kind == "steer":
        prompt = check_prompt(message.get("prompt"), server.limits)
        chunk = job.steer(prompt)
        listener.queue.put_nowait({"type": "steered", "prompt": prompt, "from_chunk": chunk})
    elif kind == "pause":
        job.pause()
    elif kind == "resume":
        job.resume()
    elif kind == "stop":
        server.worker.stop(job)
    else:
        raise RequestError(f"unknown message type {kind!r}: use steer, pause, resume or stop")


def _json(message: dict) -> dict:
    text = message.get("text")
    if text is None:
        raise RequestError("expected a JSON text message")
    return parse_json_object(text, "the message")
