"""Generation jobs, their queue, and the worker threads that run them, one per engine.

One FIFO queue feeds every engine (serve.engines): a job goes to whichever engine is free. Each
engine has one thread here that pulls the job's chunks one at a time, so every control is a check
between (or inside) chunks: pause = stop pulling, stop/cancel = raise out of the engine's per-step
callback and close the chunk iterator (the device is free within one solver step), steer =
LivePrompt.steer. Other threads (the event loop) only flip flags under a lock; they never wait for
a device.
"""

from __future__ import annotations

import gc
import logging
import secrets
import shutil
import threading
import time
from collections import deque
from enum import Enum
from pathlib import Path
from typing import Protocol

from helios.engine.prompts import LivePrompt
from helios.serve.engines import Engine, EngineError, as_engines, describe_failure
from helios.serve.limits import Limits, RequestError
from helios.serve.params import JobRequest
from helios.serve.protocol import video_url

log = logging.getLogger("helios.serve")


class State(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    STOPPED = "stopped"  # ended early on request; the video holds the chunks made so far
    CANCELLED = "cancelled"  # no video
    FAILED = "failed"


FINAL = frozenset({State.DONE, State.STOPPED, State.CANCELLED, State.FAILED})
NO_ENGINE = "no engine is running on this server (they stopped; see the server log)"


class Interrupted(Exception):
    """Raised inside the worker to end a job early; `stop` keeps the video made so far."""

    def __init__(self, reason: str, stop: bool = False):
        super().__init__(reason)
        self.reason, self.stop = reason, stop


class Listener(Protocol):
    """Where a live job's events go (a WebSocket session). Called from the worker thread."""

    def event(self, message: dict) -> None:
        """Queue a JSON message; must not block."""

    def chunk(self, job: "Job", chunk) -> None:
        """Hand over a decoded chunk; may block while the client catches up, and raises Interrupted to give up."""


class Job:
    def __init__(self, request: JobRequest, owner: str, live: bool = False):
        self.id = secrets.token_urlsafe(16)  # unguessable: ids are capabilities, and are also checked by owner
        self.owner = owner
        self.request = request
        self.live = live  # tied to a WebSocket: cancelled when it closes
        self.waited = False  # an HTTP request is holding on for the result: cancelled if it disconnects
        self.prompt = LivePrompt(request.prompt)
        self.listener: Listener | None = None
        self.state = State.QUEUED
        self.error: str | None = None
        self.video_path: Path | None = None
        self.chunks_done = 0
        self.frames_done = 0
        self.gen_seconds = 0.0  # time spent generating (not queued, not paused)
        self.last_prompt = request.prompt  # the prompt of the newest chunk
        self.queue_position: int | None = None
        self.engine: int | None = None  # which of the server's engines runs (or ran) it
        self.finalizing: tuple[int, int] | None = None  # preview jobs: (chunks, of) decoded by the full VAE
        self.created = self.last_seen = time.monotonic()
        self.finished_at: float | None = None
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._paused = False
        self._interrupt: Interrupted | None = None

    # ---- what clients see --------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            fps = self.frames_done / self.gen_seconds if self.gen_seconds > 0 else None
            return {
                "job": self.id, "state": self.state.value, "mode": self.request.mode,
                "chunks_done": self.chunks_done, "chunks_total": self.request.chunks,
                "frames_done": self.frames_done, "frames_total": self.request.frames_out,
                "fps": round(fps, 3) if fps else None, "queue_position": self.queue_position,
                "engine": self.engine, "finalizing": list(self.finalizing) if self.finalizing else None,
                "prompt": self.last_prompt, "next_prompt": self.prompt.schedule.entries[-1][1],
                "error": self.error, "video": video_url(self.id) if self.video_path else None,
                "params": self.request.public(),
            }

    def _emit(self, message: dict) -> None:
        listener = self.listener
        if listener is not None:
            try:
                listener.event(message)
            except Exception:  # a dead listener must not take the worker down
                log.exception("job %s: listener failed", self.id)

    def emit_status(self) -> None:
        self._emit({"type": "status", **self.snapshot()})

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    # ---- controls (any thread) ---------------------------------------------------------------
    def steer(self, prompt: str) -> int:
        if self.state in FINAL:
            raise RequestError(f"the job has already ended ({self.state.value})", status=409)
        chunk = self.prompt.steer(prompt)
        self.emit_status()
        return chunk

    def pause(self) -> None:
        with self._lock:
            if self.state in FINAL:
                return
            self._paused = True
            if self.state == State.RUNNING:
                self.state = State.PAUSED
        self.emit_status()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            if self.state == State.PAUSED:
                self.state = State.RUNNING
            self._changed.notify_all()
        self.emit_status()

    def interrupt(self, reason: str, stop: bool = False) -> None:
        """End a running job at the next solver step (the worker finishes it)."""
        with self._lock:
            if self._interrupt is None:
                self._interrupt = Interrupted(reason, stop)
            self._changed.notify_all()

    # ---- worker side -------------------------------------------------------------------------
    def check(self, *_step) -> None:
        """The engine's on_step callback: leave the chunk at once when asked to."""
        if self._interrupt is not None:
            raise self._interrupt

    def wait_while_paused(self, max_pause_s: float) -> None:
        with self._lock:
            deadline = time.monotonic() + max_pause_s
            while self._paused and self._interrupt is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._interrupt = Interrupted(f"paused for more than {max_pause_s:.0f} s", stop=True)
                    break
                self._changed.wait(timeout=left)
            if self._interrupt is not None:
                raise self._interrupt

    def _start(self) -> None:
        with self._lock:
            self.state = State.PAUSED if self._paused else State.RUNNING
            self.queue_position = 0
        self.emit_status()

    def _chunk_done(self, chunk, seconds: float) -> None:
        with self._lock:
            self.chunks_done += int(chunk.complete)  # a chunk's early first frame is not the chunk
            self.frames_done += int(chunk.frames.shape[0])
            self.gen_seconds += seconds
            self.last_prompt = chunk.prompt

    def _finish(self, state: State, error: str | None = None, video: Path | None = None) -> None:
        with self._lock:
            if self.state in FINAL:
                return
            self.state, self.error, self.video_path = state, error, video
            self.queue_position = None
            self.finished_at = time.monotonic()
            self.request = self.request.without_media()
            if self._interrupt is not None:
                # Raising it gave it a traceback: the worker's and the engine's frames (the mp4 writer's
                # encoder, the chunk being made, the live listener). A finished job must not keep them.
                self._interrupt = self._interrupt.with_traceback(None)
            self._changed.notify_all()
        self.finished.set()
        self._emit({"type": "end", **self.snapshot()})


class _Slot:
    """One engine, the thread that feeds it, and the job it runs."""

    def __init__(self, index: int, engine: Engine, target):
        self.index, self.engine = index, engine
        self.job: Job | None = None
        self.jobs_run = 0
        self.thread = threading.Thread(target=target, args=(self,), name=f"helios-engine-{index}", daemon=True)


class Worker:
    """The queue and the engines' threads: each engine runs one job at a time, all take from one queue."""

    ENGINE_CHECK_S = 1.0  # an idle thread looks this often whether its engine is still alive

    def __init__(self, engines, workdir: Path, limits: Limits):
        """engines: an Engine, a pipeline (run in this process), or a list of either."""
        self.engines: list[Engine] = as_engines(engines)
        self.workdir = Path(workdir)
        self.limits = limits
        self._slots = [_Slot(i, e, self._loop) for i, e in enumerate(self.engines)]
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._all_lost = False  # every engine has stopped

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for slot in self._slots:
            slot.thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what is queued, interrupt what runs and wait for the threads (engines stay up:
        whoever started them closes them)."""
        with self._lock:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            running = [s.job for s in self._slots if s.job is not None]
            self._wake.notify_all()
        for job in queued:
            job._finish(State.CANCELLED, "the server is shutting down")
        for job in running:
            job.interrupt("the server is shutting down")
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            if slot.thread.is_alive():
                slot.thread.join(max(0.0, deadline - time.monotonic()))

    # ---- queue -------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if not any(e.alive for e in self.engines):  # (checked directly: a thread may not have noticed yet)
            raise RequestError(NO_ENGINE, status=503)
        with self._lock:
            if self._closing:
                raise RequestError("the server is shutting down", status=503)
            if self._all_lost:
                raise RequestError(NO_ENGINE, status=503)
            active = [*self._queue, *(s.job for s in self._slots if s.job is not None)]
            mine = sum(1 for j in active if j.owner == job.owner)
            if mine >= self.limits.max_jobs_per_client:
                raise RequestError(f"you already have {mine} job(s) queued or running (at most "
                                   f"{self.limits.max_jobs_per_client} per client); wait for one to finish or "
                                   "cancel it", status=429)
            if len(active) >= self.limits.max_queue:
                raise RequestError(f"the queue is full ({len(active)} jobs); try again later", status=503)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._renumber()
            self._wake.notify_all()
        log.info("job %s queued (%s, %d chunks, %dx%d)", job.id, job.request.mode, job.request.chunks,
                 job.request.width, job.request.height)

    def get(self, job_id: str, owner: str) -> Job | None:
        """The job, only for its owner: another client's id looks exactly like a missing one."""
        job = self._jobs.get(job_id)
        if job is None or not secrets.compare_digest(job.owner, owner):
            return None
        return job

    def jobs_of(self, owner: str) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.owner == owner]

    def running_jobs(self) -> list[Job]:
        with self._lock:
            return [s.job for s in self._slots if s.job is not None]

    def cancel(self, job: Job, reason: str) -> None:
        with self._lock:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
                self._renumber()
        if queued:
            job._finish(State.CANCELLED, reason)
            self._announce_positions()
        elif job.state not in FINAL:
            job.interrupt(reason)

    def forget(self, job: Job) -> None:
        """Cancel the job if it has not ended, then drop it and its files (a deleted video is gone)."""
        if job.state not in FINAL:
            self.cancel(job, "deleted on request")  # a running job removes its own folder as it ends
        with self._lock:
            self._jobs.pop(job.id, None)
        if job.state in FINAL:
            shutil.rmtree(self.workdir / job.id, ignore_errors=True)

    def stop(self, job: Job) -> None:
        """End early but keep the video made so far (a queued job has none: it is cancelled)."""
        if job.state == State.QUEUED:
            self.cancel(job, "stopped before it started")
        else:
            job.interrupt("stopped on request", stop=True)

    def stats(self) -> dict:
        with self._lock:
            slots = [(s, s.job) for s in self._slots]
            out = {"queued": len(self._queue), "known_jobs": len(self._jobs)}
        engines = [{**s.engine.describe(), "busy": job is not None, "jobs_run": s.jobs_run} for s, job in slots]
        return {**out, "running": [job.id for _, job in slots if job is not None],
                "jobs_run": sum(s.jobs_run for s, _ in slots), "engines": engines,
                "free_engines": sum(1 for e in engines if e["alive"] and not e["busy"])}

    def _renumber(self) -> None:
        ahead = sum(1 for s in self._slots if s.job is not None)  # the running jobs are ahead too
        for i, job in enumerate(self._queue):
            job.queue_position = ahead + i

    def _announce_positions(self) -> None:
        with self._lock:
            queued = list(self._queue)
        for job in queued:
            job.emit_status()

    # ---- housekeeping (called about once a second from the event loop, in a thread) -----------
    def reap(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        lim = self.limits
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.state not in FINAL and not job.live and not job.waited \
                    and now - job.last_seen > lim.abandon_after_s:
                log.info("job %s abandoned (no status request for %.0f s)", job.id, now - job.last_seen)
                self.cancel(job, f"abandoned: nobody asked for it for {lim.abandon_after_s:.0f} s")
        finished = sorted((j for j in jobs if j.state in FINAL and j.finished_at is not None),
                          key=lambda j: j.finished_at)
        expired = [j for j in finished if now - j.finished_at > lim.keep_finished_s]
        expired += finished[len(expired):max(len(expired), len(finished) - lim.max_finished_jobs)]
        for job in expired:
            with self._lock:
                self._jobs.pop(job.id, None)
            shutil.rmtree(self.workdir / job.id, ignore_errors=True)

    # ---- the engines' threads ----------------------------------------------------------------
    def _loop(self, slot: _Slot) -> None:
        slot.engine.enter_thread()
        while (job := self._next_job(slot)) is not None:
            self._announce_positions()
            try:
                self._run(job, slot.engine)
            except BaseException:  # the thread must outlive any job
                log.exception("job %s: unexpected error in the worker", job.id)
                job._finish(State.FAILED, "internal server error")
            finally:
                with self._lock:
                    slot.job = None
                    slot.jobs_run += 1
                    self._renumber()
                self._announce_positions()
                del job
                gc.collect()  # large CPU tensors of the finished job go now, not at some later collection
                slot.engine.after_job()
        if not self._closing:
            self._engine_lost(slot)

    def _next_job(self, slot: _Slot) -> Job | None:
        """The next queued job for this engine; None when the server closes or the engine has stopped."""
        while True:
            alive = slot.engine.alive  # (may stop a dead group's processes: not under the lock)
            with self._lock:
                if self._closing or not alive:
                    return None
                if self._queue:
                    job = self._queue.popleft()
                    slot.job = job
                    job.engine = slot.index
                    self._renumber()
                    return job
                self._wake.wait(self.ENGINE_CHECK_S)

    def _engine_lost(self, slot: _Slot) -> None:
        """An engine stopped (its processes exited): the others carry on; with none left, nothing waits."""
        left = sum(1 for s in self._slots if s is not slot and s.engine.alive)
        log.error("engine %d (%s) is out of service; %d engine(s) left", slot.index, ",".join(slot.engine.devices),
                  left)
        if left:
            return
        with self._lock:
            self._all_lost = True  # from now on submit refuses (nothing would take the job)
            queued = list(self._queue)
            self._queue.clear()
        for job in queued:
            job._finish(State.FAILED, NO_ENGINE)

    def _run(self, job: Job, engine: Engine) -> None:
        from helios.engine.video_io import VideoWriter

        req = job.request
        folder = self.workdir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "video.mp4"
        writer = VideoWriter(path, fps=req.fps)  # writes .video.partial.mp4, renamed only when complete
        job._start()
        log.info("job %s started on engine %s", job.id, job.engine)
        chunks = None
        full = _FullDecode() if req.preview else None  # preview: the mp4 is decoded by the full VAE at the end
        try:
            job.check()
            chunks = engine.run(req, job.prompt, job.check)
            while True:
                job.wait_while_paused(self.limits.max_pause_s)
                t0 = time.perf_counter()
                chunk = next(chunks, None)
                if chunk is None:
                    break
                job._chunk_done(chunk, time.perf_counter() - t0)
                listener = job.listener  # (the session may drop it at any moment)
                if listener is not None:
                    listener.chunk(job, chunk)  # the live view first: the mp4 can wait a moment
                if full is not None:
                    full.add(chunk)
                else:
                    writer.write(chunk.frames)
                job.emit_status()
                del chunk
            if full is not None:
                full.write(job, engine, writer)
            writer.close()
            job._finish(State.DONE, video=path)
            log.info("job %s done: %d frames in %.1f s", job.id, job.frames_done, job.gen_seconds)
        except Interrupted as e:
            _close(chunks)
            if e.stop and full is not None and full.chunks:
                full.write(job, engine, writer)
            if e.stop and writer.frames_written:
                writer.close()
                job._finish(State.STOPPED, e.reason, video=path)
            else:
                writer.discard()  # nobody will fetch it: no partial file, no "kept" line
                shutil.rmtree(folder, ignore_errors=True)
                job._finish(State.CANCELLED, e.reason)
            log.info("job %s %s after %d frames: %s", job.id, job.state.value, job.frames_done, e.reason)
        except Exception as e:  # a crash fails this job only
            if isinstance(e, EngineError):  # already logged where it happened (the engine's processes)
                log.error("job %s failed: %s", job.id, e)
            else:
                log.exception("job %s failed", job.id)
            _close(chunks)
            writer.discard()
            shutil.rmtree(folder, ignore_errors=True)
            job._finish(State.FAILED, describe_failure(e))


class _FullDecode:
    """A preview job's chunks kept as latents (their live frames came from the tiny decoder), decoded by the
    full VAE into the mp4 once the stream ends, with the progress shown to the client."""

    def __init__(self) -> None:
        self.chunks: list[tuple[object, int]] = []  # (latents tensor, frames to keep)
        self._first: dict[int, int] = {}  # chunk index -> its first frame (a chunk may come in two parts)

    def add(self, chunk) -> None:
        self._first.setdefault(chunk.index, chunk.first_frame)
        if chunk.latents is not None:
            end = chunk.first_frame + int(chunk.frames.shape[0])
            self.chunks.append((chunk.latents, end - self._first.pop(chunk.index)))

    def write(self, job: Job, engine: Engine, writer) -> None:
        total = len(self.chunks)
        for done in range(total):
            job.finalizing = (done, total)
            job._emit({"type": "finalizing", "done": done, "total": total})
            latents, frames = self.chunks[done]
            writer.write(engine.decode_full(latents, frames))
            self.chunks[done] = (None, 0)  # the latents are not needed any more
        job.finalizing = (total, total)
        job._emit({"type": "finalizing", "done": total, "total": total})
        self.chunks = []


def _close(chunks) -> None:
    if chunks is not None:
        try:
            chunks.close()
        except Exception:
            log.exception("closing the chunk stream failed")
