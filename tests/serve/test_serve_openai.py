"""/v1/videos through the real `openai` client against a running server on loopback (the bundled model)."""

from __future__ import annotations

import io
import time
import warnings

import httpx
import pytest
from helpers.serving import SIZE

from helios.engine.video_io import video_info

openai = pytest.importorskip("openai")

TOKEN = "test-token-123456"
FAST = {"steps": SIZE["steps"], "seed": 3}  # our own fields, as extra_body
SMALL = f"{SIZE['width']}x{SIZE['height']}"


@pytest.fixture
def api(serve):
    server = serve(token=TOKEN)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # (the client marks the videos API deprecated)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
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
