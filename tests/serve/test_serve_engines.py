"""Serving with several engines (`helios serve --gpus N --gpus-per-job K`), on the CPU.

* the shared queue and engine failures, with stand-in engines (no model: milliseconds);
* data parallel: two one-device engines in the server process run two jobs at the same time, and
  their videos equal the single-engine video for the same seed;
* context parallel: one engine group of two gloo processes gives the frames of a single-process
  engine for the same job (steered mid-job, then stopped mid-chunk), serves the page's socket and
  the HTTP API, and a killed rank fails its job and takes the engine out of service, not the server;
* the command line's --gpus / --gpus-per-job errors, before anything loads.

The group is started once for the module (two fresh Python processes import torch and the model:
most of this file's time); the test that kills it runs last and a later test would get a new one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest
import torch
from helpers.serving import SIZE, live, next_json, wait_for, wait_until

from helios.engine.pipeline import Chunk
from helios.engine.prompts import LivePrompt
from helios.engine.video_io import read_video, video_info
from helios.serve import Limits
from helios.serve.engines import Engine, GroupEngine, LocalEngine, device_groups, load_engines
from helios.serve.jobs import Job, Worker
from helios.serve.params import JobRequest, parse_params


# ---- the queue, with stand-in engines ----------------------------------------------------------


class Gate(Engine):
    """An engine that yields one black chunk per `release()`; `alive` can be switched off."""

    def __init__(self, name: str):
        self.devices = (name,)
        self.released = threading.Semaphore(0)
        self.up = True

    @property
    def alive(self) -> bool:
        return self.up

    def release(self) -> None:
        self.released.release()

    def run(self, request, prompt, on_step):
        for k in range(request.chunks):
            while not self.released.acquire(timeout=0.05):
                on_step(k, 0, 0)  # stop/cancel still reach a job waiting here
            yield Chunk(k, torch.zeros(33, 16, 16, 3, dtype=torch.uint8), 33 * k, prompt.at(k)[0][0], 0.0,
                        request.chunks)


def request(prompt: str = "a red circle", chunks: int = 1) -> JobRequest:
    return JobRequest(prompt=prompt, frames=33 * chunks, height=16, width=16, chunks=chunks, frames_out=33 * chunks)


def until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def test_one_queue_feeds_whichever_engine_is_free(tmp_path):
    gates = [Gate("gate:a"), Gate("gate:b")]
    worker = Worker(gates, tmp_path, Limits(max_jobs_per_client=5))
    worker.start()
    try:
        jobs = [Job(request(f"job {i}"), owner="me") for i in range(4)]
        for job in jobs:
            worker.submit(job)
        until(lambda: [j.state.value for j in jobs] == ["running", "running", "queued", "queued"])
        assert sorted(j.engine for j in jobs[:2]) == [0, 1] and jobs[2].engine is None  # first come, first served
        assert [j.queue_position for j in jobs] == [0, 0, 2, 3]  # both running jobs are ahead of the queue
        first, second = jobs[0].engine, jobs[1].engine
        gates[second].release()  # that engine finishes job 1 and takes job 2, the head of the queue
        assert jobs[1].finished.wait(10) and jobs[1].state.value == "done"
        until(lambda: jobs[2].engine == second)
        assert jobs[3].queue_position == 2 and jobs[3].engine is None
        worker.stop(jobs[0])  # the controls act on the job whichever engine holds it
        assert jobs[0].finished.wait(10) and jobs[0].state.value == "cancelled"  # no chunk yet: nothing kept
        until(lambda: jobs[3].engine == first)
        for gate in gates:
            gate.release()
        assert all(j.finished.wait(10) for j in jobs)
        until(lambda: worker.stats()["jobs_run"] == 4)  # (counted just after each job's end)
        stats = worker.stats()
        assert [e["jobs_run"] for e in stats["engines"]] == [2, 2] and stats["running"] == []
        assert [e["devices"] for e in stats["engines"]] == [["gate:a"], ["gate:b"]]
    finally:
        worker.close()


def test_a_stopped_engine_leaves_the_others_and_with_none_left_nothing_waits(tmp_path, caplog):
    a, b = Gate("gate:a"), Gate("gate:b")
    worker = Worker([a, b], tmp_path, Limits(max_jobs_per_client=5))
    worker.start()
    caplog.set_level(logging.ERROR, logger="helios.serve")
    try:
        a.up = False  # an engine that dies while idle is noticed without a job being lost
        until(lambda: not worker._slots[0].thread.is_alive())
        assert "engine 0 (gate:a) is out of service; 1 engine(s) left" in caplog.text
        first, second = Job(request(), "me"), Job(request(), "me")
        worker.submit(first), worker.submit(second)
        until(lambda: first.engine == 1)
        assert second.queue_position == 1
        b.up = False  # engine b is gone too once its job ends: the queued job fails instead of waiting
        b.release()
        assert second.finished.wait(10) and second.state.value == "failed"
        assert second.error.startswith("no engine is running on this server")
        with pytest.raises(Exception, match="no engine is running") as refused:
            worker.submit(Job(request(), "me"))
        assert refused.value.status == 503
    finally:
        worker.close()


# ---- data parallel: two engines in the server process -------------------------------------------


class Rendezvous:
    """The real pipeline, except that a job's first solver step waits until a job on the other engine
    has reached its own first step: the two jobs provably run at the same time (a server that ran
    them one after the other would fail both when the barrier times out)."""

    def __init__(self, pipe, barrier: threading.Barrier):
        self._pipe, self._barrier = pipe, barrier

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, prompt, on_step, **kwargs):
        met = []

        def step(chunk: int, stage: int, i: int) -> None:
            if not met:
                met.append(self._barrier.wait())
            on_step(chunk, stage, i)

        return self._pipe.stream(prompt, on_step=step, **kwargs)


def test_two_engines_run_two_jobs_at_once_and_match_one_engine(model_folder, pipe, serve, tmp_path):
    engines = load_engines(model_folder, [["cpu"], ["cpu"]])
    assert all(isinstance(e, LocalEngine) for e in engines) and engines[0].pipe is not engines[1].pipe
    barrier = threading.Barrier(2, timeout=60)
    for engine in engines:
        engine.pipe = Rendezvous(engine.pipe, barrier)
    server = serve(engines=engines)
    alice, bob = server.client(), server.client()
    config = alice.get("/api/config").json()
    assert [e["devices"] for e in config["engines"]] == [["cpu"], ["cpu"]] and config["devices_per_engine"] == 1
    job = {"prompt": "two red circles bouncing", "frames": 33, "seed": 5, **SIZE}
    ids = [alice.post("/api/jobs", json=job).json()["job"], bob.post("/api/jobs", json=job).json()["job"]]
    ends = [wait_for(c, i) for c, i in zip((alice, bob), ids)]
    assert [e["state"] for e in ends] == ["done", "done"], ends
    assert sorted(e["engine"] for e in ends) == [0, 1]
    assert barrier.n_waiting == 0 and not barrier.broken

    pipe.write(tmp_path / "one.mp4", job["prompt"], num_frames=33, height=64, width=64, steps=1, seed=5)
    one = read_video(tmp_path / "one.mp4")
    for client, job_id in zip((alice, bob), ids):
        path = tmp_path / f"{job_id}.mp4"
        path.write_bytes(client.get(f"/api/jobs/{job_id}/video").content)
        assert torch.equal(read_video(path), one)  # the same frames, so the same encoded video


# ---- context parallel: one engine over two gloo processes ----------------------------------------


@pytest.fixture(scope="module")
def groups():
    started: list[GroupEngine] = []
    yield started
    for engine in started:
        engine.close()


@pytest.fixture
def group(groups, model_folder) -> GroupEngine:
    """A started two-process CPU engine group (a new one if the last one was killed)."""
    if not groups or not groups[-1].alive:
        groups.append(GroupEngine.start(model_folder, ["cpu", "cpu"]))
    return groups[-1]


class StopAtChunk(LivePrompt):
    """A job's prompt that stops the job (keeping its video) as soon as the engine starts chunk `n`:
    the stop then lands inside that chunk, at its first solver step, on every engine alike."""

    def __init__(self, job: Job, n: int):
        super().__init__(job.request.prompt)
        self.job, self.n = job, n

    def at(self, chunk: int):
        if chunk == self.n:
            self.job.interrupt("stopped on request", stop=True)
        return super().at(chunk)


class Recorder:
    """A job's listener: keeps each decoded chunk, and steers the job when chunk 0 arrives."""

    def __init__(self, steer: str):
        self.chunks: list[Chunk] = []
        self.steer, self.from_chunk = steer, None

    def event(self, message: dict) -> None:
        pass

    def chunk(self, job: Job, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        if chunk.index == 0:
            self.from_chunk = job.steer(self.steer)


def steered_and_stopped(engine, folder) -> tuple[Job, Recorder]:
    """A 3-chunk job, steered when chunk 0 is delivered and stopped when chunk 2 starts."""
    worker = Worker([engine], folder, Limits())
    worker.start()
    try:
        fields = {"prompt": "a red circle", "frames": 99, "seed": 11, **SIZE}
        job = Job(parse_params(fields, engine.spec, Limits()), "tester")
        job.prompt = StopAtChunk(job, 2)
        job.listener = recorder = Recorder("a blue dog")
        worker.submit(job)
        assert job.finished.wait(180)
    finally:
        worker.close()
    return job, recorder


def test_a_failing_job_fails_alone_on_every_rank(group, tmp_path):
    worker = Worker([group], tmp_path, Limits())
    worker.start()
    try:
        # Past the server's checks, the engine refuses this size on both ranks at the same point.
        bad = Job(JobRequest(prompt="a cat", frames=33, height=72, width=64, chunks=1, frames_out=33), "tester")
        worker.submit(bad)
        assert bad.finished.wait(60) and bad.state.value == "failed"
        assert bad.error.startswith("height=72: frame sizes must be positive multiples of 16")  # the bundle: 4x VAE, one level
    finally:
        worker.close()
    assert group.alive  # the ranks stayed in step: the next test runs its jobs on the same processes


def test_context_parallel_engine_matches_one_process(group, pipe, tmp_path):
    spec = group.spec
    assert spec == pipe.spec and group.devices == ("cpu", "cpu")
    pids = group.pids
    runs = {"group": steered_and_stopped(group, tmp_path / "group"),
            "one": steered_and_stopped(LocalEngine(pipe), tmp_path / "one")}
    for name, (job, rec) in runs.items():
        assert job.state.value == "stopped" and job.error == "stopped on request", (name, job.snapshot())
        assert rec.from_chunk == 1  # chunk 1 had not started when chunk 0 was delivered
        assert [c.index for c in rec.chunks] == [0, 1] and job.chunks_done == 2
        assert [c.prompt for c in rec.chunks] == ["a red circle", "a blue dog"]
        assert video_info(job.video_path).frames == 66
    for got, want in zip(runs["group"][1].chunks, runs["one"][1].chunks):
        assert got.frames.shape == want.frames.shape == (33, 64, 64, 3) and got.first_frame == want.first_frame
        # float32 sums in another order (as tests/model/test_parallel.py): at most one uint8 level apart
        diff = (got.frames.int() - want.frames.int()).abs()
        assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-2
    assert group.alive and group.pids == pids  # the halted job left the same processes in step


def test_context_parallel_engine_behind_the_socket_and_http(group, serve, tmp_path):
    server = serve(engines=[group])
    client = server.client()
    config = client.get("/api/config").json()
    assert config["engines"] == [{"devices": ["cpu", "cpu"], "alive": True, "busy": False}]
    assert config["devices_per_engine"] == 2 and config["device"] == "cpu"
    chunks: list[dict] = []

    def until_message(ws, predicate) -> dict:
        while not predicate(m := next_json(ws)):
            chunks.extend([m] if m["type"] == "chunk" else [])
        return m

    with live(server, client.headers["X-Helios-Client"], prompt="a red circle", frames=99, seed=2) as (ws, accepted):
        assert accepted["chunks_total"] == 3
        first = until_message(ws, lambda m: m["type"] == "chunk")
        assert first["index"] == 0 and first["prompt"] == "a red circle"
        ws.send(json.dumps({"type": "pause"}))
        until_message(ws, lambda m: m["type"] == "status" and m["state"] == "paused")
        ws.send(json.dumps({"type": "steer", "prompt": "a blue dog"}))
        steered = until_message(ws, lambda m: m["type"] == "steered")
        ws.send(json.dumps({"type": "resume"}))
        ws.send(json.dumps({"type": "stop"}))
        end = until_message(ws, lambda m: m["type"] == "end")
    # A pause holds the job between chunks: chunk 1 is made only if it was under way when the pause
    # came, and the stop right after the resume ends the job before another chunk is made.
    done, start = end["chunks_done"], steered["from_chunk"]
    assert end["state"] == "stopped" and done in (1, 2) and start in (1, 2), (steered, end)
    assert end["engine"] == 0 and end["next_prompt"] == "a blue dog"
    assert [c["index"] for c in chunks] == list(range(1, done))  # (chunk 0's header was read above)
    assert all(c["prompt"] == ("a blue dog" if c["index"] >= start else "a red circle") for c in chunks)
    path = tmp_path / "stopped.mp4"
    path.write_bytes(client.get(f"/api/jobs/{accepted['job']}/video").content)
    assert video_info(path).frames == 33 * done


def test_a_killed_rank_fails_its_job_and_the_engine_not_the_server(group, serve, caplog):
    caplog.set_level(logging.ERROR, logger="helios.serve")
    server = serve(engines=[group])
    client = server.client()
    job = client.post("/api/jobs", json={"prompt": "a red circle", "frames": 66, **SIZE}).json()["job"]
    wait_until(client, job, lambda s: s["state"] == "running")
    killed = group.pids[1]
    os.kill(killed, signal.SIGKILL)
    status = wait_for(client, job, timeout=60)
    assert status["state"] == "failed" and status["video"] is None, status
    assert status["error"].startswith("the engine on cpu,cpu stopped: ")
    assert f"rank 1 (pid {killed}) was killed by SIGKILL" in status["error"]
    assert f"engine on cpu,cpu stopped: {status['error'].split('stopped: ', 1)[1]}; it takes no more jobs" \
        in caplog.text  # one clear line in the server log
    config = client.get("/api/config").json()
    assert config["engines"][0]["alive"] is False
    r = client.post("/api/jobs", json={"prompt": "a red circle", "frames": 33, **SIZE})
    assert r.status_code == 503 and r.json()["error"].startswith("no engine is running")
    assert not any(p.is_alive() for p in group._procs)  # nothing of the group is left running


# ---- the command line --------------------------------------------------------------------------


def test_device_groups():
    assert device_groups(None, None, "cuda:1", 2) == [["cuda:1"]]  # without --gpus: as before
    assert device_groups(None, None, None, 0) == [["cpu"]]
    assert device_groups(4, None, None, 4) == [["cuda:0", "cuda:1", "cuda:2", "cuda:3"]]
    assert device_groups(4, 2, None, 8) == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    assert device_groups(3, 1, "cuda", 3) == [["cuda:0"], ["cuda:1"], ["cuda:2"]]
    assert device_groups(2, 1, "cpu", 0) == [["cpu"], ["cpu"]]
    assert device_groups(2, None, "cpu", 0) == [["cpu", "cpu"]]


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0"], "--gpus must be at least 1, got 0"),
    (["--gpus", "4", "--gpus-per-job", "3"], "--gpus 4 is not a multiple of --gpus-per-job 3"),
    (["--gpus", "2", "--gpus-per-job", "0"], "--gpus-per-job must be at least 1, got 0"),
    (["--gpus-per-job", "2"], "--gpus-per-job needs --gpus"),
    (["--gpus", "4"], "--gpus 4 but only 1 CUDA device(s) are visible"),
    (["--gpus", "2", "--device", "cuda:1"], "--gpus uses cuda:0 .. cuda:1; drop --device cuda:1"),
])
def test_serve_refuses_bad_gpu_options_before_loading_anything(args, message, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import helios.serve
    from helios.cli import app

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(helios.serve, "run_server", lambda *a, **k: pytest.fail("the server was started"))
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing"), *args],
                                env={"HELIOS_SERVE_TOKEN": ""})
    assert result.exit_code == 2 and message in result.output, result.output
    assert "does not exist" not in result.output  # refused before the model folder was even looked at


def test_serve_passes_the_device_groups(monkeypatch, model_folder):
    from typer.testing import CliRunner

    import helios.serve
    from helios.cli import app

    seen = {}
    monkeypatch.setattr(helios.serve, "run_server", lambda model, **kw: seen.update(kw))
    for args, groups in ((["--device", "cpu", "--gpus", "2", "--gpus-per-job", "1"], [["cpu"], ["cpu"]]),
                         (["--device", "cpu", "--gpus", "2"], [["cpu", "cpu"]]),
                         (["--device", "cpu"], [["cpu"]])):
        result = CliRunner().invoke(app, ["serve", "--model", str(model_folder), *args], env={"HELIOS_SERVE_TOKEN": ""})
        assert result.exit_code == 0, result.output
        assert seen["devices"] == groups


def test_a_fast_start_job_samples_its_first_chunk_with_the_presets_steps(tmp_path):
    # A distilled model's first chunk is amplified (twice the steps); fast_start turns that off.
    from helpers.tiny_pipelines import save_model_folder

    from helios.engine.pipeline import load_pipeline
    from helios.serve.engines import stream_job

    save_model_folder("distilled", tmp_path, seed=3)
    pipe = load_pipeline(tmp_path)

    def run(fast_start: bool) -> tuple[int, list]:
        request = parse_params({"prompt": "a red circle", "frames": 33, "seed": 1, "fast_start": fast_start, **SIZE},
                               pipe.spec, Limits())
        steps = []
        parts = list(stream_job(pipe, request, LivePrompt(request.prompt), lambda k, stage, i: steps.append(k)))
        return steps.count(0), [(c.index, c.first_frame, c.frames.shape[0], c.complete) for c in parts]

    assert run(False) == (6, [(0, 0, 33, True)])  # steps=1 per stage: amplified 2x3
    # and frame 0 comes on its own, before the rest of the chunk is decoded
    assert run(True) == (3, [(0, 0, 1, False), (0, 1, 32, True)])


def test_a_chunk_handed_over_in_two_parts_counts_once(tmp_path):
    from helpers.tiny_pipelines import save_model_folder

    from helios.engine.pipeline import load_pipeline

    save_model_folder("distilled", tmp_path / "m", seed=3)
    engine = LocalEngine(load_pipeline(tmp_path / "m"))
    worker = Worker([engine], tmp_path, Limits())
    worker.start()
    try:
        job = Job(parse_params({"prompt": "a red circle", "frames": 66, "seed": 2, "fast_start": True, **SIZE},
                               engine.spec, Limits()), "tester")
        worker.submit(job)
        assert job.finished.wait(180) and job.state.value == "done", job.error
    finally:
        worker.close()
    assert (job.chunks_done, job.frames_done) == (2, 65)
    assert read_video(job.video_path).shape[0] == 65
