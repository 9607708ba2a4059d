"""/v1/videos through the real `openai` client against a running server on loopback (the bundled model)."""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from helpers.serving import SIZE, Exploding, Spy

from helios.engine.video_io import read_video, video_info, write_video

openai = pytest.importorskip("openai")

TOKEN = "test-token-123456"
FAST = {"steps": SIZE["steps"], "seed": 3}  # our own fields, as extra_body
SMALL = f"{SIZE['width']}x{SIZE['height']}"


def api_client(server) -> "openai.OpenAI":
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # (the client marks the videos API deprecated)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture
def api(serve):
    server = serve(token=TOKEN)
    client = api_client(server)
    yield server, client
    client.close()


def poll(client, video_id: str, until=("completed", "failed"), timeout: float = 120):
    deadline = time.monotonic() + timeout
    while (video := client.videos.retrieve(video_id)).status not in until:
        assert time.monotonic() < deadline, f"still {video.status} after {timeout} s"
        time.sleep(0.1)
    return video


def test_create_poll_download_and_list(api, tmp_path):
    server, client = api
    video = client.videos.create(prompt="a red circle", seconds="1", size=SMALL, model="helios-tiny",
                                 extra_body=FAST)
    assert video.status in ("queued", "in_progress") and video.object == "video"
    assert video.size == SMALL and video.model == "helios-tiny" and video.created_at > 1.7e9
    done = poll(client, video.id)
    assert done.status == "completed" and done.progress == 100 and done.error is None
    assert done.completed_at >= done.created_at and done.expires_at > done.completed_at
    assert done.seconds == f"{33 / 24:.2f}"  # 24 frames round up to one 33-frame chunk

    content = client.videos.download_content(video.id).read()
    path = tmp_path / "v.mp4"
    path.write_bytes(content)
    info = video_info(path)
    assert (info.frames, info.height, info.width) == (33, SIZE["height"], SIZE["width"])

    # Range requests, as players and download managers send them.
    url = f"{server.url}/v1/videos/{video.id}/content"
    part = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}", "Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == content[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(content)}"
    thumb = httpx.get(url + "?variant=thumbnail", headers={"Authorization": f"Bearer {TOKEN}"})
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"

    listed = client.videos.list(order="asc")
    assert [v.id for v in listed.data] == [video.id] and listed.has_more is False


def test_cancel_a_running_video_by_deleting_it(api):
    server, client = api
    video = client.videos.create(prompt="a long one", seconds="10", size=SMALL, extra_body=FAST)
    poll(client, video.id, until=("in_progress",))
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError) as e:
        client.videos.retrieve(video.id)
    assert e.value.body["code"] == "not_found"
    server.wait_idle()
    assert not list((server.worker.workdir / video.id).glob("*.mp4"))  # the partial file went too


def test_schedule_and_image_reference(api):
    from PIL import Image

    server, client = api
    image = io.BytesIO()
    Image.new("RGB", (90, 70), (200, 30, 30)).save(image, format="PNG")
    video = client.videos.create(prompt="a red circle", seconds="2", size=SMALL,
                                 input_reference=("start.png", image.getvalue(), "image/png"),
                                 extra_body={**FAST, "schedule": ["1:a blue square"]})
    assert video.model_extra["helios"]["mode"] == "i2v"
    done = poll(client, video.id)
    assert done.status == "completed"
    extra = done.model_extra["helios"]
    assert extra["chunks_total"] == 2
    assert extra["prompt"] == "a blue square"  # the newest chunk's prompt: the schedule applied


def test_a_failed_video_says_why(pipe, serve):
    server = serve(token=TOKEN, pipeline=Exploding(pipe))
    client = api_client(server)
    video = poll(client, client.videos.create(prompt="please explode", seconds="3", size=SMALL, extra_body=FAST).id)
    assert video.status == "failed" and video.completed_at is None and video.progress == 33  # 1 of 3 chunks
    assert video.error.code == "generation_failed"
    assert video.error.message == "generation failed: RuntimeError: the device caught fire"
    with pytest.raises(openai.APIStatusError) as e:
        client.videos.download_content(video.id)
    assert e.value.status_code == 410 and e.value.body["code"] == "video_unavailable"
    assert "the device caught fire" in e.value.body["message"]
    client.close()


def test_video_to_video_from_an_upload_and_from_an_earlier_video(pipe, serve, tmp_path):
    spy = Spy(pipe)
    server = serve(token=TOKEN, pipeline=spy)
    client = api_client(server)
    ramp = np.zeros((40, 96, 96, 3), np.uint8)
    ramp[..., 2] = np.linspace(0, 255, 40, dtype=np.uint8)[:, None, None]  # blue ramps up over time
    clip = write_video(tmp_path / "ramp.mp4", ramp).read_bytes()
    uploaded = client.videos.create(prompt="the blue goes on", seconds="1", size=SMALL, extra_body=FAST,
                                    input_reference=("ramp.mp4", clip, "video/mp4"))
    assert uploaded.model_extra["helios"]["mode"] == "v2v"
    assert poll(client, uploaded.id).status == "completed"
    blue = spy.calls[-1]["video"][2].mean(dim=(1, 2))  # the upload reached the engine, resized, in order
    assert spy.calls[-1]["video"].shape == (3, 40, 64, 64) and blue[0] < -0.9 and blue[-1] > 0.9

    # extra_body video: continue one of your own finished videos, by its id.
    continued = client.videos.create(prompt="and on", seconds="1", size=SMALL, extra_body={**FAST, "video": uploaded.id})
    assert continued.model_extra["helios"]["mode"] == "v2v"
    done = poll(client, continued.id)
    assert done.status == "completed"
    source = tmp_path / "source.mp4"
    source.write_bytes(client.videos.download_content(uploaded.id).read())
    expected = read_video(source, size=(SIZE["height"], SIZE["width"])).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.equal(spy.calls[-1]["video"], expected)  # the engine got exactly the earlier video's frames
    path = tmp_path / "continued.mp4"
    path.write_bytes(client.videos.download_content(continued.id).read())
    assert video_info(path).frames == 33
    client.close()


def test_a_source_video_must_be_a_finished_video_of_yours(api):
    server, client = api
    other = server.client(Authorization=f"Bearer {TOKEN}")  # another owner's video
    theirs = other.post("/v1/videos", json={"prompt": "a red circle", "seconds": 1, "size": SMALL, **FAST}).json()
    running = client.videos.create(prompt="a long one", seconds="10", size=SMALL, extra_body=FAST)
    cases = [
        ("no-such-video", openai.NotFoundError, "video 'no-such-video' cannot be continued: no video"),
        (theirs["id"], openai.NotFoundError, "cannot be continued: no video"),  # exactly as a missing one
        (running.id, openai.ConflictError, "cannot be continued: the video is not finished yet"),
        ("../../etc/passwd", openai.BadRequestError, "video must be the id of one of your finished videos"),
    ]
    for source, error, message in cases:
        with pytest.raises(error) as e:
            client.videos.create(prompt="more", seconds="1", size=SMALL, extra_body={**FAST, "video": source})
        assert e.value.body["param"] == "video" and message in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="more", seconds="1", size=SMALL, extra_body={**FAST, "video": running.id},
                             input_reference=("a.mp4", b"x", "video/mp4"))
    assert "not both" in e.value.body["message"]
    # input_reference as a URL, a file id or a path (JSON) is refused, never fetched or opened.
    for reference in ("/etc/hosts", {"image_url": "file:///etc/hosts"}, {"file_id": "file-123"}):
        r = httpx.post(f"{server.url}/v1/videos", headers={"Authorization": f"Bearer {TOKEN}"},
                       json={"prompt": "a cat", "size": SMALL, "input_reference": reference})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference", r.text
        assert "fetches no URLs and opens no file ids or paths" in r.json()["error"]["message"]
    client.videos.delete(running.id)
    server.wait_idle()


@pytest.mark.parametrize("kwargs, param, message", [
    ({"size": "64by64"}, "size", "size must be WIDTHxHEIGHT"),
    ({"size": "64x65"}, "size", "height=65"),
    ({"size": "4096x64"}, "size", "is larger than this server allows"),
    ({"seconds": "100"}, "seconds", "seconds=100 is 2400 frames at 24 fps: frames=2400 is more than this server"),
    ({"extra_body": {"steps": 500}}, "steps", "steps must be between 1 and 100"),
    ({"extra_body": {"schedule": ["9:too late"]}}, "schedule", "the video has 1 chunks"),
    ({"extra_body": {"colour": "red"}}, "colour", "unknown parameter 'colour'"),
])
def test_bad_requests_get_openai_errors(api, kwargs, param, message):
    server, client = api
    kwargs = {"seconds": "1", "size": SMALL, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="a red circle", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
    assert message in e.value.body["message"], e.value.body
    assert server.worker.stats()["known_jobs"] == 0  # refused before anything was queued


def test_missing_or_wrong_token_is_refused(api):
    server, _ = api
    for key in ("", "wrong-token-0000"):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0,
                               default_headers={"Authorization": ""} if not key else None)
        with pytest.raises(openai.AuthenticationError) as e:
            client.videos.list()
        assert e.value.body["code"] == "invalid_api_key" and "Bearer" in e.value.body["message"]
    r = httpx.get(f"{server.url}/v1/nowhere", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_videos_belong_to_the_key_or_to_the_client_id(api):
    server, client = api
    mine = server.client(Authorization=f"Bearer {TOKEN}")  # a script with its own client id
    r = mine.post("/v1/videos", json={"prompt": "a red circle", "seconds": 1, "size": SMALL, **FAST})
    assert r.status_code == 200, r.text
    assert r.json()["id"] not in [v.id for v in client.videos.list().data]  # not the key's
    assert mine.get(f"/v1/videos/{r.json()['id']}").status_code == 200
    server.wait_idle()


def as_v1(fields: dict) -> dict:
    """An /api job's fields as /v1/videos fields: frames as seconds, height and width as size."""
    out = {"size": SMALL, **{k: v for k, v in fields.items() if k not in ("frames", "height", "width")}}
    if "height" in fields or "width" in fields:
        out["size"] = f"{fields.get('width', SIZE['width'])}x{fields.get('height', SIZE['height'])}"
    if "frames" in fields:
        out["seconds"] = fields["frames"] / 24
    return out


def assert_same_refusal(api_answer: httpx.Response, v1_answer: httpx.Response) -> None:
    """/v1 refuses as /api does: the same status, /api's message inside OpenAI's error shape."""
    assert v1_answer.status_code == api_answer.status_code, (api_answer.text, v1_answer.text)
    error = v1_answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert api_answer.json()["error"] in error["message"], (api_answer.text, v1_answer.text)


def test_bad_input_gets_the_same_limits_and_messages_as_api(serve, tmp_path):
    from serve.test_serve_limits import BAD_JSON, SMALL as LIMITS, png_bytes

    server = serve(limits=replace(LIMITS, max_upload_pixels=10_000))
    client = server.client()
    # Every refused /api job that /v1 can ask for (frames as seconds: a positive whole number of frames).
    cases = [f for f, _, _ in BAD_JSON if isinstance(f.get("frames", 24), int) and f.get("frames", 24) > 0]
    for fields in cases:
        assert_same_refusal(client.post("/api/jobs", json={**SIZE, **fields}),
                            client.post("/v1/videos", json={"steps": 1, **as_v1(fields)}))
    deep = b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}"
    assert_same_refusal(*(client.post(path, content=deep, headers={"content-type": "application/json"})
                          for path in ("/api/jobs", "/v1/videos")))
    # Uploads: what /api takes as `image` or `video`, /v1 takes as input_reference.
    short = write_video(tmp_path / "short.mp4", np.zeros((10, 64, 64, 3), np.uint8)).read_bytes()
    uploads = [("image", "cat.png", b"this is not an image", "image/png"), ("image", "empty.png", b"", "image/png"),
               ("video", "clip.mp4", b"\x00" * 1000, "video/mp4"), ("video", "short.mp4", short, "video/mp4"),
               ("image", "big.png", b"\x89PNG" + bytes(120_000), "image/png"),
               ("image", "huge.png", b"\x89PNG" + bytes(300_300), "image/png"),  # (mid-KiB: the forms' other
                                                                                # fields differ by a few bytes)
               ("image", "wide.png", png_bytes((200, 100)), "image/png")]
    for field, name, data, kind in uploads:
        form = {"prompt": "a cat", "steps": "1"}
        assert_same_refusal(
            client.post("/api/jobs", data={**form, "frames": "33", "height": "64", "width": "64"},
                        files={field: (name, data, kind)}),
            client.post("/v1/videos", data={**form, "seconds": "1", "size": SMALL},
                        files={"input_reference": (name, data, kind)}))
    assert server.worker.stats()["known_jobs"] == 0  # nothing was queued
    # The per-client limit and the queue length, counted over both APIs.
    long = {"prompt": "a cat", "frames": 198, **SIZE}
    assert client.post("/api/jobs", json=long).status_code == 202
    assert client.post("/v1/videos", json={"steps": 1, **as_v1(long)}).status_code == 200
    assert_same_refusal(client.post("/api/jobs", json=long), client.post("/v1/videos", json=as_v1(long)))
    other = server.client()
    assert other.post("/v1/videos", json=as_v1(long)).status_code == 200
    assert_same_refusal(*(server.client().post(path, json=body) for path, body in
                          (("/api/jobs", long), ("/v1/videos", as_v1(long)))))
    for c in (client, other):
        for job in c.get("/api/jobs").json()["jobs"]:
            assert c.delete(f"/api/jobs/{job['job']}").status_code == 200
    server.wait_idle()
