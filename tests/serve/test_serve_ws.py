"""The WebSocket live session: frames before the end, steering, pause/resume, stop, disconnects."""

from __future__ import annotations

import json
import socket
import time

from helpers.serving import SIZE, live, next_matching, wait_for

from helios.serve.protocol import FRAME_HEADER, parse_frame


def collect(ws, timeout: float = 120) -> tuple[list[dict], list[tuple[int, int]]]:
    """Read a session to its end: (JSON messages, (chunk, frame) of every binary frame)."""
    messages, frames = [], []
    deadline = time.monotonic() + timeout
    while True:
        m = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(m, bytes):
            chunk, frame, jpeg = parse_frame(m)
            assert jpeg[:2] == b"\xff\xd8"  # a JPEG
            frames.append((chunk, frame))
            continue
        messages.append(json.loads(m))
        if messages[-1]["type"] == "end":
            return messages, frames


def test_frames_arrive_while_the_job_is_still_running(server):
    client = server.client()
    with live(server, client.headers["X-Helios-Client"], prompt="a red circle", frames=33 * 4) as (ws, accepted):
        assert accepted["type"] == "accepted" and accepted["chunks_total"] == 4
        first = ws.recv(timeout=120)
        while isinstance(first, str):  # status messages come first
            first = ws.recv(timeout=120)
        status = client.get(f"/api/jobs/{accepted['job']}").json()  # the session's owner may poll it too
        assert status["state"] == "running" and status["chunks_done"] < 4, status
        assert len(first) > FRAME_HEADER.size and parse_frame(first)[:2] == (0, 0)
        messages, frames = collect(ws)
    frames = [(0, 0)] + frames
    assert accepted["frames_total"] == 129  # 4 chunks of 33, trimmed to 4k+1
    assert frames == [(i // 33, i) for i in range(129)]  # every frame, in order
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert [c["index"] for c in chunks] == list(range(1, 4))  # chunk 0's header came before the first frame
    assert all(c["complete"] for c in chunks)  # (false only for a fast start's early frame 0)
    end = messages[-1]
    assert end["state"] == "done" and end["frames_done"] == 129 and end["video"].endswith("/video")


def test_steering_applies_from_the_next_chunk(server):
    with live(server, prompt="a red circle", frames=33 * 3) as (ws, accepted):
        chunk0 = next_matching(ws, lambda m: m["type"] == "chunk")
        assert chunk0["index"] == 0 and chunk0["prompt"] == "a red circle"
        ws.send(json.dumps({"type": "steer", "prompt": "a blue dog"}))
        messages, _ = collect(ws)
    steered = [m for m in messages if m["type"] == "steered"]
    assert len(steered) == 1 and steered[0]["prompt"] == "a blue dog"
    start = steered[0]["from_chunk"]
    assert 1 <= start <= 2  # the engine had finished chunk 0 and started at most chunk 1
    prompts = {0: chunk0["prompt"], **{m["index"]: m["prompt"] for m in messages if m["type"] == "chunk"}}
    assert prompts == {k: "a red circle" if k < start else "a blue dog" for k in range(3)}
    assert messages[-1]["state"] == "done" and messages[-1]["prompt"] == "a blue dog"


def test_pause_holds_the_job_and_resume_continues(server):
    with live(server, prompt="a red circle", frames=33 * 3) as (ws, accepted):
        next_matching(ws, lambda m: m["type"] == "chunk")
        ws.send(json.dumps({"type": "pause"}))
        next_matching(ws, lambda m: m["type"] == "status" and m["state"] == "paused")
        job = server.worker.get(accepted["job"], accepted["client"])
        settle = 2 * job.gen_seconds + 0.5  # longer than any chunk so far (gen_seconds sums them)
        time.sleep(settle)  # the chunk under way when pause arrived may still finish
        held = job.chunks_done
        time.sleep(settle)
        assert job.chunks_done == held < 3 and job.state.value == "paused"
        ws.send(json.dumps({"type": "resume"}))
        messages, _ = collect(ws)
    assert messages[-1]["state"] == "done" and messages[-1]["chunks_done"] == 3


def test_stop_keeps_the_frames_made_so_far(server):
    with live(server, prompt="a red circle", frames=33 * 40) as (ws, accepted):
        next_matching(ws, lambda m: m["type"] == "chunk")
        ws.send(json.dumps({"type": "stop"}))
        messages, frames = collect(ws)
    end = messages[-1]
    assert end["state"] == "stopped" and 1 <= end["chunks_done"] < 40 and end["video"]
    assert len(frames) == end["frames_done"] == 33 * end["chunks_done"]  # every chunk made was delivered


def test_disconnect_cancels_the_job_and_frees_the_worker(server):
    client = server.client()
    cid = client.headers["X-Helios-Client"]
    with live(server, cid, prompt="a red circle", frames=33 * 40) as (ws, accepted):
        first = ws.recv(timeout=120)
        while isinstance(first, str):
            first = ws.recv(timeout=120)
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone without a goodbye, like a closed laptop lid
    # The job ends as cancelled well before its 40 chunks, and leaves no file.
    status = wait_for(client, accepted["job"], timeout=30)
    assert status["state"] == "cancelled" and status["chunks_done"] < 40, status
    assert status["error"] == "the client disconnected"
    assert not (server.worker.workdir / accepted["job"]).exists()
    server.wait_idle(timeout=10)
    # The worker takes the next job at once.
    with live(server, cid, prompt="a blue dog", frames=33) as (ws, accepted):
        messages, frames = collect(ws)
    assert messages[-1]["state"] == "done" and len(frames) == 33


def test_bad_control_messages_get_an_error_and_the_session_goes_on(server):
    with live(server, prompt="a red circle", frames=33 * 2) as (ws, accepted):
        ws.send("not json")
        ws.send(json.dumps({"type": "dance"}))
        ws.send(json.dumps({"type": "steer", "prompt": "  "}))
        messages, frames = collect(ws)
    errors = [m["error"] for m in messages if m["type"] == "error"]
    assert errors == ["the message is not valid JSON", "unknown message type 'dance': use steer, pause, resume or stop",
                      "the prompt is empty: describe the video in words"]
    assert messages[-1]["state"] == "done" and len(frames) == 65


def test_refused_start_gets_its_message_and_a_close_code(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "", **SIZE}))
        assert json.loads(ws.recv(timeout=30)) == {"type": "error", "status": 400,
                                                    "error": "the prompt is empty: describe the video in words"}
        try:
            ws.recv(timeout=30)
            raise AssertionError("the socket stayed open")
        except ConnectionClosed as e:
            assert e.rcvd.code == 4400


def test_image_upload_over_the_socket(server):
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (80, 80), (0, 0, 255)).save(out, format="JPEG")
    with live(server, prompt="a blue circle", frames=33, upload="image", filename="blue.jpg",
              upload_bytes=out.getvalue()) as (ws, accepted):
        assert accepted["type"] == "accepted" and accepted["params"]["mode"] == "i2v"
        messages, frames = collect(ws)
    assert messages[-1]["state"] == "done" and len(frames) == 33
    with live(server, prompt="a blue circle", frames=33, upload="image", filename="notes.txt",
              upload_bytes=b"plain text") as (ws, refused):
        assert refused == {"type": "error", "status": 400,
                           "error": "the uploaded image 'notes.txt' could not be read: send a PNG, JPEG or WebP file"}
