"""Job parameters from an HTTP form or a WebSocket start message, checked before anything is queued."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch

from helios.model_folder import CHUNK_FRAMES
from helios.serve.limits import (Limits, RequestError, check_frames, check_known_fields, check_prompt, check_size,
                                 check_upload_size)

WINDOW = CHUNK_FRAMES  # frames per chunk; V2V needs at least one whole window
# The fields of a job, in a JSON body, a form or a WebSocket start message (which adds START_FIELDS).
JOB_FIELDS = ("prompt", "frames", "height", "width", "preset", "steps", "guidance", "seed", "fast_start", "negative",
              "preview")


@dataclass(frozen=True)
class JobRequest:
    prompt: str
    frames: int
    height: int
    width: int
    chunks: int
    frames_out: int  # what the engine will produce (whole chunks, trimmed to 4k+1)
    preset: str | None = None
    steps: int | None = None
    guidance: float | None = None
    fast_start: bool = False  # the first chunk sampled with the preset's steps, not twice as many
    seed: int = 0
    negative: str = ""
    fps: int = 24
    image: torch.Tensor | None = None  # (H, W, 3) uint8, already at the video size
    video: torch.Tensor | None = None  # (T, H, W, 3) uint8, already at the video size
    preview: bool = False  # live chunks through the tiny decoder; the mp4 decoded by the full VAE afterwards

    @property
    def mode(self) -> str:
        return "i2v" if self.image is not None else "v2v" if self.video is not None else "t2v"

    def without_media(self) -> "JobRequest":
        """The same request minus the decoded upload, so finished jobs hold no large tensors."""
        return replace(self, image=None, video=None)

    def engine_inputs(self) -> dict:
        """image/video for HeliosVideoPipeline.stream: channels first, in [-1, 1]."""
        if self.image is not None:
            return {"image": self.image.permute(2, 0, 1).float() / 127.5 - 1}
        if self.video is not None:
            return {"video": self.video.permute(3, 0, 1, 2).float() / 127.5 - 1}
        return {}

    def public(self) -> dict:
        return {"prompt": self.prompt, "frames": self.frames_out, "requested_frames": self.frames,
                "height": self.height, "width": self.width, "chunks": self.chunks, "preset": self.preset,
                "steps": self.steps, "seed": self.seed, "mode": self.mode, "fps": self.fps,
                "decoder": "tiny" if self.preview else "full"}


def _number(fields: Mapping[str, object], name: str, kind: type, default):
    value = fields.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise RequestError(f"{name} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {value!r}") \
            from None
    if kind is int and isinstance(value, float) and value != number:
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    return number


def _flag(fields: Mapping[str, object], name: str) -> bool:
    """A yes/no field: a JSON boolean, or a form's text (true/false, 1/0, on/off); absent is false."""
    value = fields.get(name, False)
    if isinstance(value, str):
        value = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False, "": False}.get(
            value.strip().lower(), value)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}")
    return value


def parse_params(fields: Mapping[str, object], spec, limits: Limits, fps: int = 24,
                 extra_fields: tuple[str, ...] = ()) -> JobRequest:
    """Check everything that does not need the upload; the engine's own checks run here too, so a
    request that would fail at its first chunk is refused before it waits in the queue.

    spec: the model's PipelineSpec (or a pipeline: it has the same checks).
    extra_fields: fields the caller reads itself (a start message's type, upload, filename)."""
    from helios.engine.pipeline import InputError, plan_frames

    check_known_fields(fields, (*JOB_FIELDS, *extra_fields), "the job")
    prompt = check_prompt(fields.get("prompt"), limits)
    frames = _number(fields, "frames", int, 132)
    check_frames(frames, limits)
    default_h, default_w = spec.default_size
    height = _number(fields, "height", int, default_h)
    width = _number(fields, "width", int, default_w)
    check_size(height, width, limits)
    steps = _number(fields, "steps", int, None)
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise RequestError(f"steps must be between 1 and {limits.max_steps}, got {steps}")
    guidance = _number(fields, "guidance", float, None)
    if guidance is not None and not 0 <= guidance <= 30:
        raise RequestError(f"guidance must be between 0 and 30, got {guidance}")
    seed = _number(fields, "seed", int, None)
    if seed is None:
        seed = secrets.randbelow(2**31)
    if not 0 <= seed < 2**63:
        raise RequestError(f"seed must be between 0 and 2**63-1, got {seed}")
    fast_start = _flag(fields, "fast_start")
    preview = _flag(fields, "preview")
    if preview and not getattr(spec, "preview", False):
        raise RequestError("this server has no preview decoder: start it with `helios serve --decoder tiny` "
                           "(or tiny:PATH), or ask without preview")
    preset = fields.get("preset") or None
    if preset is not None and not isinstance(preset, str):
        raise RequestError(f"preset must be a name, got {preset!r}")
    negative = fields.get("negative") or ""
    if not isinstance(negative, str) or len(negative) > limits.max_prompt_chars:
        raise RequestError(f"the negative prompt must be text of at most {limits.max_prompt_chars} characters")
    try:
        settings = spec.resolve_settings(preset, steps=steps, guidance_scale=guidance,
                                         amplify_first_chunk=False if fast_start else None)
        spec.check_size(height, width, settings)
        plan = plan_frames(frames)
    except (InputError, ValueError) as e:
        raise RequestError(str(e)) from None
    return JobRequest(prompt=prompt, frames=frames, height=height, width=width, chunks=plan.chunks,
                      frames_out=plan.frames, preset=preset, steps=steps, guidance=guidance, fast_start=fast_start,
                      seed=seed, negative=negative, fps=fps, preview=preview)


def attach_upload(request: JobRequest, kind: str, data: bytes, filename: str, limits: Limits,
                  scratch: Path) -> JobRequest:
    """Decode an uploaded image (I2V) or video (V2V) at the video size. Blocking: call it in a thread."""
    if kind not in ("image", "video"):
        raise RequestError(f"an upload must be an image or a video, got {kind!r}")
    if not data:
        raise RequestError(f"the uploaded {kind} is empty")
    check_upload_size(len(data), limits, f"the uploaded {kind}")
    name = (filename or kind).replace("/", "_")[-80:]
    # A random name (uploads of different clients never meet on disk) with the client's extension,
    # cleaned, as a hint for the decoders.
    suffix = "".join(c for c in Path(name).suffix[1:9] if c.isascii() and c.isalnum())
    path = scratch / f"upload-{secrets.token_hex(8)}.{suffix or 'bin'}"
    path.write_bytes(data)
    try:
        if kind == "image":
            return replace(request, image=_read_image(path, name, request, limits))
        return replace(request, video=_read_video(path, name, request, limits))
    finally:
        path.unlink(missing_ok=True)


def attach_video_file(request: JobRequest, path: Path, name: str, limits: Limits) -> JobRequest:
    """Decode a video this server made (a caller's finished job) as the input of a video-to-video
    job, under the same checks as an uploaded one. Blocking: call it in a thread."""
    return replace(request, video=_read_video(path, name, request, limits, what="video"))


def _read_image(path: Path, name: str, request: JobRequest, limits: Limits) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    from helios.engine.video_io import read_image

    try:
        with Image.open(path) as im:  # reads the header only: refuse decompression bombs before decoding
            w, h = im.size
    except Image.DecompressionBombError:  # PIL's own ceiling, above ours: the header claims a huge image
        raise RequestError(f"the uploaded image {name!r} claims more pixels than PIL will open; images may have at "
                           f"most {limits.max_upload_pixels} pixels", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(f"the uploaded image {name!r} could not be read: send a PNG, JPEG or WebP file") \
            from None
    if w * h > limits.max_upload_pixels:
        raise RequestError(f"the uploaded image is {w}x{h}; images may have at most {limits.max_upload_pixels} "
                           "pixels", status=413)
    try:
        return read_image(path, size=(request.height, request.width))
    except (ValueError, OSError):
        raise RequestError(f"the uploaded image {name!r} could not be decoded: the file is damaged") from None


def _read_video(path: Path, name: str, request: JobRequest, limits: Limits, what: str = "uploaded video"
                ) -> torch.Tensor:
    import av

    from helios.engine.video_io import read_video

    try:  # the frame size from the container, before any frame is decoded at full size
        with av.open(str(path)) as container:
            ctx = container.streams.video[0].codec_context
            w, h = ctx.width, ctx.height
    except (av.error.FFmpegError, IndexError, UnicodeDecodeError, ValueError, OSError):
        raise RequestError(f"the {what} {name!r} could not be read: send an MP4, WebM or MKV file") \
            from None
    if w * h > limits.max_upload_pixels:
        raise RequestError(f"the {what} is {w}x{h}; videos may have at most {limits.max_upload_pixels} "
                           "pixels per frame", status=413)
    try:
        video = read_video(path, max_frames=limits.max_video_frames + 1, size=(request.height, request.width))
    except (ValueError, OSError, EOFError):
        raise RequestError(f"the {what} {name!r} could not be read: send an MP4, WebM or MKV file") \
            from None
    if video.shape[0] > limits.max_video_frames:
        raise RequestError(f"the {what} has more than {limits.max_video_frames} frames; trim it (the "
                           "model continues from its last few seconds)", status=413)
    if video.shape[0] < WINDOW:
        raise RequestError(f"the {what} has {video.shape[0]} frames; video-to-video needs at least "
                           f"{WINDOW}")
    return video
