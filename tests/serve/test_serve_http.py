"""The plain HTTP API end to end: submit, poll, download; I2V and V2V uploads; ownership; wait mode."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from helpers.serving import SIZE, Spy, assert_wait_cancels_on_hang_up, wait_for, wait_until

from helios.engine.video_io import video_info, write_video


def png(color: tuple[int, int, int], size=(100, 80)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def download(client, job: str, tmp_path) -> "Path":  # noqa: F821
    r = client.get(f"/api/jobs/{job}/video")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    path = tmp_path / f"{job}.mp4"
    path.write_bytes(r.content)
    return path


def test_t2v_submit_poll_download(server, tmp_path):
    client = server.client()
    r = client.post("/api/jobs", json={"prompt": "a red fox running", "frames": 66, "seed": 3, **SIZE})
    assert r.status_code == 202, r.text
    job = r.json()
    # A free engine may take the job before the answer is written: queued or already running.
    assert job["state"] in ("queued", "running") and job["chunks_total"] == 2 and job["frames_total"] == 65
    assert job["params"]["mode"] == "t2v"

    seen = set()
    while (status := client.get(f"/api/jobs/{job['job']}").json())["state"] not in ("done", "failed"):
        seen.add((status["state"], status["chunks_done"]))
        time.sleep(0.02)
    assert status["state"] == "done", status
    assert status["chunks_done"] == status["chunks_total"] == 2
    assert status["frames_done"] == 65 and status["fps"] > 0
    assert status["queue_position"] is None
    assert {s for s, _ in seen} <= {"queued", "running"}

    info = video_info(download(client, job["job"], tmp_path))
    assert (info.frames, info.width, info.height) == (65, 64, 64)
    # The finished file is where the worker wrote it, and nothing partial is left beside it.
    folder = server.worker.workdir / job["job"]
    assert sorted(p.name for p in folder.iterdir()) == ["video.mp4"]


def test_video_is_not_ready_before_the_end_and_not_served_to_other_clients(server):
    owner, stranger = server.client(), server.client()
    job = owner.post("/api/jobs", json={"prompt": "a cat", "frames": 66, **SIZE}).json()["job"]
    r = owner.get(f"/api/jobs/{job}/video")
    assert r.status_code == 409 and "not finished" in r.json()["error"]
    wait_for(owner, job, ("done",))
    for path in (f"/api/jobs/{job}", f"/api/jobs/{job}/video"):
        r = stranger.get(path)
        assert r.status_code == 404 and r.json() == {"error": "no such job for this client"}
    assert stranger.delete(f"/api/jobs/{job}").status_code == 404
    assert stranger.get("/api/jobs").json()["jobs"] == []
    # A made-up client id is replaced by a fresh one, not trusted.
    forged = server.client()
    forged.headers["X-Helios-Client"] = owner.headers["X-Helios-Client"].split(".")[0] + ".0000"
    assert forged.get(f"/api/jobs/{job}").status_code == 404
    assert [j["job"] for j in owner.get("/api/jobs").json()["jobs"]] == [job]
    assert owner.get(f"/api/jobs/{job}/video").status_code == 200


def test_i2v_upload(pipe, serve, tmp_path):
    spy = Spy(pipe)
    server = serve(pipeline=spy)
    client = server.client()
    fields = {"prompt": "a red circle", "frames": "33", **{k: str(v) for k, v in SIZE.items()}}
    r = client.post("/api/jobs", data=fields,
                    files={"image": ("start.png", png((255, 0, 0)), "image/png")})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["mode"] == "i2v"
    status = wait_for(client, r.json()["job"])
    assert status["state"] == "done", status
    assert video_info(download(client, status["job"], tmp_path)).frames == 33
    # The 100x80 upload reached the engine resized to the video size, as a [-1, 1] image: pure red.
    image = spy.calls[-1]["image"]
    assert image.shape == (3, 64, 64) and "video" not in spy.calls[-1]
    assert torch.allclose(image[0], torch.ones(64, 64), atol=0.02)
    assert torch.allclose(image[1:], -torch.ones(2, 64, 64), atol=0.02)


def test_v2v_upload(pipe, serve, tmp_path):
    spy = Spy(pipe)
    server = serve(pipeline=spy)
    client = server.client()
    frames = np.zeros((40, 96, 96, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 255, 40, dtype=np.uint8)[:, None, None]  # blue ramps up over time
    source = write_video(tmp_path / "source.mp4", frames)
    r = client.post("/api/jobs", data={"prompt": "the blue continues", "frames": "33", "height": "64", "width": "64",
                                       "steps": "1"},
                    files={"video": ("source.mp4", source.read_bytes(), "video/mp4")})
    assert r.status_code == 202, r.text
    assert r.json()["params"]["mode"] == "v2v"
    status = wait_for(client, r.json()["job"])
    assert status["state"] == "done", status
    assert video_info(download(client, status["job"], tmp_path)).frames == 33
    video = spy.calls[-1]["video"]
    assert video.shape == (3, 40, 64, 64)
    blue = video[2].mean(dim=(1, 2))
    assert blue[0] < -0.9 and blue[-1] > 0.9 and bool((blue[1:] >= blue[:-1] - 0.05).all())


def test_wait_mode_returns_the_mp4(server, tmp_path):
    client = server.client()
    r = client.post("/api/jobs?wait=1", json={"prompt": "a green dog", "frames": 33, **SIZE})
    assert r.status_code == 200, r.text
    path = tmp_path / "waited.mp4"
    path.write_bytes(r.content)
    assert video_info(path).frames == 33
    assert client.get(f"/api/jobs/{r.headers['X-Helios-Job']}").json()["state"] == "done"


def test_wait_mode_cancels_when_the_client_hangs_up(server):
    assert_wait_cancels_on_hang_up(server.client(), SIZE, connect_s=10, read_s=1.5, settle_s=30)


def test_http_controls_cancel_and_stop(server, tmp_path):
    client = server.client()
    long = {"prompt": "a red fox", "frames": 33 * 40, **SIZE}
    first = client.post("/api/jobs", json=long).json()["job"]
    wait_until(client, first, lambda s: s["chunks_done"] >= 1)
    steered = client.post(f"/api/jobs/{first}/steer", json={"prompt": "a blue dog"}).json()
    assert steered["from_chunk"] >= 1 and steered["next_prompt"] == "a blue dog"
    assert client.post(f"/api/jobs/{first}/steer", json={"prompt": ""}).status_code == 400
    stopped = client.post(f"/api/jobs/{first}/stop").json()
    status = wait_for(client, first)
    assert status["state"] == "stopped" and 0 < status["chunks_done"] < 40, (stopped, status)
    # Stopping keeps what was made: a complete, playable file of exactly those frames.
    assert video_info(download(client, first, tmp_path)).frames == status["frames_done"]

    second = client.post("/api/jobs", json=long).json()["job"]
    wait_for(client, second, ("running",))
    assert client.delete(f"/api/jobs/{second}").status_code == 200
    status = wait_for(client, second)
    assert status["state"] == "cancelled" and status["video"] is None
    assert client.get(f"/api/jobs/{second}/video").status_code == 410
    assert not (server.worker.workdir / second).exists()
    assert client.post(f"/api/jobs/{second}/dance").status_code == 404


@pytest.mark.parametrize("abandon_after_s", [0.5])
def test_http_job_nobody_asks_about_is_cancelled(serve, abandon_after_s):
    from helios.serve import Limits

    server = serve(limits=Limits(abandon_after_s=abandon_after_s))
    client = server.client()
    job = client.post("/api/jobs", json={"prompt": "a cat", "frames": 33 * 40, **SIZE}).json()["job"]
    worker_job = server.worker.get(job, client.headers["X-Helios-Client"])
    assert worker_job.finished.wait(30), "an abandoned job kept running"
    assert worker_job.state.value == "cancelled" and "abandoned" in worker_job.error
    server.wait_idle()
