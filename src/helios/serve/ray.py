"""Helios on Ray Serve: engine replicas on a cluster, one ingress with the page, /api, /ws and /v1/videos.

    helios serve --ray --engines 4 --gpus-per-job 1               # on a Ray cluster (or a local one)
    serve run configs/serve/cluster.yaml                          # the same from a Serve config

Two deployments:

* `HeliosEngine`: ONE deployment of N engine replicas (`num_replicas`, or an `autoscaling_config`
  range), each holding a pipeline on its own GPU group (`ray_actor_options={"num_gpus": K}`; CPU
  replicas for the bundled model) and running jobs with the server's own Worker (serve.jobs: the
  same pause, stop, steer and cancel code as `helios serve`). A job is one long-running streaming
  call, `run_job`, and a replica takes one at a time (`max_ongoing_requests=1`): Ray Serve's own
  router queues the waiting jobs and gives each to a free replica, and its autoscaler sees every
  queued and running job. The call streams the job back: which replica took it, its status
  messages, a live job's frames (JPEG-encoded there), then the finished mp4 in pieces, then "end".
* `HeliosIngress`: the HTTP and WebSocket front (behind Ray Serve's proxy). It checks every request
  before anything is queued (the same limits and messages as `helios serve`), keeps every job's
  record from what its stream says, and writes the mp4 into its own cache (atomically, before the
  record says "done"). Controls (steer, pause, resume, stop, cancel of a running job) reach the
  replica that runs the job through the ingress's `JobControls` actor, which the replica asks for
  its job's controls between (and inside) chunks; a job still waiting in Ray's queue is cancelled by
  cancelling its call. Finished records and their mp4s are dropped after `limits.keep_finished_s`,
  and at most `limits.max_finished_jobs` are kept.

A replica that dies ends the streams of the job it ran: that job is reported `failed` with the
reason (no mp4: the ingress renames its copy only once the last piece arrived), Ray Serve starts a
replacement, and the other replicas carry on. `check_health` fails a replica whose engine has
stopped, so Ray replaces it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

from helios.engine.prompts import PromptSchedule
from helios.model_folder import CHUNK_FRAMES, bundled_model
from helios.serve.auth import ClientIds, authorized, same_origin
from helios.serve.engines import from_wire, to_wire
from helios.serve.jobs import FINAL, Job
from helios.serve.limits import Limits, RequestError, check_known_fields, check_prompt
from helios.serve.openai_api import ApiError, JobTable, job_record, openai_app
from helios.serve.params import JobRequest
from helios.serve.protocol import CLIENT_COOKIE, frame_messages, status_url, video_url
from helios.serve.session import SessionListener

log = logging.getLogger("helios.serve")

ENGINE = "HeliosEngine"
INGRESS = "HeliosIngress"
FINAL_NAMES = frozenset(s.value for s in FINAL)
VIDEO_PIECE = 1 << 20  # the mp4 travels to the ingress in pieces of this many bytes
CONTROL_POLL_S = 1.0  # a replica's wait for its job's next control (a long poll: controls arrive at once)
CONTROL_ANSWER_S = 30.0  # how long the ingress waits for the replica to apply a control
WAIT_POLL_S = 0.25  # how often a ?wait=1 request looks whether its client is still there
SWEEP_S = 5.0  # how often the ingress drops expired records and cancels abandoned jobs
DESCRIBE_TIMEOUT_S = 120.0  # the first request waits this long for a replica to describe the model
NO_REPLICA = "no engine replica is running (see `serve status` and the replica logs)"
GONE_ERRORS = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaUnavailableError",
               "WorkerCrashedError", "NodeDiedError")  # how a dead replica shows in its stream


# ----------------------------------------------------------------------------------------------
# the engine replicas


class _StatusListener(SessionListener):
    """An HTTP job's listener on a replica: its status messages travel on the stream, its frames do not."""

    def chunk(self, job: Job, chunk) -> None:
        pass


class HeliosEngine:
    """One engine replica: a pipeline and the Worker that runs its one job at a time (`run_job`)."""

    def __init__(self, model: str, dtype: str = "auto", limits: dict | None = None, fps: int = 24,
                 workdir: str | None = None, threads: int | None = None):
        import torch

        from helios.engine.pipeline import load_pipeline
        from helios.serve.engines import GroupEngine, LocalEngine, torch_dtype
        from helios.serve.jobs import Worker

        if threads:
            torch.set_num_threads(threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per replica
        # The ingress enforces the per-client and queue limits for the whole application; here Ray
        # hands over one job at a time, so the worker's own queue never holds more than that.
        self.limits = replace(Limits(**(limits or {})), max_jobs_per_client=1 << 20, max_queue=1 << 20)
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
        log.info("replica %s: engine on %s (pid %d)", self.replica, device, os.getpid())

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

    # ---- calls from the ingress ---------------------------------------------------------------
    def describe(self) -> dict:
        """The model's spec and this replica's devices (the ingress asks once, to check requests)."""
        return {"replica": self.replica, "pid": os.getpid(), "spec": self.worker.engines[0].spec,
                "devices": self.worker.engines[0].describe()["devices"]}

    async def run_job(self, request: JobRequest, schedule: PromptSchedule | None, owner: str, live: bool,
                      controls, key: str):
        """Run one job and stream it: {"type": "replica"}, its status (and a live job's "chunk")
        messages, the mp4 as "video" pieces, then "end". `controls` is the ingress's JobControls
        actor, asked for this job's controls (under `key`). A cancelled call cancels the job."""
        loop = asyncio.get_running_loop()
        listener = (SessionListener if live else _StatusListener)(loop, self.limits.stall_timeout_s)
        job = self.table.create(from_wire(request), owner, schedule, live=live)
        job.listener = listener
        if job.state in FINAL:  # it ended before the listener was there to hear it
            listener.event({"type": "end", **job.snapshot()})
        taking = asyncio.create_task(self._take_controls(job, controls, key, listener))
        try:
            yield {"type": "replica", "replica": self.replica, "pid": os.getpid(),
                   "devices": self.worker.engines[0].describe()["devices"]}
            async for message in self._messages(listener):
                yield message
            for piece in _pieces(job.video_path):
                yield {"type": "video", "data": piece}
            yield {"type": "end", **job_record(job)}
        finally:
            taking.cancel()
            listener.close()
            job.listener = None
            if job.state not in FINAL:  # the ingress cancelled the call (or is gone)
                self.worker.cancel(job, "cancelled on request")
            self.worker.forget(job)  # the ingress holds the record and the mp4 now
            _give_back_free_memory()

    async def _messages(self, listener: SessionListener):
        """The job's messages up to (not including) its end; chunks become frame messages."""
        while True:
            item = await listener.queue.get()
            if isinstance(item, dict):
                if item["type"] == "end":
                    return
                yield item
                continue
            try:
                frames = await asyncio.to_thread(frame_messages, item.index, item.first_frame, item.frames.numpy())
                yield {"type": "chunk", "index": item.index, "first_frame": item.first_frame, "frames": len(frames),
                       "prompt": item.prompt, "total_chunks": item.total_chunks, "seconds": round(item.seconds, 3),
                       "complete": item.complete, "decoder": getattr(item, "decoder", "full"), "messages": frames}
            finally:
                listener.chunk_sent()
            del item

    async def _take_controls(self, job: Job, controls, key: str, listener: SessionListener) -> None:
        """Apply the job's controls as they arrive; each answer goes back on the job's stream."""
        try:
            while job.state not in FINAL:
                for control in await controls.take.remote(key, CONTROL_POLL_S):
                    listener.event(self._apply(job, control))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the ingress (and its actor) is gone: nobody will hear this job
            log.warning("job %s: its controls are unreachable (%s); cancelling it", job.id, type(e).__name__)
            self.worker.cancel(job, "the ingress that took this job stopped")

    def _apply(self, job: Job, control: dict) -> dict:
        action, answer = control["action"], {"type": "applied", "id": control["id"]}
        try:
            if action == "steer":
                answer["from_chunk"] = job.steer(control["prompt"])
            elif action == "pause":
                job.pause()
            elif action == "resume":
                job.resume()
            elif action == "stop":
                self.worker.stop(job)
            elif action == "cancel":
                self.worker.cancel(job, control.get("reason") or "cancelled on request")
        except RequestError as e:
            answer.update(error=e.message, status=e.status)
        return {**answer, "record": job_record(job)}


def _pieces(path: Path | None):
    if path is None or not path.exists():
        return
    with open(path, "rb") as f:
        while piece := f.read(VIDEO_PIECE):
            yield piece


def _give_back_free_memory() -> None:
    """Return the C heap's free pages to the system after a job: a job's frames pass through many
    threads (the engine's, the JPEG encoders', Ray's), and glibc keeps what they freed otherwise."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ----------------------------------------------------------------------------------------------
# the control channel


class JobControls:
    """A Ray actor of the ingress: the controls posted for each job, until its replica takes them."""

    def __init__(self) -> None:
        self._pending: dict[str, list[dict]] = {}
        self._posted: dict[str, asyncio.Event] = {}

    def post(self, key: str, control: dict) -> None:
        self._pending.setdefault(key, []).append(control)
        self._event(key).set()

    async def take(self, key: str, timeout: float) -> list[dict]:
        """The job's controls, waiting up to `timeout` for one when there are none."""
        event = self._event(key)
        if not self._pending.get(key):
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        event.clear()
        return self._pending.pop(key, [])

    def forget(self, key: str) -> None:
        self._pending.pop(key, None)
        self._posted.pop(key, None)

    def _event(self, key: str) -> asyncio.Event:
        return self._posted.setdefault(key, asyncio.Event())


# ----------------------------------------------------------------------------------------------
# the ingress's records


@dataclass
class Tracked:
    """What the ingress knows of one job: its last record, and the streaming call that runs it."""

    owner: str
    record: dict
    live: bool = False
    call: Any = None  # the DeploymentResponseGenerator of run_job
    replica: str | None = None  # set once a replica has taken it
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    messages: asyncio.Queue | None = None  # a WebSocket session's copy of the stream
    answers: dict = field(default_factory=dict)  # control id -> future of the replica's answer

    @property
    def final(self) -> bool:
        return self.record["state"] in FINAL_NAMES


class JobBook:
    """The ingress's job records and cached mp4s, bounded: a finished job is dropped (with its mp4)
    `keep_finished_s` after it ended, and only the newest `max_finished_jobs` finished ones are kept."""

    def __init__(self, limits: Limits, cache: Path):
        self.limits, self.cache = limits, cache
        self.jobs: dict[str, Tracked] = {}

    def video_path(self, job_id: str) -> Path:
        return self.cache / f"{job_id}.mp4"

    def add(self, tracked: Tracked) -> None:
        self.jobs[tracked.record["job"]] = tracked

    def get(self, job_id: str, owner: str) -> Tracked:
        """The job, only for its owner: another client's id looks exactly like a missing one."""
        tracked = self.jobs.get(job_id)
        if tracked is None or tracked.owner != owner:
            raise ApiError("no such job for this client", status=404, param="video_id")
        tracked.last_seen = time.monotonic()
        return tracked

    def of(self, owner: str) -> list[Tracked]:
        return sorted((t for t in self.jobs.values() if t.owner == owner), key=lambda t: t.created)

    def active(self, owner: str | None = None) -> int:
        return sum(1 for t in self.jobs.values() if not t.final and owner in (None, t.owner))

    def finish(self, tracked: Tracked, record: dict, now: float | None = None) -> None:
        if tracked.final:
            return
        tracked.record = record
        tracked.finished_at = time.monotonic() if now is None else now
        tracked.ended.set()

    def drop(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.video_path(job_id).unlink(missing_ok=True)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop the finished jobs past keep_finished_s, then the oldest beyond max_finished_jobs."""
        now = time.monotonic() if now is None else now
        finished = sorted((t for t in self.jobs.values() if t.finished_at is not None), key=lambda t: t.finished_at)
        old = [t for t in finished if now - t.finished_at > self.limits.keep_finished_s]
        over = max(0, len(finished) - len(old) - self.limits.max_finished_jobs)
        gone = [t.record["job"] for t in old + finished[len(old):len(old) + over]]
        for job_id in gone:
            self.drop(job_id)
        return gone


# ----------------------------------------------------------------------------------------------
# the ingress


class Replicas:
    """The ingress's side of the engine replicas: one streaming call per job, the records heard on
    it, and the controls sent to the replica that runs it."""

    def __init__(self, engines, controls, limits: Limits, fps: int, model: str, devices: list[str], workdir: Path):
        self.engines = engines  # the DeploymentHandle of HeliosEngine
        self.controls = controls  # this ingress's JobControls actor
        self.limits, self.fps, self.model, self.devices = limits, fps, model, devices
        self.model_name = Path(model).name
        self.scratch = workdir / "uploads"
        for d in (self.scratch, workdir / "videos"):
            d.mkdir(parents=True, exist_ok=True)
        self.book = JobBook(limits, workdir / "videos")
        self.seen: dict[str, dict] = {}  # replica id -> its pid and devices, from the jobs it took
        self._spec = None
        self._sweeper: asyncio.Task | None = None
        self._control_ids = 0

    @property
    def spec(self):
        if self._spec is None:
            raise RequestError(NO_REPLICA, status=503)
        return self._spec

    async def ensure_spec(self) -> None:
        """The model's spec, once: from its config files when this node can read the model folder,
        else from a replica (every replica runs the same model)."""
        from helios.engine.pipeline import read_spec

        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep())
        if self._spec is not None:
            return
        try:
            self._spec = await asyncio.to_thread(read_spec, self.model)
            return
        except (OSError, ValueError):
            pass
        try:
            self._spec = (await asyncio.wait_for(self.engines.describe.remote(), DESCRIBE_TIMEOUT_S))["spec"]
        except Exception as e:
            raise RequestError(f"{NO_REPLICA}: {type(e).__name__}", status=503) from None

    async def engines_now(self) -> list[dict]:
        """The replicas for /api/config: those Ray Serve runs now, described by the jobs they took."""
        running = await asyncio.to_thread(_running_replicas) or max(1, len(self.seen))
        busy = {t.replica for t in self.book.jobs.values() if t.replica and not t.final}
        known = [{"replica": r, "devices": s["devices"], "alive": True, "busy": r in busy}
                 for r, s in sorted(self.seen.items()) if s["alive"]][:running]
        idle = {"replica": None, "devices": self.devices, "alive": True, "busy": False}
        return known + [idle] * (running - len(known))

    # ---- jobs ---------------------------------------------------------------------------------
    async def create(self, request: JobRequest, schedule: PromptSchedule | None, owner: str,
                     live: bool = False) -> dict:
        """Check the limits, then hand the job to Ray Serve (its router queues it for a free replica)."""
        self.book.expire()
        self.check_client_limit(owner)
        active = self.book.active()
        if active >= self.limits.max_queue:
            raise RequestError(f"the queue is full ({active} jobs); try again later", status=503)
        job = Job(request, owner, live=live)  # (its id and its first record; it runs on a replica)
        tracked = Tracked(owner, {**job_record(job), "replica": None}, live=live,
                          messages=asyncio.Queue() if live else None)
        # The call and the task that reads it belong to no request: Ray Serve cancels the calls a
        # request made when its client hangs up, and a job outlives the request that started it.
        detached = contextvars.Context()
        tracked.call = detached.run(self.engines.options(stream=True).run_job.remote,
                                    to_wire(request), schedule, owner, live, self.controls, job.id)
        self.book.add(tracked)
        _background(self._follow(tracked), detached)
        return self.record_of(tracked)

    def check_client_limit(self, owner: str) -> None:
        mine = self.book.active(owner)
        if mine >= self.limits.max_jobs_per_client:
            raise RequestError(f"you already have {mine} job(s) queued or running (at most "
                               f"{self.limits.max_jobs_per_client} per client); wait for one to finish or "
                               "cancel it", status=429)

    def record_of(self, tracked: Tracked) -> dict:
        record = tracked.record
        if record["state"] == "queued":  # where it stands in Ray's queue, as far as this ingress knows
            waiting = sorted((t for t in self.book.jobs.values() if t.record["state"] == "queued"),
                             key=lambda t: t.created)
            running = sum(1 for t in self.book.jobs.values() if t.replica and not t.final)
            record = {**record, "queue_position": running + waiting.index(tracked)}
        return record

    async def _follow(self, tracked: Tracked) -> None:
        """Read a job's stream to its end: records, a live job's messages, and the mp4 into the cache."""
        job_id = tracked.record["job"]
        path = self.book.video_path(job_id)
        partial = path.with_suffix(".partial")
        try:
            async for message in tracked.call:
                kind = message["type"]
                if kind == "replica":
                    tracked.replica = message["replica"]
                    self.seen[message["replica"]] = {"pid": message["pid"], "devices": message["devices"],
                                                     "alive": True}
                    tracked.record = {**tracked.record, "replica": tracked.replica}
                elif kind == "video":
                    await asyncio.to_thread(_append, partial, message["data"])
                elif kind == "applied":
                    self._answered(tracked, message)
                elif kind == "end":
                    record = self._public(tracked, message)
                    if record["video"] and partial.exists():
                        os.replace(partial, path)  # complete: the record may now say so
                    self.book.finish(tracked, record)
                    self._relay(tracked, {"type": "end", **record})
                    return
                else:
                    if kind == "status":
                        tracked.record = self._public(tracked, message)
                    self._relay(tracked, message)
            self._fail(tracked, "its stream ended early")
        except (Exception, asyncio.CancelledError) as e:
            if tracked.final:  # cancelled here while it waited in Ray's queue
                return
            if isinstance(e, asyncio.CancelledError) or type(e).__name__ == "RequestCancelledError":
                self._end(tracked, "cancelled", "cancelled on request")
                return
            if type(e).__name__ in GONE_ERRORS and tracked.replica:
                self.seen.get(tracked.replica, {})["alive"] = False
            self._fail(tracked, type(e).__name__)
            log.warning("job %s: its stream failed (%s: %s)", job_id, type(e).__name__, str(e)[:300])
        finally:
            tracked.call = None  # (what is left of the stream goes now, not with the record)
            partial.unlink(missing_ok=True)
            for answer in tracked.answers.values():
                if not answer.done():
                    answer.set_result(None)
            self.controls.forget.remote(job_id)

    def _public(self, tracked: Tracked, message: dict) -> dict:
        """A replica's record or status message, as the ingress's record: its public id, video URL
        and replica, and the time it was queued here."""
        job_id = tracked.record["job"]
        record = {k: v for k, v in message.items() if k != "type"}
        return {**tracked.record, **record, "job": job_id, "replica": tracked.replica,
                "created_at": tracked.record["created_at"],
                "video": video_url(job_id) if record.get("video") else None}

    def _relay(self, tracked: Tracked, message: dict) -> None:
        if tracked.messages is not None:
            tracked.messages.put_nowait(message)

    def _fail(self, tracked: Tracked, why: str) -> None:
        if tracked.replica:
            error = f"the engine replica {tracked.replica} running this job stopped ({why}); try again"
        else:
            error = f"no engine replica could take this job ({why}); try again"
        self._end(tracked, "failed", error)

    def _end(self, tracked: Tracked, state: str, error: str | None) -> None:
        record = {**tracked.record, "state": state, "error": error, "queue_position": None, "video": None,
                  "completed_at": int(time.time())}
        self.book.finish(tracked, record)
        self._relay(tracked, {"type": "end", **record})

    # ---- controls -----------------------------------------------------------------------------
    async def control(self, job_id: str, owner: str, action: str, prompt: str | None = None,
                      reason: str | None = None) -> dict:
        """steer, pause, resume, stop or cancel: to the replica that runs the job (a job still in
        Ray's queue is cancelled by cancelling its call). Answers the record (and from_chunk)."""
        tracked = self.book.get(job_id, owner)
        if tracked.final:
            if action == "steer":
                raise RequestError(f"the job has already ended ({tracked.record['state']})", status=409)
            return self.record_of(tracked)
        if action in ("cancel", "stop") and tracked.replica is None:
            tracked.call.cancel()
            self._end(tracked, "cancelled", "stopped before it started" if action == "stop" else
                      reason or "cancelled on request")
            return self.record_of(tracked)
        self._control_ids += 1
        control = {"id": self._control_ids, "action": action, "prompt": prompt, "reason": reason}
        answer = asyncio.get_running_loop().create_future()
        tracked.answers[control["id"]] = answer
        self.controls.post.remote(job_id, control)
        if tracked.replica is None:  # applied when a replica takes it: answer what it will be
            if action == "steer":
                return {**self.record_of(tracked), "next_prompt": prompt, "from_chunk": 0}
            return self.record_of(tracked)
        try:
            applied = await asyncio.wait_for(answer, CONTROL_ANSWER_S)
        except asyncio.TimeoutError:
            raise RequestError(f"the engine replica running this job did not answer the {action} within "
                               f"{CONTROL_ANSWER_S:.0f} s", status=503) from None
        finally:
            tracked.answers.pop(control["id"], None)
        if applied is None:  # the job ended meanwhile
            if action == "steer":
                raise RequestError(f"the job has already ended ({tracked.record['state']})", status=409)
            return self.record_of(tracked)
        if "error" in applied:
            raise RequestError(applied["error"], applied["status"])
        extra = {"from_chunk": applied["from_chunk"]} if "from_chunk" in applied else {}
        return {**self.record_of(tracked), **extra}

    def _answered(self, tracked: Tracked, message: dict) -> None:
        if not tracked.final:
            tracked.record = self._public(tracked, message["record"])
        answer = tracked.answers.get(message["id"])
        if answer is not None and not answer.done():
            answer.set_result(message)

    # ---- what the routes ask (and /v1, as its Videos) ------------------------------------------
    async def record(self, job_id: str, owner: str) -> dict:
        return self.record_of(self.book.get(job_id, owner))

    async def records(self, owner: str) -> list[dict]:
        return [self.record_of(t) for t in self.book.of(owner)]

    async def delete(self, job_id: str, owner: str) -> None:
        await self.control(job_id, owner, "cancel", reason="deleted on request")
        self.book.drop(job_id)

    async def video_file(self, job_id: str, owner: str) -> Path:
        tracked = self.book.get(job_id, owner)
        record = tracked.record
        if not tracked.final:
            raise ApiError(f"the video is not finished yet ({record['state']}, {record['chunks_done']}/"
                           f"{record['chunks_total']} chunks)", status=409, param="video_id")
        path = self.book.video_path(job_id)
        if not record["video"] or not path.exists():
            raise ApiError(f"this job has no video ({record['state']}{': ' + record['error'] if record['error'] else ''})",
                           status=410, param="video_id")
        return path

    async def _sweep(self) -> None:
        """Drop expired records and their mp4s now and then (also done with every new job)."""
        while True:
            await asyncio.sleep(SWEEP_S)
            try:
                self.book.expire()
            except Exception:
                log.exception("the ingress's sweep failed")


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _running_replicas() -> int:
    """How many engine replicas Ray Serve runs now (0 if it cannot say)."""
    try:
        app = serve.status().applications[serve.get_replica_context().app_name]
        return app.deployments[ENGINE].replica_states.get("RUNNING", 0)
    except Exception:
        return 0


def _routes(app: FastAPI, replicas: Replicas, token: str | None, clients: ClientIds) -> None:
    """The page, /api, /ws and /v1 of the ingress: the protocol of `helios serve` (docs/serving.md)."""
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
        await replicas.ensure_spec()
        spec = replicas.spec
        engines = await replicas.engines_now()
        queued = sum(1 for t in replicas.book.jobs.values() if t.record["state"] == "queued")
        body = {"client": client, "model": replicas.model_name, "device": engines[0]["devices"][0],
                "engines": engines, "devices_per_engine": len(engines[0]["devices"]),
                "default_size": list(spec.default_size), "presets": spec.runnable_presets(),
                "default_preset": spec.default_preset, "example_prompt": spec.example_prompt,
                "fps": replicas.fps, "chunk_frames": CHUNK_FRAMES, "preview": spec.preview,
                "limits": asdict(replicas.limits), "queued": queued, "busy": all(e["busy"] for e in engines)}
        cookie = response.headers.get("set-cookie")
        return JSONResponse(body, headers={"set-cookie": cookie} if cookie else None)

    @app.post("/api/jobs", status_code=202)
    async def submit(request: Request, wait: bool = False):
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
            body = await json_body(request, limit=64 << 10)
            check_known_fields(body, ("prompt",), "a steer")
            prompt = check_prompt(body.get("prompt"), replicas.limits)
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


def _background(coroutine, context: contextvars.Context | None = None) -> None:
    task = asyncio.get_running_loop().create_task(coroutine, context=context)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _wait_for(job_id: str, client: str, request: Request, replicas: Replicas):
    """?wait=1, as on `helios serve`: hold the request until the job ends and answer its mp4; a client
    that hangs up cancels the job."""
    tracked = replicas.book.get(job_id, client)

    def hang_up():
        return replicas.control(job_id, client, "cancel", reason="the client disconnected")

    try:
        while not tracked.ended.is_set():
            if await request.is_disconnected():
                await hang_up()
                return Response(status_code=499)
            try:
                await asyncio.wait_for(tracked.ended.wait(), WAIT_POLL_S)
            except asyncio.TimeoutError:
                pass
    except asyncio.CancelledError:  # Ray Serve's proxy cancels the request when its client hangs up
        _background(hang_up())
        raise
    record = tracked.record
    if record["state"] == "done" and record["video"]:
        path = await replicas.video_file(job_id, client)
        return FileResponse(path, media_type="video/mp4", filename=f"helios-{job_id[:8]}.mp4",
                            headers={"X-Helios-Job": job_id})
    status = 500 if record["state"] == "failed" else 409
    return JSONResponse({"error": record["error"] or record["state"], **record}, status_code=status)


async def _live_session(ws: WebSocket, replicas: Replicas, client: str) -> None:
    """/ws on the ingress: the start message is checked here, the job's stream is relayed as the
    replica sends it, and controls go to that replica. Closing the socket cancels the job."""
    from helios.serve.protocol import CLOSE_DONE
    from helios.serve.session import _json, _refuse, receive_start

    try:
        await replicas.ensure_spec()
        request = await receive_start(ws, replicas.spec, replicas.limits, replicas.fps, replicas.scratch)
        record = await replicas.create(request, None, client, live=True)
    except RequestError as e:
        await _refuse(ws, e)
        return
    except WebSocketDisconnect:
        return
    job_id = record["job"]
    tracked = replicas.book.get(job_id, client)
    await ws.send_json({"type": "accepted", "client": client, **record})

    async def relay() -> None:
        while True:
            message = await tracked.messages.get()
            frames = message.pop("messages", None)
            await ws.send_json(message)
            for frame in frames or ():
                await ws.send_bytes(frame)
            if message["type"] == "end":
                return

    async def read() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                await _control(_json(message), job_id, client, replicas, ws)
            except RequestError as e:
                tracked.messages.put_nowait({"type": "error", "error": e.message, "status": e.status})

    sender, reader = asyncio.create_task(relay()), asyncio.create_task(read())
    try:
        done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, reader):
            task.cancel()
        tracked.messages = None
        if not tracked.final:
            _background(replicas.control(job_id, client, "cancel", reason="the client disconnected"))
    if sender in done and not sender.cancelled() and sender.exception() is None:
        try:
            await ws.close(CLOSE_DONE)
        except (RuntimeError, WebSocketDisconnect):
            pass


async def _control(message: dict, job_id: str, client: str, replicas: Replicas, ws: WebSocket) -> None:
    kind = message.get("type")
    check_known_fields(message, ("type", "prompt") if kind == "steer" else ("type",), f"a {str(kind)[:20]!r} message")
    if kind not in ("steer", "pause", "resume", "stop"):
        raise RequestError(f"unknown message type {kind!r}: use steer, pause, resume or stop")
    prompt = check_prompt(message.get("prompt"), replicas.limits) if kind == "steer" else None
    answer = await replicas.control(job_id, client, kind, prompt)
    if kind == "steer":
        await ws.send_json({"type": "steered", "prompt": prompt, "from_chunk": answer["from_chunk"]})


class HeliosIngress:
    """The front deployment: a FastAPI app built on its replica (Ray Serve's late-bound ingress)."""

    def __init__(self, engines, model: str, token: str | None = None, limits: dict | None = None, fps: int = 24,
                 gpus_per_engine: float = 0, client_secret: str = "", workdir: str | None = None):
        import ray

        root = Path(tempfile.mkdtemp(prefix="helios-ingress-", dir=workdir))
        # The control channel lives and dies with this ingress replica (it owns the actor).
        controls = ray.remote(num_cpus=0)(JobControls).remote()
        devices = [f"cuda:{i}" for i in range(int(gpus_per_engine))] or ["cpu"]  # (as each replica sees them)
        self.replicas = Replicas(engines, controls, Limits(**(limits or {})), fps, model, devices, root)
        # Every ingress replica signs client ids with the same secret, so a client keeps its id
        # whichever one answers.
        clients = ClientIds(bytes.fromhex(client_secret) if client_secret else None)
        self._app = FastAPI(title="helios", docs_url=None, redoc_url=None, openapi_url=None)
        _routes(self._app, self.replicas, token or None, clients)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    def replicas_seen(self) -> dict[str, dict]:
        """The engine replicas this ingress has heard from (id -> pid, devices, alive): for tests and tools."""
        return dict(self.replicas.seen)


def build_app(model: str | Path | None = None, *, engines: int = 2, autoscaling: dict | None = None,
              gpus_per_engine: float = 0, cpus_per_engine: float = 1, threads: int | None = None,
              token: str | None = None, limits: Limits | None = None, fps: int = 24, dtype: str = "auto",
              workdir: str | None = None, health_check_period_s: float = 5.0):
    """The Ray Serve application: `serve.run(build_app(...))`. Nothing is loaded here: the engine
    replicas load the model where Ray places them (the model folder must be readable there).

    engines: how many engine replicas (`num_replicas` of the one HeliosEngine deployment), or
    autoscaling: Ray Serve's autoscaling_config for it instead, e.g. {"min_replicas": 1,
    "max_replicas": 8} (a replica runs one job: the target is one ongoing job per replica unless
    given). gpus_per_engine: K, the GPUs of one replica's engine group (`num_gpus`, so Ray places
    each replica on a node with K free GPUs)."""
    if engines < 1:
        raise ValueError(f"a Ray application needs at least one engine, got engines={engines}")
    scaling = replica_count(engines, autoscaling)
    model = str(model or bundled_model())
    limits = limits or Limits()
    # Few malloc arenas: the frames of each job are allocated and freed across many threads.
    actor = {"num_cpus": cpus_per_engine, "num_gpus": gpus_per_engine,
             "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}}
    engine = serve.deployment(HeliosEngine, name=ENGINE).options(
        **scaling, ray_actor_options=actor, max_ongoing_requests=1,  # one job per replica at a time
        health_check_period_s=health_check_period_s, graceful_shutdown_timeout_s=30,
    ).bind(model, dtype=dtype, limits=asdict(limits), fps=fps, workdir=workdir, threads=threads)
    return serve.deployment(serve.ingress()(HeliosIngress), name=INGRESS).options(
        ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1000,
    ).bind(engine, model, token=token, limits=asdict(limits), fps=fps, gpus_per_engine=gpus_per_engine,
           client_secret=secrets.token_hex(32), workdir=workdir)


def replica_count(engines: int, autoscaling: dict | None) -> dict:
    """The deployment's num_replicas, or its autoscaling_config (checked here, before anything starts)."""
    if not autoscaling:
        return {"num_replicas": engines}
    config = {"target_ongoing_requests": 1, **autoscaling}
    low, high = config.get("min_replicas", 1), config.get("max_replicas")
    if not isinstance(high, int) or not isinstance(low, int) or not 0 <= low <= high or high < 1:
        raise ValueError(f"autoscaling needs whole numbers 0 <= min_replicas <= max_replicas (max at least 1), "
                         f"got {autoscaling}")
    return {"autoscaling_config": config}


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
