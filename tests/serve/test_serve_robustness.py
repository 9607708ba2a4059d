"""A crash fails its own job only; many clients at once, some leaving mid-stream, leave nothing behind."""

from __future__ import annotations

import gc
import json
import threading
import time
import tracemalloc
import weakref
from pathlib import Path

import pytest
from helpers.serving import SIZE, Exploding, live, wait_for
from websockets.exceptions import ConnectionClosed

from helios.engine.video_io import video_info
from helios.serve import Limits


def test_a_crashing_job_fails_alone(pipe, serve, tmp_path):
    server = serve(pipeline=Exploding(pipe))
    alice, bob = server.client(), server.client()
    worker_thread = server.worker._slots[0].thread
    with live(server, alice.headers["X-Helios-Client"], prompt="please explode", frames=99) as (ws, accepted):
        # Bob's job waits behind the one about to crash.
        queued = bob.post("/api/jobs", json={"prompt": "a calm lake", "frames": 33, **SIZE}).json()
        assert queued["queue_position"] == 1
        messages = []
        while not messages or messages[-1]["type"] != "end":
            m = ws.recv(timeout=120)
            if isinstance(m, str):
                messages.append(json.loads(m))
    end = messages[-1]
    assert end["state"] == "failed" and end["error"] == "generation failed: RuntimeError: the device caught fire"
    assert end["chunks_done"] == 1 and end["video"] is None
    assert [m["index"] for m in messages if m["type"] == "chunk"] == [0]  # chunk 0 was delivered before the crash
    assert alice.get(f"/api/jobs/{accepted['job']}/video").status_code == 410
    assert not (server.worker.workdir / accepted["job"]).exists()  # no partial file left

    status = wait_for(bob, queued["job"])
    assert status["state"] == "done", status
    path = tmp_path / "bob.mp4"
    path.write_bytes(bob.get(f"/api/jobs/{queued['job']}/video").content)
    assert video_info(path).frames == 33
    assert worker_thread.is_alive() and server.worker._slots[0].thread is worker_thread  # the same thread carries on


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_load_many_clients_some_leaving_mid_stream(serve, tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("RSS is read from /proc/self/status (Linux)")
    server = serve(limits=Limits(max_jobs_per_client=1, max_queue=32, max_finished_jobs=6))
    assert server.url.startswith("http://127.0.0.1:")

    def stream(client_id: str | None, frames: int, leave_after_first_frame: bool) -> dict:
        got = {"frames": 0, "end": None, "job": None}
        with live(server, client_id, prompt="a red circle", frames=frames) as (ws, accepted):
            got["job"] = server.worker.get(accepted["job"], accepted["client"])  # to check how it ended
            try:
                while True:
                    m = ws.recv(timeout=180)
                    if isinstance(m, bytes):
                        got["frames"] += 1
                        if leave_after_first_frame:
                            return got  # closes the socket mid-stream
                    elif (msg := json.loads(m))["type"] == "end":
                        got["end"] = msg
                        return got
            except ConnectionClosed as e:
                got["error"] = repr(e)
                return got

    def submit_http(out: Path) -> dict:
        client = server.client()
        job = client.post("/api/jobs", json={"prompt": "a blue dog", "frames": 33, **SIZE}).json()["job"]
        status = wait_for(client, job, timeout=180)
        out.write_bytes(client.get(f"/api/jobs/{job}/video").content)
        return {"job": job, "end": status, "frames": video_info(out).frames}

    def round_of(leavers: int, viewers: int, http: int, tag: str) -> dict[str, dict]:
        results: dict[str, dict] = {}

        def run(name: str, fn, *args) -> None:
            try:
                results[name] = fn(*args)
            except Exception as e:  # recorded and asserted below
                results[name] = {"exception": repr(e)}

        plan = ([(f"leaver{i}", stream, None, 99, True) for i in range(leavers)]
                + [(f"viewer{i}", stream, None, 33, False) for i in range(viewers)]
                + [(f"http{i}", submit_http, tmp_path / f"{tag}-http{i}.mp4") for i in range(http)])
        threads = [threading.Thread(target=run, args=(name, fn, *args)) for name, fn, *args in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a client hung"
        server.wait_idle(timeout=60)
        return results

    # The same round twice first, so the baseline includes what concurrent jobs create once at this
    # load (malloc arenas and heap high-water marks sized by the bundle's activations, executor threads,
    # codec state: one warm round left 83 MiB of growth in one CI run of two); then the measured round
    # of 14 clients: a leak grows it again, a high-water mark does not.
    for warm in ("warm1", "warm2"):
        assert all("exception" not in r for r in round_of(5, 6, 3, warm).values())
    gc.collect()
    idle_rss = rss_bytes()
    tracemalloc.start()  # what the measured round allocates through Python (objects, bytes, numpy) and keeps
    t0 = time.monotonic()
    results = round_of(5, 6, 3, "load")
    elapsed = time.monotonic() - t0
    round_jobs = [weakref.ref(r["job"]) for name, r in results.items() if not name.startswith("http")]

    for name, r in results.items():
        assert "exception" not in r, (name, r)
    for i in range(6):
        r = results[f"viewer{i}"]
        assert r["end"]["state"] == "done" and r["frames"] == 33, r
    for i in range(3):
        r = results[f"http{i}"]
        assert r["end"]["state"] == "done" and r["frames"] == 33, r
    for i in range(5):
        r = results[f"leaver{i}"]
        assert r["frames"] == 1 and r["end"] is None
        assert r["job"].state.value == "cancelled" and r["job"].error == "the client disconnected"
        assert r["job"].chunks_done < 3

    # Nothing is left holding memory or disk: jobs drop their uploads and listeners, the finished-job
    # list is trimmed to its bound, and only complete videos of remembered jobs stay on disk.
    time.sleep(1.5)  # one housekeeping round
    jobs = list(server.worker._jobs.values())
    assert len(jobs) <= 6
    assert all(j.listener is None and j.request.image is None and j.request.video is None for j in jobs)
    on_disk = sorted(p.name for p in server.worker.workdir.iterdir() if p.is_dir())
    assert on_disk == sorted(j.id for j in jobs if j.video_path is not None)
    assert all(sorted(p.name for p in (server.worker.workdir / d).iterdir()) == ["video.mp4"] for d in on_disk)
    assert server.worker.stats()["jobs_run"] == 14 + 14 + 14

    # A leak keeps what it leaks reachable: the jobs the server let go of must be freed, and what the round
    # allocated through Python must be gone but for the few remembered jobs. Both are exact, unlike RSS,
    # which moved from -51 to +85 MiB between runs of this round from malloc arenas and high-water marks alone.
    # (Traced, the round kept 0.13 MiB on the 2-core CPU, 2026-12-02; a server keeping its dropped jobs fails.)
    kept = {id(j) for j in server.worker._jobs.values()}
    del results, jobs, r
    gc.collect()
    alive = [ref() for ref in round_jobs if ref() is not None]
    leaked = [j.id for j in alive if id(j) not in kept]
    assert not leaked, f"jobs the server let go of are still reachable: {leaked}"
    del alive
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert traced < 8 * 2**20, f"the round kept {traced / 2**20:.1f} MiB of Python allocations ({elapsed:.1f} s)"
    # Native memory (torch, codecs) is not traced; RSS still catches a gross leak there.
    grown = rss_bytes() - idle_rss
    assert grown < 256 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB over 14 clients ({elapsed:.1f} s)"
