"""helios.serve.ray on a local Ray instance: two CPU engine replicas of the bundled model behind the ingress.

Marked `ray` (run by their own step in .ci/run, after `pip install .[ray]`). One Ray instance and one
application for the whole module; each test uses its own client ids.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from helios.engine.video_io import video_info
from helpers.net import free_port
from helpers.serving import SIZE, assert_wait_cancels_on_hang_up, live, page_client, next_matching, wait_for  # the plain server's test helpers
from serve.test_serve_browser import chromium  # noqa: F401  (the fixture)
from serve.test_serve_ws import (  # noqa: F401  the same WebSocket client tests as for the plain server
    collect,
    test_bad_control_messages_get_an_error_and_the_session_goes_on,
    test_frames_arrive_while_the_job_is_still_running,
    test_image_upload_over_the_socket,
    test_refused_start_gets_its_message_and_a_close_code,
    test_steering_applies_from_the_next_chunk,
    test_stop_keeps_the_frames_made_so_far,
)


pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")


class RayServer:
    """The application's HTTP address, with the plain server's test interface (url, ws_url, client())."""

    def __init__(self, port: int, workdir: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws"
        self.workdir = workdir

    def client(self, **headers) -> httpx.Client:
        return page_client(self.url, **headers)

    def replicas(self) -> dict[str, dict]:
        """The engine replicas the ingress has heard from: replica id -> pid, devices, alive."""
        from ray import serve

        return serve.get_app_handle("helios").replicas_seen.remote().result()

    def cached_videos(self) -> list[Path]:
        return sorted(self.workdir.glob("helios-ingress-*/videos/*"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import serve

    from helios.serve.limits import Limits
    from helios.serve.ray import build_app

    workdir = tmp_path_factory.mktemp("ray-serve")
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(engines=2, threads=1, workdir=str(workdir), limits=Limits(stall_timeout_s=30)),
                  name="helios", route_prefix="/")
        running = RayServer(port, workdir)
        deadline = time.monotonic() + 60
        while len(running.client().get("/api/config").json()["engines"]) < 2:
            assert time.monotonic() < deadline, "the two replicas did not both start"
            time.sleep(0.5)
        yield running
    finally:
        serve.shutdown()
        ray.shutdown()


def download_frames(client: httpx.Client, job: str, tmp_path: Path) -> int:
    r = client.get(f"/api/jobs/{job}/video")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text
    path = tmp_path / f"{job}.mp4"
    path.write_bytes(r.content)
    return video_info(path).frames


def test_four_concurrent_jobs_use_both_replicas(server, tmp_path):
    clients = [server.client(), server.client()]
    jobs = []
    for i in range(4):
        c = clients[i % 2]
        r = c.post("/api/jobs", json={"prompt": f"circle {i}", "frames": 66, **SIZE})
        assert r.status_code == 202, r.text
        jobs.append((c, r.json()["job"]))
    ends = [wait_for(c, j, timeout=240) for c, j in jobs]
    assert [e["state"] for e in ends] == ["done"] * 4
    assert len({e["replica"] for e in ends}) == 2  # Ray Serve gave jobs to both replicas
    assert set(server.replicas()) >= {e["replica"] for e in ends}
    assert [download_frames(c, j, tmp_path) for c, j in jobs] == [65] * 4  # every video complete
    listed = {j["job"] for j in clients[0].get("/api/jobs").json()["jobs"]}
    assert listed == {jobs[0][1], jobs[2][1]}  # each client sees its own jobs, from both replicas


def test_steer_and_stop_reach_the_replica_that_runs_the_job(server):
    import json

    with live(server, prompt="a red circle", frames=33 * 12) as (ws, accepted):
        job = accepted["job"]
        next_matching(ws, lambda m: m["type"] == "chunk")
        ws.send(json.dumps({"type": "steer", "prompt": "a blue dog"}))
        steered = next_matching(ws, lambda m: m["type"] == "steered")
        status = httpx.get(f"{server.url}/api/jobs/{job}", headers={"X-Helios-Client": accepted["client"]}).json()
        replica = status["replica"]
        assert replica in server.replicas() and status["state"] == "running"
        assert status["next_prompt"] == "a blue dog"  # (the record the replica sent back with its answer)
        ws.send(json.dumps({"type": "stop"}))
        messages, _ = collect(ws)
    end = messages[-1]
    assert end["state"] == "stopped" and end["replica"] == replica  # stopped there, with the frames made so far
    assert steered["from_chunk"] >= 1 and 0 < end["chunks_done"] < 12


def test_a_killed_replica_fails_its_job_and_the_others_carry_on(server, tmp_path):
    a, b = server.client(), server.client()
    long_job = a.post("/api/jobs", json={"prompt": "a long one", "frames": 33 * 30, **SIZE}).json()
    deadline = time.monotonic() + 120
    while (status := a.get(f"/api/jobs/{long_job['job']}").json())["chunks_done"] < 1:
        assert status["state"] in ("queued", "running") and time.monotonic() < deadline, status
        time.sleep(0.1)
    victim = status["replica"]
    others = [b.post("/api/jobs", json={"prompt": f"short {i}", "frames": 66, **SIZE}).json() for i in range(2)]
    os.kill(server.replicas()[victim]["pid"], signal.SIGKILL)

    failed = wait_for(a, long_job["job"], timeout=120)
    assert failed["state"] == "failed" and f"the engine replica {victim} running this job stopped" in failed["error"]
    assert a.get(f"/api/jobs/{long_job['job']}/video").status_code == 410
    assert not any(p.name == "video.mp4" for p in (server.workdir / f"helios-replica-{victim}").rglob("*"))
    assert not any(long_job["job"] in p.name for p in server.cached_videos())  # no half mp4 at the ingress
    for job in others:  # Ray Serve gave them to the replica that was free (or to the one started instead)
        end = wait_for(b, job["job"], timeout=240)
        assert end["state"] == "done" and end["replica"] != victim and download_frames(b, job["job"], tmp_path) == 65
    # A new job still runs (on the surviving replica, or on the one Ray started instead).
    again = b.post("/api/jobs", json={"prompt": "after", "frames": 33, **SIZE}).json()
    assert wait_for(b, again["job"], timeout=240)["state"] == "done"


def test_a_job_waiting_in_rays_queue_is_cancelled_and_never_runs(server):
    a, b, c = server.client(), server.client(), server.client()
    long_jobs = [x.post("/api/jobs", json={"prompt": "busy", "frames": 33 * 40, **SIZE}).json() for x in (a, b)]
    for x, job in zip((a, b), long_jobs):  # both replicas busy
        wait_for(x, job["job"], states=("running",), timeout=120)
    waiting = c.post("/api/jobs", json={"prompt": "waits", "frames": 33, **SIZE}).json()
    assert waiting["state"] == "queued" and waiting["queue_position"] == 2 and waiting["replica"] is None
    cancelled = c.delete(f"/api/jobs/{waiting['job']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled on request"
    for x, job in zip((a, b), long_jobs):  # a running job's cancel reaches its replica
        assert x.delete(f"/api/jobs/{job['job']}").status_code == 200
        end = wait_for(x, job["job"], timeout=60)
        assert end["state"] == "cancelled" and end["replica"] is not None and end["chunks_done"] < 40
    again = c.post("/api/jobs", json={"prompt": "after", "frames": 33, **SIZE}).json()
    assert wait_for(c, again["job"], timeout=120)["state"] == "done"
    assert c.get(f"/api/jobs/{waiting['job']}").json()["chunks_done"] == 0  # it never ran


def test_wait_mode_returns_the_mp4_through_the_ingress(server, tmp_path):
    client = server.client()
    r = client.post("/api/jobs?wait=1", json={"prompt": "a green dog", "frames": 33, **SIZE}, timeout=240)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text
    path = tmp_path / "waited.mp4"
    path.write_bytes(r.content)
    assert video_info(path).frames == 33
    job = r.headers["X-Helios-Job"]
    assert client.get(f"/api/jobs/{job}").json()["state"] == "done"
    assert client.get(f"/api/jobs/{job}").json()["replica"] in server.replicas()  # it ran on one of them


def test_wait_mode_cancels_when_the_client_hangs_up_on_the_ingress(server):
    assert_wait_cancels_on_hang_up(server.client(), SIZE, connect_s=30, read_s=3, settle_s=60)


def test_openai_api_through_the_ingress(server, tmp_path):
    openai = pytest.importorskip("openai")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    def finished(video_id: str):
        deadline = time.monotonic() + 120
        while (video := client.videos.retrieve(video_id)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        return video

    video = finished(client.videos.create(prompt="a red circle", seconds="1", size="64x64",
                                          extra_body={"steps": 1}).id)
    assert video.status == "completed" and video.model_extra["helios"]["replica"] in server.replicas()
    content = client.videos.download_content(video.id).read()
    path = tmp_path / "v.mp4"
    path.write_bytes(content)
    assert video_info(path).frames == 33
    part = httpx.get(f"{server.url}/v1/videos/{video.id}/content", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == content[10:100]  # range requests from the ingress's cache
    # Video-to-video from that video, by its id: the ingress decodes its cached mp4 and sends the frames.
    continued = client.videos.create(prompt="a blue square", seconds="1", size="64x64",
                                     extra_body={"steps": 1, "video": video.id})
    assert continued.model_extra["helios"]["mode"] == "v2v" and finished(continued.id).status == "completed"
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="a red circle", seconds="100", size="64x64")
    assert e.value.body["param"] == "seconds"


def test_page_plays_and_steers_through_the_ingress(server, chromium):  # noqa: F811
    page = chromium
    page.call("Page.navigate", url=server.url + "/")
    page.wait("window.helios && window.helios.config !== null")
    page.js("""(() => {
        const set = (id, v) => { const el = document.getElementById(id); el.value = v;
                                 el.dispatchEvent(new Event('input')); };
        set('prompt', 'a red fox running through snow');
        set('frames', '660'); set('height', '64'); set('width', '64'); set('steps', '1');
        document.getElementById('start').click();
    })()""")
    page.wait("window.helios.shown >= 12")  # frames on screen while the job still runs
    assert page.js("window.helios.state") == "running"
    page.js("""(() => { document.getElementById('steer').value = 'a blue dog';
                        document.getElementById('steer-send').click(); })()""")
    page.wait("[...document.querySelectorAll('#log li')].some(li => li.textContent.includes('a blue dog'))")
    page.js("document.getElementById('stop').click()")
    page.wait("window.helios.state === 'stopped'")
    href = page.wait("!document.getElementById('download').classList.contains('hidden') && "
                     "document.getElementById('download').getAttribute('href')")
    assert href.startswith("/api/jobs/") and href.endswith("/video")
    assert page.js(f"fetch('{href}').then(r => r.ok ? r.blob().then(b => b.size) : -r.status)") > 1000


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[2] / "configs" / "serve").glob("*.yaml")))
def test_serve_configs_build_the_application(config):
    """Each Serve config's arguments build the application: one engine deployment of N replicas (or an
    autoscaling range) with their GPUs, one job per replica at a time, and one ingress."""
    import yaml

    from helios.serve.ray import ENGINE, INGRESS, app_builder

    [spec] = yaml.safe_load(config.read_text())["applications"]
    args = spec["args"]
    assert spec["import_path"] == "helios.serve.ray:app_builder"
    ingress = app_builder(args)._bound_deployment  # (what `serve run CONFIG` deploys)
    assert ingress.name == INGRESS
    assert ingress.init_kwargs["limits"]["max_queue"] == args["limits"]["max_queue"]  # checked at the ingress
    engine = ingress.init_args[0]._bound_deployment
    assert engine.name == ENGINE and engine.max_ongoing_requests == 1
    assert engine.ray_actor_options["num_gpus"] == args["gpus_per_engine"]
    if "autoscaling" in args:
        scaling = engine._deployment_config.autoscaling_config
        assert (scaling.min_replicas, scaling.max_replicas) == (args["autoscaling"]["min_replicas"],
                                                                args["autoscaling"]["max_replicas"])
        assert scaling.target_ongoing_requests == 1
    else:
        assert engine.num_replicas == args["engines"]


def test_bad_autoscaling_is_refused_before_anything_starts():
    from helios.serve.ray import build_app

    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        build_app(autoscaling={"min_replicas": 4, "max_replicas": 2})
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        build_app(autoscaling={"min_replicas": 1})


def finished_book(tmp_path: Path, ends: list[float], **limits):
    """A JobBook of finished jobs that ended at the given (monotonic) times, each with a cached mp4."""
    from helios.serve.limits import Limits
    from helios.serve.ray import JobBook, Tracked

    book = JobBook(Limits(**limits), tmp_path)
    for i, end in enumerate(ends):
        tracked = Tracked("owner", {"job": f"job{i}", "state": "running"})
        book.add(tracked)
        book.video_path(f"job{i}").write_bytes(b"mp4")
        book.finish(tracked, {"job": f"job{i}", "state": "done"}, now=end)
    return book


def test_finished_records_expire_after_keep_finished_s(tmp_path):
    from helios.serve.ray import Tracked

    book = finished_book(tmp_path, [100.0, 200.0, 300.0], keep_finished_s=150)
    book.add(Tracked("owner", {"job": "busy", "state": "running"}))
    assert book.expire(now=320.0) == ["job0"]  # ended 220 s ago; the others are younger
    assert sorted(book.jobs) == ["busy", "job1", "job2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job1.mp4", "job2.mp4"]  # its mp4 went with it
    assert book.expire(now=10_000.0) == ["job1", "job2"]
    assert list(book.jobs) == ["busy"]  # a job that has not ended is never expired


def test_finished_records_are_capped_oldest_first(tmp_path):
    book = finished_book(tmp_path, [5.0, 1.0, 4.0, 2.0, 3.0], max_finished_jobs=2, keep_finished_s=3600)
    assert sorted(book.expire(now=10.0)) == ["job1", "job3", "job4"]  # ended at 1, 2 and 3
    assert sorted(book.jobs) == ["job0", "job2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job0.mp4", "job2.mp4"]


def test_serve_ray_refuses_bad_options_before_starting_anything():
    from typer.testing import CliRunner

    from helios.cli import app

    result = CliRunner().invoke(app, ["serve", "--ray", "--engines", "0"])
    assert result.exit_code == 2 and "--engines must be at least 1" in result.output
    result = CliRunner().invoke(app, ["serve", "--ray", "--min-engines", "3", "--max-engines", "2"])
    assert result.exit_code == 2 and "min_replicas <= max_replicas" in result.output
    result = CliRunner().invoke(app, ["serve", "--ray", "--model", "/nonexistent/model"])
    assert result.exit_code == 2 and "does not exist" in result.output
