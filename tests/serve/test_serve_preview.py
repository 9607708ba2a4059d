"""The server's preview mode: live chunks through the tiny decoder, the mp4 decoded by the full VAE afterwards."""

from __future__ import annotations

import pytest
import torch
from helpers.serving import SIZE, live, next_matching, wait_for

from helios.engine.video_io import read_video


@pytest.fixture(scope="module")
def preview_pipe(model_folder):
    """A second pipeline of the bundled model with its shipped preview decoder (the session's `pipe` has none)."""
    from helios.engine.pipeline import load_pipeline

    return load_pipeline(model_folder, preview_decoder="tiny")


def download(client, job: str, path):
    r = client.get(f"/api/jobs/{job}/video")
    assert r.status_code == 200, r.text
    path.write_bytes(r.content)
    return read_video(path)


def test_preview_job_streams_tiny_frames_and_offers_the_full_decode(serve, preview_pipe, tmp_path):
    server = serve(pipeline=preview_pipe)
    client = server.client()
    assert client.get("/api/config").json()["preview"] is True
    body = {"prompt": "two red circles bouncing", "frames": 33, "seed": 4, **SIZE}
    jobs = {}
    for preview in (False, True):
        r = client.post("/api/jobs", json={**body, "preview": preview})
        assert r.status_code == 202, r.text
        assert r.json()["params"]["decoder"] == ("tiny" if preview else "full")
        jobs[preview] = r.json()["job"]
    status = wait_for(client, jobs[True])
    assert status["state"] == "done" and status["finalizing"] == [1, 1]
    wait_for(client, jobs[False])
    full = download(client, jobs[False], tmp_path / "full.mp4")
    preview = download(client, jobs[True], tmp_path / "preview.mp4")
    assert torch.equal(full, preview)  # the mp4 of a preview job is the full VAE's, frame for frame

    with live(server, prompt="two red circles bouncing", frames=33, seed=4, preview=True) as (ws, accepted):
        assert accepted["params"]["decoder"] == "tiny"
        chunk = next_matching(ws, lambda m: m["type"] in ("chunk", "end"))
        assert chunk["type"] == "chunk" and chunk["decoder"] == "tiny"
        final = next_matching(ws, lambda m: m["type"] == "finalizing" and m["done"] == m["total"])
        assert final["total"] == 1
        assert next_matching(ws, lambda m: m["type"] == "end")["state"] == "done"


def test_preview_is_refused_by_a_server_without_a_preview_decoder(server):
    client = server.client()
    assert client.get("/api/config").json()["preview"] is False
    r = client.post("/api/jobs", json={"prompt": "a red circle", "frames": 33, "preview": True, **SIZE})
    assert r.status_code == 400 and "--decoder tiny" in r.json()["error"]
