"""Helios on Ray Serve: engine replicas on a cluster, one ingress with the page, /api, /ws and /v1/videos.

    helios serve --ray --replicas 4 --gpus-per-replica 1          # on a Ray cluster (or a local one)
    serve run configs/serve/cluster.yaml                          # the same from a Serve config

Two deployments:

* `HeliosEngine0` .. `HeliosEngine{N-1}`: one deployment of one replica per engine, each holding a
  pipeline on its own GPU group (`ray_actor_options={"num_gpus": K}`; CPU replicas for the bundled
  model) and running its jobs with the server's own Worker (serve.jobs: the same pause, stop, steer
  and cancel code as `helios serve`). A job lives on the replica that took it; its id says which
  ("ENGINE.REPLICA.JOB"). One deployment per engine, so that the ingress can address the replica
  that runs a job through an ordinary Serve handle.
* `HeliosIngress`: the HTTP and WebSocket front (behind Ray Serve's proxy on every node). It checks
  every request before anything is queued (the same limits and messages as `helios serve`), gives a
  new job to the engine with the fewest jobs, and sends everything about a job to the replica that
  runs it: its live stream comes from there (frames JPEG-encoded on that replica), and a steer or
  stop goes there.

A replica that dies takes its running and queued jobs with it: they are reported `failed` with the
reason, its half-written mp4 is never served (the writer renames only complete files), Ray Serve
starts a replacement (a new replica id, so old job ids are not mistaken for its jobs), and the other
engines carry on. `check_health` fails a replica
whose engine has stopped, so Ray replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

from helios.model_folder import bundled_model
from helios.engine.prompts import PromptSchedule
from helios.serve.auth import ClientIds, authorized, same_origin
from helios.serve.jobs import FINAL, Worker
from helios.serve.limits import Limits, RequestError, check_prompt
from helios.serve.openai_api import ApiError, JobTable, job_record, openai_app
from helios.serve.engines import from_wire, to_wire
from helios.serve.params import JobRequest
from helios.serve.protocol import CLIENT_COOKIE, frame_messages, status_url, video_url

log = logging.getLogger("helios.serve")

ENGINE = "HeliosEngine"  # + the engine's index
INGRESS = "HeliosIngress"
GONE = "gone"  # a replica's answer for a job that is not on it
CENSUS_TIMEOUT_S = 10.0  # an engine that does not describe itself within this is left out
WAIT_POLL_S = 0.25  # how often a ?wait=1 request asks the job's replica
NO_REPLICA = "no engine replica is running (see `serve status` and the replica logs)"


def split_id(job_id: str) -> tuple[int, str, str]:
    """(engine index, replica id, the replica's own job id) of a public job id "ENGINE.REPLICA.JOB";
    (-1, "", id) for anything else."""
    parts = job_id.split(".")
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isalnum():
        return int(parts[0]), parts[1], parts[2]
    return -1, "", job_id



# ----------------------------------------------------------------------------------------------
# the engine replicas


class HeliosEngine:
    """One engine: a pipeline, the Worker that runs its jobs, and the calls the ingress makes."""

    def __init__(self, model: str, index: int = 0, dtype: str = "auto", limits: dict | None = None, fps: int = 24,
                 workdir: str | None = None, threads: int | None = None):
        import torch

        from helios.engine.pipeline import load_pipeline
        from helios.serve.engines import GroupEngine, LocalEngine, torch_dtype

        if threads:
            torch.set_num_threads(threads)
        self.index = index
        self.replica = serve.get_replica_context().replica_id.unique_id
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per replica
        self.limits = Limits(**(limits or {}))
        self.fps = fps
        gpus = torch.cuda.device_count()
        if gpus > 1:  # K GPUs for this replica: one context-parallel engine group over them
            engine = GroupEngine.start(model, [f"cuda:{i}" for i in range(gpus)], dtype)
        else:
            engine = LocalEngine(load_pipeline(model, dtype=torch_dtype(dtype, device), device=device))
        root = Path(workdir or tempfile.gettempdir()) / f"helios-replica-{self.replica}"
        self.worker = Worker([engine], root, self.limits)
        self.worker.start()
        self.table = JobTable(self.worker)
        self._closing = threading.Event()
        threading.Thread(target=self._housekeeping, name="helios-reap", daemon=True).start()
        log.info("replica %s: engine on %s (pid %d)", self.replica, device, os.getpid())

    def _housekeeping(self) -> None:
        trimmed_at = 0  # jobs_run when memory was last handed back
        while not self._closing.wait(1.0):
            try:
                self.worker.reap()
                stats = self.worker.stats()
                if not stats["running"] and stats["jobs_run"] != trimmed_at:
                    trimmed_at = stats["jobs_run"]
                    _give_back_free_memory()
            except Exception:
                log.exception("housekeeping failed")

    # ---- what Ray Serve asks ------------------------------------------------------------------
    def check_health(self) -> None:
        if not any(e.alive for e in self.worker.engines):
            raise RuntimeError(f"replica {self.replica}: its engine has stopped")

    def __del__(self):
        closing = getattr(self, "_closing", None)
        if closing is not None:
            closing.set()
            self.worker.close(timeout=10)
            for engine in self.worker.engines:
                engine.close()

    # ---- calls from the ingress (those about a job carry the replica the ingress means) -------
    def describe(self, replica: str | None = None) -> dict:
        stats = self.worker.stats()
        engine = stats["engines"][0]
        return {"replica": self.replica, "engine": self.index, "pid": os.getpid(), "devices": engine["devices"], "alive": engine["alive"],
                "busy": engine["busy"], "jobs": stats["queued"] + len(stats["running"]),
                "jobs_run": stats["jobs_run"], "running": [self._public(j) for j in stats["running"]],
                "spec": self.worker.engines[0].spec, "workdir": str(self.worker.workdir)}

    def submit(self, request: JobRequest, schedule: PromptSchedule | None, owner: str) -> dict:
        try:
            return self._record(self.table.create(from_wire(request), owner, schedule))
        except RequestError as e:
            return {"refused": e.message, "status": e.status}

    def record(self, job_id: str, owner: str, replica: str) -> dict:
        return self._on_job(job_id, owner, replica, lambda job: self._record(job))

    def records(self, owner: str, replica: str) -> list[dict]:
        if replica != self.replica:
            return GONE
        return [self._record(j) for j in sorted(self.worker.jobs_of(owner), key=lambda j: j.created)]

    def control(self, job_id: str, owner: str, replica: str, action: str, prompt: str | None = None) -> dict:
        def act(job):
            extra = {}
            if action == "steer":
                extra["from_chunk"] = job.steer(prompt)
            elif action == "pause":
                job.pause()
            elif action == "resume":
                job.resume()
            elif action == "stop":
                self.worker.stop(job)
            elif action == "cancel":
                self.worker.cancel(job, "cancelled on request")
            elif action == "cancel_disconnected":  # a ?wait=1 request was dropped
                self.worker.cancel(job, "the client disconnected")
            elif action == "delete":
                self.worker.forget(job)
            return {**self._record(job), **extra}

        return self._on_job(job_id, owner, replica, act)

    def video_bytes(self, job_id: str, owner: str, replica: str) -> bytes | dict:
        return self._on_job(job_id, owner, replica, lambda job: self.table.video(job.id, owner).read_bytes())

    async def run_live(self, request: JobRequest, schedule: PromptSchedule | None, owner: str):
        """A live job: the job's messages as the WebSocket session sends them (frames already JPEG
        messages), from "accepted" to "end". Closing the stream cancels the job."""
        from helios.serve.session import SessionListener

        listener = SessionListener(asyncio.get_running_loop(), self.limits.stall_timeout_s)
        try:
            job = self.table.create(from_wire(request), owner, schedule, live=True)
        except RequestError as e:
            yield {"type": "error", "error": e.message, "status": e.status}
            return
        job.listener = listener
        try:
            yield {"type": "accepted", **self._record(job)}
            while True:
                item = await listener.queue.get()
                if isinstance(item, dict):
                    yield self._public_message(item)
                    if item["type"] == "end":
                        return
                    continue
                try:
                    frames = await asyncio.to_thread(frame_messages, item.index, item.first_frame, item.frames.numpy())
                    yield {"type": "chunk", "index": item.index, "first_frame": item.first_frame,
                           "frames": len(frames), "prompt": item.prompt, "total_chunks": item.total_chunks,
                           "seconds": round(item.seconds, 3), "complete": item.complete, "messages": frames}
                finally:
                    listener.chunk_sent()
                del item
        finally:
            listener.close()
            job.listener = None
            if job.state not in FINAL:
                self.worker.cancel(job, "the client disconnected")

    # ---- helpers ------------------------------------------------------------------------------
    def _on_job(self, job_id: str, owner: str, replica: str, fn):
        _, target, local = split_id(job_id)
        if target != self.replica:
            return GONE
        try:
            return fn(self.table.get(local, owner))
        except RequestError as e:
            return {"refused": e.message, "status": e.status}

    def _public(self, local_id: str) -> str:
        return f"{self.index}.{self.replica}.{local_id}"

    def _record(self, job) -> dict:
        record = job_record(job, replica=self.replica)
        return self._public_message(record)

    def _public_message(self, message: dict) -> dict:
        if "job" in message:
            public = self._public(message["job"])
            message = {**message, "job": public, "replica": self.replica}
            if message.get("video"):
                message["video"] = video_url(public)
        return message


def _give_back_free_memory() -> None:
    """Return the C heap's free pages to the system once a replica is idle: a job's frames pass through
    many threads (the engine's, the JPEG encoders', Ray's), and glibc keeps what they freed otherwise."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ----------------------------------------------------------------------------------------------
# the ingress


class JobGone(Exception):
    """The replica that ran a job is gone (died or was replaced)."""


class Replicas:
    """The ingress's side of the engine replicas: calls routed by job, and what it last heard of each job
    (so a job whose replica died can still be reported, as failed)."""

    def __init__(self, engines, limits: Limits, fps: int, model_name: str, workdir: Path):
        self.engines = list(engines)  # a DeploymentHandle per engine (HeliosEngine0, 1, ...)
        self.limits, self.fps, self.model_name = limits, fps, model_name
        self.scratch = workdir / "uploads"
        self.cache = workdir / "videos"
        for d in (self.scratch, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        self.seen: dict[int, dict] = {}  # engine -> its replica's last describe()
        self._placing = asyncio.Lock()  # one new job at a time is given an engine
        self.jobs: dict[str, tuple[str, dict]] = {}  # job -> (owner, last record)
        self._spec = None

    @property
    def spec(self):
        if self._spec is None:
            raise RequestError(NO_REPLICA, status=503)
        return self._spec

    async def census(self) -> list[dict]:
        """Every engine's replica as it describes itself now (engines that do not answer are left out)."""
        async def ask(handle):
            return await asyncio.wait_for(handle.describe.remote(), CENSUS_TIMEOUT_S)

        answers = await asyncio.gather(*(ask(h) for h in self.engines), return_exceptions=True)
        self.seen = {i: a for i, a in enumerate(answers) if isinstance(a, dict)}
        for a in self.seen.values():
            self._spec = self._spec or a["spec"]
        return list(self.seen.values())

    async def ensure_spec(self) -> None:
        if self._spec is None:
            await self.census()

    # ---- calls --------------------------------------------------------------------------------
    async def call(self, method: str, job_id: str, owner: str, **kwargs):
        engine, replica, _ = split_id(job_id)
        if not 0 <= engine < len(self.engines):
            raise ApiError("no such job for this client", status=404, param="video_id")
        try:
            handle = getattr(self.engines[engine], method)
            answer = await handle.remote(job_id=job_id, owner=owner, replica=replica, **kwargs)
        except Exception as e:  # the replica died mid-call (RayActorError and friends)
            if type(e).__name__ in ("RayActorError", "ActorDiedError", "ActorUnavailableError"):
                raise JobGone(f"{type(e).__name__}") from None
            raise
        if answer == GONE:
            raise JobGone("it is no longer in the cluster")
        if isinstance(answer, dict) and "refused" in answer:
            raise ApiError(answer["refused"], answer["status"], "video_id" if answer["status"] == 404 else None)
        return answer

    def remember(self, owner: str, record: dict) -> dict:
        self.jobs[record["job"]] = (owner, record)
        return record

    def failed_record(self, job_id: str, owner: str, why: str) -> dict:
        """What to say about a job whose replica is gone: failed, unless it had already ended."""
        mine = self.jobs.get(job_id)
        if mine is None or mine[0] != owner:
            raise ApiError("no such job for this client", status=404, param="video_id")
        record = mine[1]
        if record["state"] not in ("done", "stopped", "cancelled", "failed"):
            _, replica, _ = split_id(job_id)
            record = {**record, "state": "failed", "queue_position": None, "video": None,
                      "completed_at": int(time.time()),
                      "error": f"the engine replica {replica} running this job stopped ({why}); try again"}
            self.jobs[job_id] = (owner, record)
        return record

    async def record(self, job_id: str, owner: str) -> dict:
        try:
            return self.remember(owner, await self.call("record", job_id, owner))
        except JobGone as e:
            return self.failed_record(job_id, owner, str(e))

    async def control(self, job_id: str, owner: str, action: str, prompt: str | None = None) -> dict:
        try:
            answer = await self.call("control", job_id, owner, action=action, prompt=prompt)
        except JobGone as e:
            record = self.failed_record(job_id, owner, str(e))
            if action == "delete":
                self.jobs.pop(job_id, None)
                return record
            raise ApiError(f"the job has already ended ({record['state']}: {record['error']})", status=409) from None
        if action == "delete":
            self.jobs.pop(job_id, None)
            return answer
        return self.remember(owner, {k: v for k, v in answer.items() if k != "from_chunk"}) | (
            {"from_chunk": answer["from_chunk"]} if "from_chunk" in answer else {})

    async def check_client_limit(self, owner: str) -> None:
        mine = [j for j, (o, r) in self.jobs.items() if o == owner and r["state"] not in FINAL_NAMES]
        active = 0
        for job_id in mine:  # what was last heard may be stale: ask
            if (await self.record(job_id, owner))["state"] not in FINAL_NAMES:
                active += 1
        if active >= self.limits.max_jobs_per_client:
            raise RequestError(f"you already have {active} job(s) queued or running (at most "
                               f"{self.limits.max_jobs_per_client} per client); wait for one to finish or "
                               "cancel it", status=429)

    async def create(self, request: JobRequest, schedule, owner: str) -> dict:
        await self.check_client_limit(owner)
        async with self._placing:  # (so that two new jobs do not both see the same idle engine)
            answer = await (await self.place()).submit.remote(to_wire(request), schedule, owner)
        if "refused" in answer:
            raise RequestError(answer["refused"], answer["status"])
        return self.remember(owner, answer)

    async def place(self):
        """The handle of the engine that takes a new job: the one with the fewest jobs now."""
        seen = await self.census()
        if not seen:
            raise RequestError(NO_REPLICA, status=503)
        return self.engines[min(seen, key=lambda s: (s["jobs"], s["engine"]))["engine"]]

    async def records(self, owner: str) -> list[dict]:
        out = {}
        for seen in await self.census():
            try:
                answer = await self.engines[seen["engine"]].records.remote(owner=owner, replica=seen["replica"])
            except Exception:
                answer = GONE
            if answer != GONE:
                out.update({r["job"]: self.remember(owner, r) for r in answer})
        for job_id, (o, _) in list(self.jobs.items()):
            if o == owner and job_id not in out:
                out[job_id] = self.failed_record(job_id, owner, "it is no longer in the cluster")
        return sorted(out.values(), key=lambda r: (r["created_at"] or 0, r["job"]))

    async def delete(self, job_id: str, owner: str) -> None:
        await self.control(job_id, owner, "delete")
        (self.cache / f"{job_id}.mp4").unlink(missing_ok=True)

    async def video_file(self, job_id: str, owner: str) -> Path:
        """The finished mp4, fetched once from its replica into this process's cache (range requests
        are then served from here)."""
        path = self.cache / f"{job_id}.mp4"
        if path.exists():
            return path
        try:
            data = await self.call("video_bytes", job_id, owner)
        except JobGone as e:
            record = self.failed_record(job_id, owner, str(e))
            raise ApiError(f"this job has no video ({record['state']}: {record['error'] or 'its replica is gone'})",
                           status=410) from None
        partial = path.with_suffix(f".{secrets.token_hex(4)}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        return path

    def drop_expired(self) -> None:
        horizon = time.time() - self.limits.keep_finished_s
        for job_id, (owner, record) in list(self.jobs.items()):
            if (record.get("completed_at") or time.time()) < horizon:
                self.jobs.pop(job_id, None)
                (self.cache / f"{job_id}.mp4").unlink(missing_ok=True)


FINAL_NAMES = frozenset(s.value for s in FINAL)


def _routes(app: FastAPI, replicas: Replicas, token: str | None, clients: ClientIds) -> None:
    """The page, /api, /ws and /v1 of the ingress: the protocol of `helios serve` (docs/serving.md)."""
    from helios.sampling.sampler import PRESETS
    from helios.serve.app import PAGE_HEADERS, STATIC, _deny, _job_from_request
    from helios.serve.bodies import json_body

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    def caller(request: Request, response) -> str:
        if not authorized(request.headers, request.cookies, token):
            raise RequestError("this server needs an access token: send 'Authorization: Bearer <token>' "
                               "(or open the page as /?token=<token>)", status=401)
        client, new = clients.resolve(request.headers, request.cookies)
        if new and response is not None:
            response.set_cookie(CLIENT_COOKIE, client, httponly=True, samesite="strict")
        return client

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/v1", openai_app(replicas, token, clients))

    @app.get("/api/config")
    async def config(request: Request) -> JSONResponse:
        response = JSONResponse({})
        client = caller(request, response)
        seen = await replicas.census()
        if not seen:
            raise RequestError(NO_REPLICA, status=503)
        spec = replicas.spec
        engines = [{"devices": s["devices"], "alive": s["alive"], "busy": s["busy"], "replica": s["replica"]}
                   for s in sorted(seen, key=lambda s: s["replica"])]
        body = {"client": client, "model": replicas.model_name, "device": engines[0]["devices"][0],
                "engines": engines, "devices_per_engine": len(engines[0]["devices"]),
                "default_size": list(spec.default_size), "presets": sorted(PRESETS),
                "default_preset": spec.default_preset, "fps": replicas.fps, "chunk_frames": 33,
                "limits": asdict(replicas.limits), "queued": sum(max(0, s["jobs"] - s["busy"]) for s in seen),
                "busy": all(s["busy"] for s in seen)}
        cookie = response.headers.get("set-cookie")
        return JSONResponse(body, headers={"set-cookie": cookie} if cookie else None)

    @app.post("/api/jobs", status_code=202)
    async def submit(request: Request, wait: bool = False) -> dict:
        client = caller(request, None)
        await replicas.ensure_spec()
        shim = SimpleNamespace(limits=replicas.limits, spec=replicas.spec, fps=replicas.fps,
                               worker=SimpleNamespace(workdir=replicas.scratch))
        job = await _job_from_request(request, shim, client)  # (the same parsing and checks as helios serve)
        record = await replicas.create(job.request, None, client)
        if wait:
            return await _wait_for(record["job"], client, request, replicas)
        return {"client": client, "status_url": status_url(record["job"]), **record}

    @app.get("/api/jobs")
    async def my_jobs(request: Request) -> dict:
        return {"jobs": await replicas.records(caller(request, None))}

    @app.get("/api/jobs/{job_id}")
    async def status(job_id: str, request: Request) -> dict:
        return await replicas.record(job_id, caller(request, None))

    @app.get("/api/jobs/{job_id}/video")
    async def video(job_id: str, request: Request) -> FileResponse:
        path = await replicas.video_file(job_id, caller(request, None))
        return FileResponse(path, media_type="video/mp4", filename=f"helios-{job_id[:8]}.mp4")

    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str, request: Request) -> dict:
        return await replicas.control(job_id, caller(request, None), "cancel")

    @app.post("/api/jobs/{job_id}/{action}")
    async def control(job_id: str, action: str, request: Request) -> dict:
        client = caller(request, None)
        if action not in ("steer", "pause", "resume", "stop"):
            raise RequestError(f"unknown action {action!r}: use steer, pause, resume or stop", status=404)
        prompt = None
        if action == "steer":
            prompt = check_prompt((await json_body(request, limit=64 << 10)).get("prompt"), replicas.limits)
        return await replicas.control(job_id, client, action, prompt)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        if not authorized(websocket.headers, websocket.cookies, token):
            await _deny(websocket, 401, "this server needs an access token: send 'Authorization: Bearer <token>'")
            return
        if not same_origin(websocket.headers):
            await _deny(websocket, 403, "cross-origin WebSocket refused")
            return
        client, _ = clients.resolve(websocket.headers, websocket.cookies)
        await websocket.accept()
        await _live_session(websocket, replicas, client)


_BACKGROUND: set[asyncio.Task] = set()  # tasks that must outlive the request that started them


def _background(coroutine) -> None:
    task = asyncio.ensure_future(coroutine)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _wait_for(job_id: str, client: str, request: Request, replicas: Replicas):
    """?wait=1, as on `helios serve`: hold the request until the job ends and answer its mp4; a client
    that hangs up cancels the job. The ingress asks the job's replica how it is doing (no engine
    replica holds a request open)."""
    try:
        while (record := await replicas.record(job_id, client))["state"] not in FINAL_NAMES:
            if await request.is_disconnected():
                await replicas.control(job_id, client, "cancel_disconnected")
                return Response(status_code=499)
            await asyncio.sleep(WAIT_POLL_S)
    except asyncio.CancelledError:  # Ray Serve's proxy cancels the request when its client hangs up
        _background(replicas.control(job_id, client, "cancel_disconnected"))
        raise
    if record["state"] == "done" and record["video"]:
        path = await replicas.video_file(job_id, client)
        return FileResponse(path, media_type="video/mp4", filename=f"helios-{job_id[:8]}.mp4",
                            headers={"X-Helios-Job": job_id})
    status = 500 if record["state"] == "failed" else 409
    return JSONResponse({"error": record["error"] or record["state"], **record}, status_code=status)


async def _live_session(ws: WebSocket, replicas: Replicas, client: str) -> None:
    """/ws on the ingress: the start message is checked here, then the replica that takes the job
    streams it; controls go to that replica. Closing the socket cancels the job."""
    from helios.serve.protocol import CLOSE_DONE
    from helios.serve.session import _json, _refuse, receive_start

    try:
        await replicas.ensure_spec()
        request = await receive_start(ws, replicas.spec, replicas.limits, replicas.fps, replicas.scratch)
        await replicas.check_client_limit(client)
    except RequestError as e:
        await _refuse(ws, e)
        return
    except WebSocketDisconnect:
        return
    async with replicas._placing:
        engine = await replicas.place()
        stream = engine.options(stream=True).run_live.remote(to_wire(request), None, client)
        first = await stream.__anext__()
    if first["type"] == "error":
        await _refuse(ws, RequestError(first["error"], first["status"]))
        stream.cancel()
        return
    job_id = first["job"]
    replicas.remember(client, {k: v for k, v in first.items() if k != "type"})
    await ws.send_json({**first, "client": client})
    ended = asyncio.Event()

    async def relay() -> None:
        try:
            async for message in stream:
                frames = message.pop("messages", None)
                if message.get("job") == job_id:
                    replicas.remember(client, {k: v for k, v in message.items() if k != "type"})
                await ws.send_json(message)
                for frame in frames or ():
                    await ws.send_bytes(frame)
                if message["type"] == "end":
                    ended.set()
                    return
        except Exception as e:  # the replica died mid-job
            if type(e).__name__ not in ("RayActorError", "ActorDiedError", "ActorUnavailableError"):
                raise
            record = replicas.failed_record(job_id, client, type(e).__name__)
            ended.set()
            await ws.send_json({"type": "end", **record})

    async def read() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                await _control(_json(message), job_id, client, replicas, ws)
            except RequestError as e:
                await ws.send_json({"type": "error", "error": e.message, "status": e.status})

    sender, reader = asyncio.create_task(relay()), asyncio.create_task(read())
    try:
        await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, reader):
            task.cancel()
        if not ended.is_set():
            stream.cancel()  # the replica's run_live ends and cancels the job
    if ended.is_set():
        try:
            await ws.close(CLOSE_DONE)
        except (RuntimeError, WebSocketDisconnect):
            pass


async def _control(message: dict, job_id: str, client: str, replicas: Replicas, ws: WebSocket) -> None:
    kind = message.get("type")
    if kind not in ("steer", "pause", "resume", "stop"):
        raise RequestError(f"unknown message type {kind!r}: use steer, pause, resume or stop")
    prompt = check_prompt(message.get("prompt"), replicas.limits) if kind == "steer" else None
    answer = await replicas.control(job_id, client, kind, prompt)
    if kind == "steer":
        await ws.send_json({"type": "steered", "prompt": prompt, "from_chunk": answer["from_chunk"]})


class HeliosIngress:
    """The front deployment: a FastAPI app built on its replica (Ray Serve's late-bound ingress)."""

    def __init__(self, engines, token: str | None = None, limits: dict | None = None, fps: int = 24,
                 model_name: str = "", client_secret: str = "", workdir: str | None = None):
        root = Path(tempfile.mkdtemp(prefix="helios-ingress-", dir=workdir))
        self.replicas = Replicas(engines, Limits(**(limits or {})), fps, model_name, root)
        # Every ingress replica signs client ids with the same secret, so a client keeps its id
        # whichever one answers.
        clients = ClientIds(bytes.fromhex(client_secret) if client_secret else None)
        self._app = FastAPI(title="helios", docs_url=None, redoc_url=None, openapi_url=None)
        _routes(self._app, self.replicas, token or None, clients)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


def build_app(model: str | Path | None = None, *, engines: int = 2, gpus_per_engine: float = 0,
              cpus_per_engine: float = 1, threads: int | None = None, token: str | None = None,
              limits: Limits | None = None, fps: int = 24, dtype: str = "auto", workdir: str | None = None,
              max_ongoing_requests: int = 64, health_check_period_s: float = 5.0):
    """The Ray Serve application: `serve.run(build_app(...))`. Nothing is loaded here: the engine
    replicas load the model where Ray places them (the model folder must be readable there).

    engines: how many engines (one deployment of one replica each); gpus_per_engine: K, the GPUs
    of one engine's group (`num_gpus`, so Ray places each engine on a node with K free GPUs)."""
    if engines < 1:
        raise ValueError(f"a Ray application needs at least one engine, got engines={engines}")
    model = str(model or bundled_model())
    limits = limits or Limits()
    # Few malloc arenas: the frames of each job are allocated and freed across many threads.
    actor = {"num_cpus": cpus_per_engine, "num_gpus": gpus_per_engine,
             "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}}
    bound = [
        serve.deployment(HeliosEngine, name=f"{ENGINE}{i}").options(
            num_replicas=1, ray_actor_options=actor, max_ongoing_requests=max_ongoing_requests,
            health_check_period_s=health_check_period_s, graceful_shutdown_timeout_s=30,
        ).bind(model, index=i, dtype=dtype, limits=asdict(limits), fps=fps, workdir=workdir, threads=threads)
        for i in range(engines)
    ]
    return serve.deployment(serve.ingress()(HeliosIngress), name=INGRESS).options(
        ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1000,
    ).bind(bound, token=token, limits=asdict(limits), fps=fps, model_name=Path(model).name,
           client_secret=secrets.token_hex(32), workdir=workdir)


def app_builder(args: dict[str, Any]):
    """For Serve config files (`import_path: helios.serve.ray:app_builder`, configs/serve/*.yaml)."""
    args = dict(args)
    limits = Limits(**args.pop("limits", {}))
    token = args.pop("token", None) or os.environ.get("HELIOS_SERVE_TOKEN") or None
    return build_app(args.pop("model", None), limits=limits, token=token, **args)


def run(model: str | Path | None, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        **kwargs) -> None:
    """`helios serve --ray`: connect to a Ray cluster (or start a local one), deploy, and serve until Ctrl-C."""
    import ray

    ray.init(address=address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model, **kwargs), name="helios", route_prefix="/", blocking=True)
