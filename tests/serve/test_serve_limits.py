"""Every bad request is refused with a clear message, before anything is queued; the token rules."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from helpers.serving import SIZE

from helios.serve import Limits, check_bind

SMALL = Limits(max_frames=200, max_height=256, max_width=256, max_upload_bytes=100_000, max_jobs_per_client=2,
               max_queue=3)


def png_bytes(size=(64, 64)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def form(**fields) -> dict:
    return {k: str(v) for k, v in {**SIZE, **fields}.items()}


BAD_JSON = [
    ({"prompt": "a cat", "frames": 201}, 400, "frames=201 is more than this server allows (at most 200 frames"),
    ({"prompt": "a cat", "frames": 0}, 400, "frames must be at least 1"),
    ({"prompt": "a cat", "frames": "many"}, 400, "frames must be a whole number, got 'many'"),
    ({"prompt": "a cat", "frames": 33.5}, 400, "frames must be a whole number"),
    ({"prompt": "a cat", "height": 65}, 400, "height=65: frame sizes must be positive multiples of "),
    ({"prompt": "a cat", "width": 512}, 400, "512x64 is larger than this server allows (at most 256x256)"),
    ({"prompt": ""}, 400, "the prompt is empty: describe the video in words"),
    ({"prompt": "   \n"}, 400, "the prompt is empty"),
    ({}, 400, "the prompt is empty"),
    ({"prompt": "x" * 2001}, 400, "the prompt has 2001 characters; the limit is 2000"),
    ({"prompt": "a cat", "steps": 0}, 400, "steps must be between 1 and 100"),
    ({"prompt": "a cat", "preset": "turbo"}, 400, "unknown preset 'turbo'"),
    ({"prompt": "a cat", "seed": -1}, 400, "seed must be between 0"),
    ({"prompt": "a cat", "fast_start": "soon"}, 400, "fast_start must be true or false, got 'soon'"),
    ({"prompt": "a cat", "fast_start": 1}, 400, "fast_start must be true or false, got 1"),
]


@pytest.fixture
def small(serve):
    return serve(limits=SMALL)


def test_bad_parameters_are_refused_with_their_message(small):
    client = small.client()
    for fields, status, message in BAD_JSON:
        r = client.post("/api/jobs", json={**SIZE, **fields})
        assert (r.status_code, message in r.json().get("error", "")) == (status, True), (fields, r.text)
    r = client.post("/api/jobs", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json() == {"error": "the request body must be a JSON object"}
    r = client.post("/api/jobs", content=b"prompt=a cat", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    assert small.worker.stats()["known_jobs"] == 0  # nothing was queued


def test_bad_uploads_are_refused_with_their_message(small, tmp_path):
    from helios.engine.video_io import write_video

    client = small.client()
    cases = [
        ({"image": ("cat.png", b"this is not an image", "image/png")}, 400,
         "the uploaded image 'cat.png' could not be read: send a PNG, JPEG or WebP file"),
        ({"image": ("empty.png", b"", "image/png")}, 400, "the uploaded image is empty"),
        ({"video": ("clip.mp4", b"\x00" * 1000, "video/mp4")}, 400, "the uploaded video 'clip.mp4' could not be read"),
        ({"image": ("a.png", png_bytes(), "image/png"), "video": ("b.mp4", b"x", "video/mp4")}, 400,
         "give an image (image-to-video) or a video (video-to-video), not both"),
        ({"audio": ("a.wav", b"RIFF", "audio/wav")}, 400, "unexpected file field(s) ['audio']"),
        ({"image": ("big.png", b"\x89PNG" + bytes(120_000), "image/png")}, 413,
         "the uploaded image is 117 KiB; uploads may be at most 98 KiB"),
    ]
    import numpy as np

    short = write_video(tmp_path / "short.mp4", np.zeros((10, 64, 64, 3), np.uint8))
    cases.append(({"video": ("short.mp4", short.read_bytes(), "video/mp4")}, 400,
                  "the uploaded video has 10 frames; video-to-video needs at least 33"))
    for files, status, message in cases:
        r = client.post("/api/jobs", data=form(prompt="a cat", frames=33), files=files)
        assert r.status_code == status, (files.keys(), r.text)
        assert message is None or message in r.json()["error"], r.text
    assert small.worker.stats()["known_jobs"] == 0


def test_huge_uploads_are_refused_up_front_and_while_streaming(small):
    client = small.client()
    huge = b"\x89PNG" + bytes(300_000)
    r = client.post("/api/jobs", data=form(prompt="a cat"), files={"image": ("huge.png", huge, "image/png")})
    error = r.json()["error"]
    assert r.status_code == 413 and error.startswith("the request is 29") and error.endswith("at most 98 KiB"), error
    # Without a Content-Length (chunked upload) the body is counted as it arrives.
    request = httpx.Request("POST", small.url + "/api/jobs", data=form(prompt="a cat"),
                            files={"image": ("huge.png", huge, "image/png")})
    body = request.read()
    pieces = (body[i:i + 16384] for i in range(0, len(body), 16384))
    r = client.post("/api/jobs", content=pieces, headers={"content-type": request.headers["content-type"]})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and "larger than the upload limit" in r.json()["error"], r.text
    assert small.worker.stats()["known_jobs"] == 0


def test_a_pixel_bomb_image_is_refused_before_decoding(serve):
    server = serve(limits=Limits(max_upload_pixels=10_000))
    r = server.client().post("/api/jobs", data=form(prompt="a cat"),
                             files={"image": ("wide.png", png_bytes((200, 100)), "image/png")})
    assert r.status_code == 413 and r.json()["error"] == ("the uploaded image is 200x100; images may have at most "
                                                          "10000 pixels")


def test_too_many_jobs_per_client_and_in_the_queue(small):
    a, b, c = small.client(), small.client(), small.client()
    job = {"prompt": "a cat", "frames": 198, **SIZE}
    mine = [a.post("/api/jobs", json=job) for _ in range(2)]
    assert [r.status_code for r in mine] == [202, 202]
    r = a.post("/api/jobs", json=job)
    assert r.status_code == 429 and r.json()["error"] == (
        "you already have 2 job(s) queued or running (at most 2 per client); wait for one to finish or cancel it")
    assert b.post("/api/jobs", json=job).status_code == 202
    r = c.post("/api/jobs", json=job)
    assert r.status_code == 503 and r.json()["error"] == "the queue is full (3 jobs); try again later"
    # The same limits hold on the live socket.
    from websockets.sync.client import connect

    with connect(small.ws_url, additional_headers={"X-Helios-Client": a.headers["X-Helios-Client"]}) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "a cat", "frames": 33, **SIZE}))
        assert json.loads(ws.recv(timeout=30))["status"] == 429
    for client, r in ((a, mine[0]), (a, mine[1])):
        assert client.delete(f"/api/jobs/{r.json()['job']}").status_code == 200
    assert c.post("/api/jobs", json=job).status_code == 202  # room again
    for client in (b, c):
        for j in client.get("/api/jobs").json()["jobs"]:
            client.delete(f"/api/jobs/{j['job']}")
    small.wait_idle()


# ---- the token -------------------------------------------------------------------------------
TOKEN = "correct-horse-battery"


def test_token_is_required_everywhere_but_the_page(serve):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    server = serve(token=TOKEN)
    anon = httpx.Client(base_url=server.url)
    assert anon.get("/").status_code == 200  # the page itself holds nothing; it asks for the token
    for headers in ({}, {"Authorization": "Bearer wrong-token-123"}, {"X-Helios-Token": "nope"}):
        for method, path in (("GET", "/api/config"), ("POST", "/api/jobs"), ("GET", "/api/jobs")):
            r = anon.request(method, path, headers=headers, json={"prompt": "a cat", **SIZE})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"].startswith("this server needs an access token")
        with pytest.raises(InvalidStatus) as e:
            connect(server.ws_url, additional_headers=headers, open_timeout=10)
        assert e.value.response.status_code == 401
    assert server.worker.stats()["known_jobs"] == 0
    good = [{"Authorization": f"Bearer {TOKEN}"}, {"X-Helios-Token": TOKEN}, {"Cookie": f"helios_token={TOKEN}"}]
    for headers in good:
        assert anon.get("/api/config", headers=headers).status_code == 200
    client = server.client(Authorization=f"Bearer {TOKEN}")
    assert client.post("/api/jobs", json={"prompt": "a cat", "frames": 33, **SIZE}).status_code == 202
    with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "a cat", "frames": 33, **SIZE}))
        assert json.loads(ws.recv(timeout=30))["type"] == "accepted"
    server.wait_idle()


def test_cross_origin_websocket_is_refused(server):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as e:
        connect(server.ws_url, origin="http://evil.example", open_timeout=10)
    assert e.value.response.status_code == 403
    with connect(server.ws_url, origin=server.url, open_timeout=10):
        pass  # the page's own origin is fine


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.com"])
def test_non_loopback_hosts_need_a_token(host):
    with pytest.raises(ValueError, match="refusing to listen on .* without a token"):
        check_bind(host, None)
    check_bind(host, TOKEN)
    with pytest.raises(ValueError, match="too short"):
        check_bind(host, "abc")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_hosts_need_no_token(host):
    check_bind(host, None)


def test_serve_command_refuses_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from helios.cli import app
    from helios.serve import run_server

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "missing")],
                                env={"HELIOS_SERVE_TOKEN": ""})
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.output
    with pytest.raises(ValueError, match="without a token"):  # the model path is never looked at
        run_server(tmp_path / "missing", host="0.0.0.0")


def test_fast_start_is_read_from_json_and_from_forms():
    from helios.serve.params import parse_params

    class Spec:  # the checks parse_params runs on the model; a distilled 3-stage one
        default_size = (64, 64)

        def resolve_settings(self, preset, **overrides):
            from helios.sampling.sampler import preset as named

            return named("distilled").with_(**{k: v for k, v in overrides.items() if v is not None})

        def check_size(self, height, width, settings):
            pass

    for fields, expected in [({}, False), ({"fast_start": True}, True), ({"fast_start": False}, False),
                             ({"fast_start": "true"}, True), ({"fast_start": "on"}, True), ({"fast_start": "0"}, False)]:
        assert parse_params({"prompt": "a cat", **fields}, Spec(), SMALL).fast_start is expected, fields
