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

    def replicas(self) -> list[dict]:
        """Every engine replica's own description (pid, running jobs), asked of each one by id."""
        from ray import serve

        from helios.serve.ray import ENGINE

        engines = len(self.client().get("/api/config").json()["engines"])
        return [serve.get_deployment_handle(f"{ENGINE}{i}", app_name="helios").describe.remote().result()
                for i in range(engines)]


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
            assert time.monotonic() < deadline, "the two replicas did not both answer"
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
    assert len({e["replica"] for e in ends}) == 2  # both replicas ran jobs
    assert all(j.split(".")[1] == e["replica"] for (_, j), e in zip(jobs, ends))  # ids name their replica
    assert [download_frames(c, j, tmp_path) for c, j in jobs] == [65] * 4  # every video complete
    listed = {j["job"] for j in clients[0].get("/api/jobs").json()["jobs"]}
    assert listed == {jobs[0][1], jobs[2][1]}  # each client sees its own jobs, from both replicas


def test_steer_and_stop_reach_the_replica_that_runs_the_job(server):
    with live(server, prompt="a red circle", frames=33 * 12) as (ws, accepted):
        job, replica = accepted["job"], accepted["replica"]
        next_matching(ws, lambda m: m["type"] == "chunk")
        import json

        ws.send(json.dumps({"type": "steer", "prompt": "a blue dog"}))
        steered = next_matching(ws, lambda m: m["type"] == "steered")
        owner = next(r for r in server.replicas() if r["replica"] == replica)
        assert job in owner["running"]  # the job runs there, and only there
        status = httpx.get(f"{server.url}/api/jobs/{job}", headers={"X-Helios-Client": accepted["client"]}).json()
        assert status["replica"] == replica and status["next_prompt"] == "a blue dog"
        ws.send(json.dumps({"type": "stop"}))
        messages, _ = collect(ws)
    end = messages[-1]
    assert end["state"] == "stopped" and end["replica"] == replica
    assert steered["from_chunk"] >= 1 and 0 < end["chunks_done"] < 12


def test_a_killed_replica_fails_its_job_and_the_others_carry_on(server, tmp_path):
    a, b = server.client(), server.client()
    long_job = a.post("/api/jobs", json={"prompt": "a long one", "frames": 33 * 30, **SIZE}).json()
    victim = long_job["replica"]
    others = [b.post("/api/jobs", json={"prompt": f"short {i}", "frames": 66, **SIZE}).json() for i in range(2)]
    deadline = time.monotonic() + 120
    while (status := a.get(f"/api/jobs/{long_job['job']}").json())["chunks_done"] < 1:
        assert status["state"] in ("queued", "running") and time.monotonic() < deadline, status
        time.sleep(0.1)
    pid = next(r["pid"] for r in server.replicas() if r["replica"] == victim)
    os.kill(pid, signal.SIGKILL)

    failed = wait_for(a, long_job["job"], timeout=120)
    assert failed["state"] == "failed" and f"the engine replica {victim} running this job stopped" in failed["error"]
    assert a.get(f"/api/jobs/{long_job['job']}/video").status_code == 410
    folder = server.workdir / f"helios-replica-{victim}" / long_job["job"].split(".")[2]
    assert not (folder / "video.mp4").exists()  # only the writer's partial file, never a finished-looking mp4
    for job in others:
        end = wait_for(b, job["job"], timeout=240)
        if end["replica"] == victim:  # queued behind the long job on the replica that died
            assert end["state"] == "failed" and victim in end["error"]
        else:
            assert end["state"] == "done" and download_frames(b, job["job"], tmp_path) == 65
    assert any(wait_for(b, j["job"])["replica"] != victim for j in others)
    # A new job still runs (on the surviving replica, or on the one Ray started instead).
    again = b.post("/api/jobs", json={"prompt": "after", "frames": 33, **SIZE}).json()
    assert wait_for(b, again["job"], timeout=240)["state"] == "done"


def test_wait_mode_returns_the_mp4_through_the_ingress(server, tmp_path):
    client = server.client()
    r = client.post("/api/jobs?wait=1", json={"prompt": "a green dog", "frames": 33, **SIZE}, timeout=240)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text
    path = tmp_path / "waited.mp4"
    path.write_bytes(r.content)
    assert video_info(path).frames == 33
    job = r.headers["X-Helios-Job"]
    assert client.get(f"/api/jobs/{job}").json()["state"] == "done"
    assert any(job.split(".")[1] == s["replica"] for s in server.replicas())  # it ran on one of them


def test_wait_mode_cancels_when_the_client_hangs_up_on_the_ingress(server):
    assert_wait_cancels_on_hang_up(server.client(), SIZE, connect_s=30, read_s=3, settle_s=60)


def test_openai_api_through_the_ingress(server, tmp_path):
    openai = pytest.importorskip("openai")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    video = client.videos.create(prompt="a red circle", seconds="1", size="64x64", extra_body={"steps": 1})
    deadline = time.monotonic() + 120
    while (video := client.videos.retrieve(video.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert video.status == "completed"
    path = tmp_path / "v.mp4"
    path.write_bytes(client.videos.download_content(video.id).read())
    assert video_info(path).frames == 33
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
    """Each Serve config's arguments build the application: N engine deployments with their GPUs, one ingress."""
    import yaml

    from helios.serve.ray import ENGINE, INGRESS, app_builder

    [spec] = yaml.safe_load(config.read_text())["applications"]
    assert spec["import_path"] == "helios.serve.ray:app_builder"
    ingress = app_builder(spec["args"])._bound_deployment  # (what `serve run CONFIG` deploys)
    assert ingress.name == INGRESS
    engines = [e._bound_deployment for e in ingress.init_args[0]]
    assert [e.name for e in engines] == [f"{ENGINE}{i}" for i in range(spec["args"]["engines"])]
    assert all(e.num_replicas == 1 for e in engines)
    assert all(e.ray_actor_options["num_gpus"] == spec["args"]["gpus_per_engine"] for e in engines)
    assert all(e.init_kwargs["limits"]["max_queue"] == spec["args"]["limits"]["max_queue"] for e in engines)
    assert [e.init_kwargs["index"] for e in engines] == list(range(len(engines)))


def test_serve_ray_refuses_bad_options_before_starting_anything():
    from typer.testing import CliRunner

    from helios.cli import app

    result = CliRunner().invoke(app, ["serve", "--ray", "--engines", "0"])
    assert result.exit_code == 2 and "--engines must be at least 1" in result.output
    result = CliRunner().invoke(app, ["serve", "--ray", "--model", "/nonexistent/model"])
    assert result.exit_code == 2 and "does not exist" in result.output
