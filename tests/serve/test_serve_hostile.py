"""Hostile input the server met when probed: deep JSON, pixel-bomb headers, unknown fields; and what a
restart after a crash leaves on disk, and the log lines of `helios serve`."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import zlib

import pytest
from helpers.serving import SIZE, live, next_json, wait_for

from helios.serve import Limits


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def collect_until_end(ws) -> list[dict]:
    messages = []
    while True:
        m = next_json(ws)
        messages.append(m)
        if m["type"] == "end":
            return messages


def test_deeply_nested_json_bodies_are_refused_with_400(server):
    client = server.client()
    for levels in (17, 500, 1000, 30_000):
        body = '{"prompt": ' + nested(levels) + "}"
        r = client.post("/api/jobs", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, (levels, r.status_code, r.text)
        assert "nests JSON more than 16 levels deep" in r.json()["error"]
    # Brackets inside strings are text, not nesting.
    r = client.post("/api/jobs", json={"prompt": "[[[[" * 100, "frames": 33, **SIZE})
    assert r.status_code == 202, r.text
    wait_for(client, r.json()["job"])
    job = r.json()["job"]
    r = client.post(f"/api/jobs/{job}/steer", content=('{"prompt": ' + nested(5000) + "}").encode())
    assert r.status_code in (400, 409) and "nests JSON" in r.json()["error"], r.text


def test_a_deep_json_first_message_gets_an_error_and_close_4400(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(server.ws_url, max_size=None) as ws:
        ws.send('{"type": "start", "prompt": ' + nested(30_000) + "}")
        reply = json.loads(ws.recv(timeout=30))
        assert reply["type"] == "error" and reply["status"] == 400 and "nests JSON" in reply["error"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 4400


def test_a_deep_json_steer_gets_an_error_and_the_session_goes_on(server):
    with live(server, prompt="a red circle", frames=33 * 2) as (ws, accepted):
        ws.send('{"type": "steer", "prompt": ' + nested(30_000) + "}")
        ws.send(json.dumps({"type": "steer", "prompt": "a blue circle", "colour": "blue"}))
        messages = collect_until_end(ws)
    errors = [m["error"] for m in messages if m["type"] == "error"]
    assert len(errors) == 2 and "nests JSON more than 16 levels deep" in errors[0], errors
    assert "unknown field(s) ['colour']; the known fields are ['prompt', 'type']" in errors[1]
    assert messages[-1]["state"] == "done"


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG of about 100 bytes whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def test_an_image_header_beyond_pils_own_limit_gets_413(server):
    client = server.client()
    for side in (13_000, 14_000, 60_000):  # 14000^2 is above PIL's decompression-bomb ceiling
        bomb = png_header_claiming(side, side)
        assert len(bomb) < 200
        r = client.post("/api/jobs", data={"prompt": "a cat", **{k: str(v) for k, v in SIZE.items()}},
                        files={"image": ("bomb.png", bomb, "image/png")})
        assert r.status_code == 413, (side, r.status_code, r.text)
        assert "images may have at most 36000000 pixels" in r.json()["error"]
    assert server.worker.stats()["known_jobs"] == 0


def test_unknown_job_fields_are_refused_with_the_known_ones(server):
    client = server.client()
    r = client.post("/api/jobs", json={"prompt": "a cat", "frame": 33, **SIZE})
    assert r.status_code == 400
    assert r.json()["error"].startswith("the job has unknown field(s) ['frame']; the known fields are ['fast_start', "
                                        "'frames', 'guidance', 'height'"), r.text
    r = client.post("/api/jobs", data={"prompt": "a cat", "sead": "3"})
    assert r.status_code == 400 and "unknown field(s) ['sead']" in r.json()["error"]
    from websockets.sync.client import connect

    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "a cat", "lenght": 99, **SIZE}))
        reply = json.loads(ws.recv(timeout=30))
    assert reply["type"] == "error" and "unknown field(s) ['lenght']" in reply["error"]
    assert "'filename'" in reply["error"] and "'upload'" in reply["error"]  # a start message's own fields count
    assert server.worker.stats()["known_jobs"] == 0


def test_the_page_is_offered_only_the_presets_the_model_runs(server):
    config = server.client().get("/api/config").json()
    assert config["presets"] == ["base"]  # the bundled model's one-stage scheduler runs no pyramid preset
    assert config["example_prompt"] == "two red circles bouncing on a blue background"


def test_a_distilled_model_offers_its_pyramid_presets(pipe, tmp_path):
    from helpers.tiny_pipelines import save_model_folder

    import helios

    save_model_folder("distilled", tmp_path / "d", seed=3)
    assert helios.load_pipeline(tmp_path / "d").spec.runnable_presets() == ["distilled", "mid"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_run_folders_of_killed_servers_are_removed_at_start(pipe, tmp_path):
    from helios.serve.app import create_app

    root = tmp_path / "work"
    host = socket.gethostname()
    folders = {}
    for name, owner in [("dead", f"{host} {dead_pid()}"), ("alive", f"{host} {os.getpid()}"),
                        ("other-host", f"not-{host} {dead_pid()}"), ("no-owner", None)]:
        folder = root / f"helios-serve-{name}"
        (folder / "job1").mkdir(parents=True)
        (folder / "job1" / ".video.partial.mp4").write_bytes(b"x" * 1000)
        if owner is not None:
            (folder / "owner").write_text(owner + "\n")
        folders[name] = folder
    app = create_app(pipe, workdir=root)
    assert not folders["dead"].exists()
    assert all(folders[n].exists() for n in ("alive", "other-host", "no-owner"))
    run_dir = app.state.server.worker.workdir
    assert (run_dir / "owner").read_text().split() == [host, str(os.getpid())]


def test_a_cancelled_job_logs_no_kept_file(server, caplog):
    caplog.set_level(logging.INFO, logger="helios")
    with live(server, prompt="a red circle", frames=33 * 6) as (ws, accepted):
        while next_json(ws)["type"] != "chunk":
            pass
    client = server.client()
    client.headers["X-Helios-Client"] = accepted["client"]
    status = wait_for(client, accepted["job"], timeout=60)
    assert status["state"] == "cancelled"
    lines = [r.getMessage() for r in caplog.records]
    assert not any("kept" in line or "playable" in line for line in lines), lines
    assert any(f"job {accepted['job']} cancelled after" in line for line in lines), lines


def test_helios_serve_shows_its_job_lines(monkeypatch):
    from typer.testing import CliRunner

    import helios.serve
    from helios.cli import app

    def fake_server(*args, **kwargs):  # what the worker logs, without starting a server
        logging.getLogger("helios.serve").info("job abc queued (t2v, 1 chunks, 64x64)")

    monkeypatch.setattr(helios.serve, "run_server", fake_server)
    r = CliRunner().invoke(app, ["serve", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "INFO helios.serve: job abc queued (t2v, 1 chunks, 64x64)" in r.output


def test_limits_of_json_nesting_are_the_documented_ones():
    from helios.serve.limits import MAX_JSON_DEPTH, RequestError, parse_json_object

    assert parse_json_object('{"a": ' + nested(MAX_JSON_DEPTH - 1) + "}") == {"a": json.loads(
        nested(MAX_JSON_DEPTH - 1))}
    with pytest.raises(RequestError, match="more than 16 levels"):
        parse_json_object('{"a": ' + nested(MAX_JSON_DEPTH) + "}")
    assert parse_json_object('{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[["}') == {"a": '"' + "[" * 25}
    assert Limits().max_upload_pixels == 36_000_000
