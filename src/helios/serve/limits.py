"""What a server accepts: request bounds, the bind/token rule, and the error every refusal raises."""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Collection

MAX_JSON_DEPTH = 16  # no message of the protocol nests deeper than 2
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


class RequestError(Exception):
    """A refused request: becomes HTTP `status` with {"error": message} (or a WebSocket error message)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_frames: int = 1452  # 44 chunks, about a minute at 24 fps
    max_height: int = 768
    max_width: int = 1280
    max_steps: int = 100  # per pyramid stage
    max_prompt_chars: int = 2000
    max_upload_bytes: int = 64 * 2**20
    max_upload_pixels: int = 36_000_000  # an image bigger than this is refused before it is decoded
    max_video_frames: int = 330  # frames read from an uploaded video (V2V uses the last few windows)
    max_jobs_per_client: int = 2  # queued + running, per client id
    max_queue: int = 32  # queued + running, all clients
    max_pause_s: float = 300.0  # a paused job holds the GPU; after this it is stopped
    abandon_after_s: float = 120.0  # an HTTP job nobody asks about for this long is cancelled
    stall_timeout_s: float = 60.0  # a live client that stops reading frames for this long is cancelled
    keep_finished_s: float = 3600.0  # finished videos are deleted after this
    max_finished_jobs: int = 500  # and at most this many finished jobs are remembered


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve anywhere


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token: anyone who can reach the port could use the GPU."""
    token = token or None
    if token is not None and len(token) < 8:
        raise ValueError("the token is too short: use at least 8 characters (e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe())'`)")
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to listen on {host} without a token: other machines could reach this server. "
                         "Pass --token (or set HELIOS_SERVE_TOKEN), or keep the default --host 127.0.0.1")


def token_matches(given: str | None, expected: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def check_prompt(prompt: object, limits: Limits, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"the {what} is empty: describe the video in words")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"the {what} has {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
    return prompt.strip()


def check_frames(frames: int, limits: Limits) -> None:
    if frames < 1:
        raise RequestError(f"frames must be at least 1, got {frames}")
    if frames > limits.max_frames:
        raise RequestError(f"frames={frames} is more than this server allows (at most {limits.max_frames} frames "
                           f"per video)")


def check_size(height: int, width: int, limits: Limits) -> None:
    if height > limits.max_height or width > limits.max_width:
        raise RequestError(f"{width}x{height} is larger than this server allows (at most "
                           f"{limits.max_width}x{limits.max_height})")


def human_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def check_upload_size(size: int, limits: Limits, what: str = "the upload") -> None:
    if size > limits.max_upload_bytes:
        raise RequestError(f"{what} is {human_bytes(size)}; uploads may be at most "
                           f"{human_bytes(limits.max_upload_bytes)}", status=413)


def parse_json_object(raw: str | bytes, what: str = "the request body") -> dict:
    """A JSON object, with its nesting checked before it is parsed (a deep one would exhaust the
    parser's recursion); any refusal is a RequestError (400)."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else raw
    depth = 0
    for bracket in re.findall(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"{what} nests JSON more than {MAX_JSON_DEPTH} levels deep; send a flat object")
    try:
        value = json.loads(text or "{}")
    except (json.JSONDecodeError, RecursionError):
        raise RequestError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object")
    return value


def check_known_fields(fields: Collection[str], known: Collection[str], what: str = "the request") -> None:
    """Refuse fields the server does not know (a misspelt one would otherwise be ignored silently)."""
    unknown = sorted(str(k)[:40] for k in fields if k not in known)
    if unknown:
        raise RequestError(f"{what} has unknown field(s) {unknown[:8]}; the known fields are {sorted(known)}")
