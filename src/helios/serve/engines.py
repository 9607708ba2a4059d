"""Engines: what runs a job's chunks for the server's worker threads.

* `LocalEngine`: one pipeline in the server process, on one device (the only kind before --gpus;
  with `--gpus N --gpus-per-job 1` there is one per GPU, each fed by its own worker thread).
* `GroupEngine`: a context-parallel group of K processes (one per device, NCCL on CUDA, gloo on
  the CPU) started with torch.multiprocessing. The server talks to the group's rank 0 over a pipe;
  rank 0 passes every message on to the other ranks (a broadcast on a gloo "control" group), so
  all ranks run the same job, the same prompt per chunk and stop at the same step, as
  `helios generate --gpus` keeps them in lockstep by running the same code on the same inputs.

Both engines have one method that matters, `run(request, prompt, on_step)`: an iterator of decoded
chunks with the semantics of `HeliosVideoPipeline.stream` (pulled one chunk at a time, the prompt
read once per chunk, `on_step` called after every solver step and allowed to raise to end the job,
closing the iterator abandons the job). The worker (serve.jobs) runs every job through it, so
pause, stop, steer and cancel are the same code whichever engine a job lands on.

The pipe protocol, per job (server -> rank 0, and what rank 0 answers):

    ("job", request)    -                               start a job (no answer)
    ("next",)           ("at", k) -> prompt at chunk k   rank 0 asks, the server answers from the job's
                        ("step", k, stage, i) -> "go" | "halt"     LivePrompt / controls,
                        then ("chunk", chunk) | ("end",) | ("error", message, ranks_in_step)
    ("cancel",)         -                               abandon the job between chunks
    ("quit",)           -                               shut the group down

A "halt" answer ends the job on every rank at that step; rank 0 sends nothing more for it.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from helios.engine.prompts import LivePrompt
from helios.runtime import resolve_dtype
from helios.serve.params import JobRequest

log = logging.getLogger("helios.serve")

OnStep = Callable[[int, int, int], None]

KEEPALIVE_S = 60.0  # rank 0 pings the other ranks this often while it waits for the server
CONTROL_TIMEOUT = timedelta(minutes=30)  # the control group's collectives (well above KEEPALIVE_S)
RESYNC_TIMEOUT = timedelta(seconds=60)  # after a failed job: how long the ranks wait for each other
STOP_GRACE_S = 10.0  # closing: how long a group may take to quit before it is killed


class EngineError(RuntimeError):
    """A job failed in an engine group; the message is what the job's status says."""


class EngineDied(EngineError):
    """An engine's process exited or lost step with the others: the engine takes no more jobs."""


class EngineStartError(RuntimeError):
    """An engine could not be started (its model did not load, a process exited)."""


def describe_failure(e: BaseException) -> str:
    """What a failed job's status says about the exception that ended it."""
    from helios.engine.pipeline import InputError

    if isinstance(e, (InputError, EngineError)):
        return str(e)
    if type(e).__name__ == "OutOfMemoryError":
        return "the device ran out of memory: try fewer frames, a smaller size or fewer steps"
    return f"generation failed: {type(e).__name__}: {str(e)[:300]}"


def stream_job(pipe, request: JobRequest, prompt: LivePrompt, on_step: OnStep) -> Iterator:
    """The one place a job's request becomes a pipeline stream: in the server's engine threads and
    on every rank of an engine group."""
    return pipe.stream(prompt, num_frames=request.frames, height=request.height, width=request.width,
                       settings=request.preset, steps=request.steps, guidance_scale=request.guidance,
                       amplify_first_chunk=False if request.fast_start else None, first_frame_early=request.fast_start,
                       seed=request.seed, negative_prompt=request.negative, on_step=on_step,
                       decoder="tiny" if request.preview else "full", keep_latents=request.preview,
                       **request.engine_inputs())


def torch_dtype(name: str, device: str) -> torch.dtype:
    """--dtype for a device: auto is bfloat16 on CUDA, float32 elsewhere."""
    return resolve_dtype(name, device)


def device_groups(gpus: int | None, gpus_per_job: int | None, device: str | None,
                  cuda_devices: int) -> list[list[str]]:
    """The device groups of `helios serve --gpus N --gpus-per-job K`: N/K engines of K devices.

    device None means CUDA when --gpus is given (and the default device otherwise); --device cpu
    with --gpus gives CPU "devices" (gloo groups), which is only meant for tests. Raises ValueError
    with what to change; nothing is loaded here.
    """
    if gpus is None:
        if gpus_per_job is not None:
            raise ValueError("--gpus-per-job needs --gpus (the number of GPUs to serve with)")
        return [[device or ("cuda" if cuda_devices else "cpu")]]
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    per_job = gpus if gpus_per_job is None else gpus_per_job
    if per_job < 1:
        raise ValueError(f"--gpus-per-job must be at least 1, got {per_job}")
    if gpus % per_job:
        raise ValueError(f"--gpus {gpus} is not a multiple of --gpus-per-job {per_job}: every engine needs "
                         f"{per_job} GPU(s) (try --gpus {gpus - gpus % per_job or per_job})")
    device = device or "cuda"
    if device == "cpu":
        return [["cpu"] * per_job for _ in range(gpus // per_job)]
    if device != "cuda":
        raise ValueError(f"--gpus uses cuda:0 .. cuda:{gpus - 1}; drop --device {device} (choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES) or use --device cpu for a test run")
    if cuda_devices < gpus:
        raise ValueError(f"--gpus {gpus} but only {cuda_devices} CUDA device(s) are visible")
    return [[f"cuda:{g * per_job + i}" for i in range(per_job)] for g in range(gpus // per_job)]


# ----------------------------------------------------------------------------------------------
# the engines, as the server's worker threads see them


class Engine:
    """What a worker thread needs from an engine. `devices` are the devices one job runs on."""

    devices: tuple[str, ...] = ()

    @property
    def spec(self):
        """The pipeline's PipelineSpec: what requests are checked against."""
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        return True

    def enter_thread(self) -> None:
        """Called once by the worker thread that feeds this engine, before its first job."""

    def after_job(self) -> None:
        """Called by the worker thread after each job (free cached device memory)."""

    def run(self, request: JobRequest, prompt: LivePrompt, on_step: OnStep) -> Iterator:
        raise NotImplementedError

    def decode_full(self, latents: torch.Tensor, frames: int) -> torch.Tensor:
        """A preview job's chunk latents -> its frames (T, H, W, 3) uint8 by the full VAE (for the mp4)."""
        raise EngineError("this engine cannot decode a preview job's latents with the full VAE")

    def close(self) -> None:
        """Free what the engine holds (processes). Whoever started the engine closes it."""

    def describe(self) -> dict:
        return {"devices": list(self.devices), "alive": self.alive}


class LocalEngine(Engine):
    """A pipeline in this process (or anything with its `stream`, `spec` and `device`)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.devices = (str(pipe.device),)

    @property
    def spec(self):
        return self.pipe.spec

    def enter_thread(self) -> None:
        device = torch.device(self.devices[0])
        if device.type == "cuda" and device.index is not None:  # the current device is per thread:
            torch.cuda.set_device(device)  # CUDA events, side streams and empty_cache use it

    def after_job(self) -> None:
        if self.devices[0].startswith("cuda"):  # (a CPU engine must not create a CUDA context here)
            torch.cuda.empty_cache()

    def run(self, request: JobRequest, prompt: LivePrompt, on_step: OnStep) -> Iterator:
        return stream_job(self.pipe, request, prompt, on_step)

    def decode_full(self, latents: torch.Tensor, frames: int) -> torch.Tensor:
        return self.pipe.decode_full(latents, frames)


def as_engines(engines) -> list[Engine]:
    """Engines from an engine, a pipeline or a list of either (a pipeline becomes a LocalEngine)."""
    items = list(engines) if isinstance(engines, (list, tuple)) else [engines]
    if not items:
        raise ValueError("a server needs at least one engine")
    return [e if isinstance(e, Engine) else LocalEngine(e) for e in items]


class GroupEngine(Engine):
    """K processes running one context-parallel pipeline over `devices`; this process talks to rank 0.

    Construction spawns the processes (they load the model meanwhile); `wait_ready` waits for them.
    """

    def __init__(self, model: str | Path, devices: Sequence[str], dtype: str = "auto", deterministic: bool = False):
        import torch.multiprocessing as mp

        self.devices = tuple(str(d) for d in devices)
        if len(self.devices) < 2:
            raise ValueError("an engine group needs at least two devices (one device: LocalEngine)")
        self.label = ",".join(self.devices)
        self.failure: str | None = None
        self._spec = None
        self._busy = False
        self._lock = threading.Lock()
        if self.devices[0].startswith("cuda"):
            from helios.runtime import no_multicast_env

            no_multicast_env()  # inherited by the ranks, which set it again before NCCL starts
        self._store = Path(tempfile.mkdtemp(prefix="helios-engine-"))
        ctx = mp.get_context("spawn")  # CUDA cannot be forked, and this process has threads
        self._conn, child = ctx.Pipe(duplex=True)
        self._procs = [ctx.Process(target=_group_main, name=f"helios-engine-{self.label}-rank{r}", daemon=True,
                                   args=(r, list(self.devices), str(model), dtype,
                                         f"file://{self._store / 'store'}", child if r == 0 else None,
                                         deterministic))
                       for r in range(len(self.devices))]
        try:
            for p in self._procs:
                p.start()
        except BaseException:
            self._kill()
            raise
        finally:
            child.close()  # only rank 0 holds it now: its exit shows here as end of file

    @classmethod
    def start(cls, model: str | Path, devices: Sequence[str], dtype: str = "auto") -> "GroupEngine":
        engine = cls(model, devices, dtype)
        engine.wait_ready()
        return engine

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def spec(self):
        if self._spec is None:
            raise EngineStartError(f"the engine on {self.label} has not started")
        return self._spec

    @property
    def alive(self) -> bool:
        if self.failure is None and any(p.exitcode is not None for p in self._procs):
            self._fail(self._exits())  # died while idle: say so now, not with the next job
        return self.failure is None

    def describe(self) -> dict:
        return {**super().describe(), "pids": self.pids, "error": self.failure}

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every rank has loaded the model; raises EngineStartError (and stops the group)."""
        try:
            message = self._recv(timeout)
        except EngineDied:
            raise EngineStartError(f"the engine on {self.label} did not start: {self.failure}") from None
        if message is None:
            self._fail(f"not ready after {timeout} s")
            raise EngineStartError(f"the engine on {self.label} did not start within {timeout} s")
        if message[0] != "ready":
            self._fail(message[1] if message[0] == "failed" else f"unexpected message {message[0]!r}")
            raise EngineStartError(f"the engine on {self.label} did not start: {self.failure}")
        self._spec = message[1]
        log.info("engine on %s ready (%d context-parallel processes, pids %s)", self.label, len(self._procs),
                 self.pids)

    # ---- jobs --------------------------------------------------------------------------------
    def run(self, request: JobRequest, prompt: LivePrompt, on_step: OnStep) -> Iterator:
        if not self.alive:
            raise EngineDied(f"the engine on {self.label} stopped: {self.failure}")
        self._busy = True
        try:
            self._send(("job", to_wire(request)))
            while True:
                self._send(("next",))
                chunk = self._next_chunk(prompt, on_step)
                if chunk is None:
                    return
                try:
                    yield chunk
                except GeneratorExit:  # the worker abandons the job between chunks
                    self._send(("cancel",), quiet=True)
                    raise
        finally:
            self._busy = False

    def _next_chunk(self, prompt: LivePrompt, on_step: OnStep):
        while True:
            kind, *rest = self._recv()
            if kind == "at":
                self._send(prompt.at(rest[0]))
            elif kind == "step":
                try:
                    on_step(*rest)
                except BaseException:
                    self._send("halt")  # every rank leaves the job at this step
                    raise
                self._send("go")
            elif kind == "chunk":
                return replace(rest[0], frames=torch.from_numpy(rest[0].frames))
            elif kind == "end":
                return None
            elif kind == "error":
                message, ranks_in_step = rest
                if ranks_in_step:
                    raise EngineError(message)
                self._died(f"its ranks lost step after a failed job ({message})")
            else:
                self._died(f"unexpected message {kind!r} from rank 0")

    # ---- the pipe ----------------------------------------------------------------------------
    def _send(self, message, quiet: bool = False) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError) as e:  # broken pipe, closed connection
            if quiet:
                self._fail(self._exits() or f"the pipe to rank 0 broke ({e})")
            else:
                self._died()

    def _recv(self, timeout: float | None = None):
        """Rank 0's next message; EngineDied as soon as any rank's process ends (None on timeout)."""
        sentinels = [p.sentinel for p in self._procs]
        while True:
            ready = multiprocessing.connection.wait([self._conn, *sentinels], timeout)
            if not ready:
                return None
            if self._conn in ready:
                try:
                    return self._conn.recv()
                except (EOFError, OSError):
                    pass
            self._died()

    def _died(self, what: str | None = None) -> None:
        """Stop the engine and raise EngineDied, saying which processes ended and how."""
        # A process's pipes close before it can be reaped: give the exits a moment to show.
        multiprocessing.connection.wait([p.sentinel for p in self._procs], timeout=2.0)
        deadline = time.monotonic() + 1.0
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._fail("; ".join(x for x in (what, self._exits()) if x) or "rank 0 closed the pipe")
        raise EngineDied(f"the engine on {self.label} stopped: {self.failure}")

    def _exits(self) -> str:
        ended = []
        for r, p in enumerate(self._procs):
            if p.exitcode is not None:
                code = p.exitcode
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                ended.append(f"rank {r} (pid {p.pid}) {how}")
        return "; ".join(ended)

    def _fail(self, reason: str) -> None:
        """Mark the engine dead (once, with one clear log line) and stop every one of its processes."""
        with self._lock:
            first = self.failure is None
            if first:
                self.failure = reason
        if first:
            log.error("engine on %s stopped: %s; it takes no more jobs", self.label, reason)
        self._kill()

    def _kill(self, grace: float = 2.0) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(grace)
            if p.is_alive():
                p.kill()
                p.join(grace)

    def close(self) -> None:
        if self.failure is None and not self._busy:
            self._send(("quit",), quiet=True)
            for p in self._procs:
                p.join(STOP_GRACE_S)
        with self._lock:
            self.failure = self.failure or "closed"
        self._kill()
        self._conn.close()
        shutil.rmtree(self._store, ignore_errors=True)


def load_engines(model: str | Path, groups: Sequence[Sequence[str]], dtype: str = "auto",
                 memory: str | None = None,
                 preview_decoder: str | Path | None = None, deterministic: bool = False) -> list[Engine]:
    """One engine per device group: a one-device group is a pipeline in this process, a larger one a
    GroupEngine. Everything loads at once; if any engine fails, the others are stopped and the error
    (EngineStartError, or the model folder's own error) is raised.

    preview_decoder: a TAEHV weight file, or "tiny" for the model folder's own, for preview jobs
    (one-device engines only). deterministic: `load_pipeline(deterministic=True)` in every engine."""
    from helios.engine.pipeline import load_pipeline

    groups = [list(g) for g in groups]
    if not groups or any(not g for g in groups):
        raise ValueError(f"device groups must be non-empty lists of devices, got {groups}")
    for g in groups:
        torch_dtype(dtype, g[0])  # a bad dtype is refused before anything starts
    if memory is not None and any(len(g) > 1 for g in groups):
        raise ValueError("--memory plans one GPU per engine; with --gpus-per-job above 1 leave --memory out")
    if preview_decoder is not None and any(len(g) > 1 for g in groups):
        raise ValueError("a preview decoder is for one-GPU engines; drop --decoder or use --gpus-per-job 1")
    engines: dict[int, Engine] = {}
    try:
        for i, g in enumerate(groups):
            if len(g) > 1:
                engines[i] = GroupEngine(model, g, dtype, deterministic)  # they load while this one does
        for i, g in enumerate(groups):
            if len(g) == 1:  # one after the other: the loaders patch global state (meta-device init)
                engines[i] = LocalEngine(load_pipeline(model, dtype=torch_dtype(dtype, g[0]), device=g[0],
                                                       memory_budget=memory,
                                                       preview_decoder=preview_decoder,
                                                       deterministic=deterministic))
        for engine in engines.values():
            if isinstance(engine, GroupEngine):
                engine.wait_ready()
    except BaseException:
        for engine in engines.values():
            engine.close()
        raise
    return [engines[i] for i in range(len(groups))]


# ----------------------------------------------------------------------------------------------
# the group's processes


class _Halted(Exception):
    """Every rank leaves the job at the same solver step (the server answered "halt")."""


class _Side:
    """How one rank of a group hears what to do. Rank 0 hears the server over the pipe; every rank
    then gets the same message from rank 0 by a broadcast on the gloo control group, at the same
    point of the same code, so the ranks never disagree about a job, a prompt or a stop."""

    def __init__(self, rank: int, control, conn):
        self.rank, self.control, self.conn = rank, control, conn

    def share(self, value=None):
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def command(self):
        """The server's next command, on every rank. While rank 0 waits, it keeps the others'
        broadcast from timing out with pings (a job may stay paused, a server idle for days)."""
        if self.rank != 0:
            while (message := self.share())[0] == "ping":
                pass
            return message
        while not self.conn.poll(KEEPALIVE_S):
            self.share(("ping",))
        return self.share(self.conn.recv())  # EOFError when the server has gone: the process ends

    def ask(self, question):
        """Rank 0 asks the server; every rank gets the answer."""
        if self.rank == 0:
            self.conn.send(question)
            return self.share(self.conn.recv())
        return self.share()

    def tell(self, message) -> None:
        if self.rank == 0:
            self.conn.send(message)


class _GroupPrompt(LivePrompt):
    """The job's prompt chunk by chunk, as the server's LivePrompt says it when the chunk starts."""

    def __init__(self, first: str, side: _Side):
        super().__init__(first)
        self._side = side

    def at(self, chunk: int):
        return self._side.ask(("at", chunk))


def to_wire(request: JobRequest) -> JobRequest:
    # numpy, not torch: a pickled tensor would travel through shared memory, an array by value
    return replace(request, image=None if request.image is None else request.image.numpy(),
                   video=None if request.video is None else request.video.numpy())


def from_wire(request: JobRequest) -> JobRequest:
    return replace(request, image=None if request.image is None else torch.from_numpy(request.image),
                   video=None if request.video is None else torch.from_numpy(request.video))


def _group_main(rank: int, devices: list[str], model: str, dtype: str, store: str, conn,
                deterministic: bool = False) -> None:
    """A group process: join the group, load the pipeline, then serve jobs until told to quit."""
    import torch.distributed as dist

    from helios.engine.pipeline import load_pipeline
    from helios.runtime import init_distributed

    logging.basicConfig(level=logging.INFO, format=f"engine {','.join(devices)} rank {rank}: %(message)s")
    # Ctrl-C in the terminal reaches every process of the group: the server stops the engines itself
    # (after its running jobs), and if the server is gone, rank 0's pipe and then the others' gloo fail.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    world = len(devices)
    try:
        device = init_distributed(devices[rank], rank=rank, world_size=world, init_method=store)
        if device.type == "cpu":  # the ranks share the machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)  # CPU messages beside NCCL's data
        side = _Side(rank, control, conn)
        pipe = load_pipeline(model, dtype=torch_dtype(dtype, devices[rank]), device=device,
                             deterministic=deterministic)
        pipe.model.enable_context_parallel()
        dist.barrier(group=control)  # every rank has loaded
        side.tell(("ready", pipe.spec))
    except BaseException as e:
        log.exception("could not start")
        if conn is not None:
            try:
                conn.send(("failed", f"rank {rank}: {type(e).__name__}: {e}"))
            except OSError:
                pass
        _exit(1)
    try:
        while (command := side.command())[0] != "quit":
            if command[0] == "job":
                if _group_job(pipe, side, from_wire(command[1])):
                    break
            elif command[0] != "cancel":  # a cancel for a job that already ended is harmless
                raise RuntimeError(f"unexpected command {command[0]!r}")
    except BaseException:
        log.exception("stopping")
        _exit(1)
    dist.destroy_process_group()


def _group_job(pipe, side: _Side, request: JobRequest) -> bool:
    """Run one job on this rank, command by command; True if the server said quit meanwhile."""
    import torch.distributed as dist

    def on_step(chunk: int, stage: int, step: int) -> None:
        if side.ask(("step", chunk, stage, step)) != "go":
            raise _Halted()

    chunks = stream_job(pipe, request, _GroupPrompt(request.prompt, side), on_step)
    try:
        while (command := side.command())[0] == "next":
            chunk = next(chunks, None)
            if chunk is None:
                side.tell(("end",))
                return False
            side.tell(("chunk", replace(chunk, frames=chunk.frames.numpy())))
        return command[0] == "quit"
    except _Halted:
        return False
    except Exception as e:
        log.exception("job failed")
        # The same error on every rank (a bad input, the same out-of-memory) leaves the ranks in step
        # and the group takes the next job; a rank stuck in a collective means the group is broken.
        try:
            dist.monitored_barrier(group=side.control, timeout=RESYNC_TIMEOUT, wait_all_ranks=True)
            in_step = True
        except RuntimeError:
            in_step = False
        side.tell(("error", describe_failure(e), in_step))
        if not in_step:
            raise
        return False
    finally:
        chunks.close()
        del chunks
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _exit(code: int) -> None:
    """Leave now: with a peer gone, tearing the process group down politely can hang."""
    logging.shutdown()
    os._exit(code)
