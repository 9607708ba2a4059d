"""The wire format shared by the server, the web page (static/app.js) and the tests.

WebSocket /ws, client -> server (JSON text messages):
    {"type": "start", "prompt": ..., "frames": ..., "height": ..., "width": ..., "preset": ..., "steps": ...,
     "seed": ..., "guidance": ..., "fast_start": true | false, "negative": ..., "upload": "image" | "video" | null, "filename": ...}
        with "upload" set, the next message is binary: the file's bytes.
    {"type": "steer", "prompt": ...}   {"type": "pause"}   {"type": "resume"}   {"type": "stop"}

server -> client:
    JSON {"type": "accepted", "job", "client", ...}     the job is queued
    JSON {"type": "status", ...job status...}            state, progress, queue position (on every change)
    JSON {"type": "chunk", "index", "first_frame", "frames", "prompt", "total_chunks", "seconds", "complete"}
        complete: false for a chunk's frame 0 sent on its own (fast_start); the chunk's other frames follow
    binary, `frames` times: FRAME_HEADER (magic b"HLF1", chunk index, frame index in the video) + one JPEG
    JSON {"type": "steered", "prompt", "from_chunk"}
    JSON {"type": "end", "state": "done" | "stopped" | "cancelled" | "failed", "error", "video", ...}
    JSON {"type": "error", "error"}                      a refused start (then the socket closes) or message
"""

from __future__ import annotations

import io
import struct

import numpy as np

FRAME_MAGIC = b"HLF1"
FRAME_HEADER = struct.Struct("<4sII")  # magic, chunk index, frame index in the whole video (little endian)
JPEG_QUALITY = 85

# WebSocket close codes (4000-4999 are free for applications).
CLOSE_DONE = 1000
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_MANY = 4429

CLIENT_HEADER = "X-Helios-Client"
CLIENT_COOKIE = "helios_client"
TOKEN_HEADER = "X-Helios-Token"
TOKEN_COOKIE = "helios_token"


def video_url(job_id: str) -> str:
    return f"/api/jobs/{job_id}/video"


def status_url(job_id: str) -> str:
    return f"/api/jobs/{job_id}"


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def frame_messages(chunk_index: int, first_frame: int, frames: np.ndarray) -> list[bytes]:
    """One binary WebSocket message per frame: header + JPEG. CPU work: run it off the event loop."""
    return [FRAME_HEADER.pack(FRAME_MAGIC, chunk_index, first_frame + i) + encode_jpeg(f)
            for i, f in enumerate(frames)]


def parse_frame(message: bytes) -> tuple[int, int, bytes]:
    """(chunk index, frame index, JPEG bytes) of a binary frame message."""
    magic, chunk, frame = FRAME_HEADER.unpack_from(message)
    if magic != FRAME_MAGIC:
        raise ValueError(f"not a frame message (magic {magic!r})")
    return chunk, frame, message[FRAME_HEADER.size:]
