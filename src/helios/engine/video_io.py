"""Video and image I/O with PyAV: a crash-tolerant chunked MP4 writer and simple readers.

VideoWriter encodes every chunk as it arrives (memory stays flat for any length) into a
fragmented MP4 under a temporary name, and renames it to the final path only on a clean close.
Each write() starts a new keyframe, so each chunk becomes its own MP4 fragment:

* exception / KeyboardInterrupt inside the `with`: the encoder is drained and the file closed
  cleanly, so the partial video holds every frame written; it is kept as `NAME.partial.mp4`.
* the process is killed: `.NAME.partial.mp4` stays behind and is playable up to the last
  completed fragment (the muxer holds the newest chunk until the next one starts, so at most
  the most recent chunk is lost).

The final path is never touched unless the whole video was written.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Iterator, NamedTuple

import av
import numpy as np
import torch

from helios.model_folder import CHUNK_FRAMES

log = logging.getLogger(__name__)

# Tried in order after the requested codec. mpeg4 ships with every FFmpeg build.
FALLBACK_CODECS = ("libx264", "libopenh264", "mpeg4")
# A write() shorter than this does not force a new keyframe (writing frame-by-frame would
# otherwise make every frame an I-frame).
MIN_FRAGMENT_FRAMES = 8
# libx264 keyframe interval when a single write() is very long.
MAX_GOP = 250


# -----------------------------------------------------------------------------
# frames in, frames out


def _to_uint8_frames(frames, what: str = "frames") -> np.ndarray:
    """Validate and convert (T,H,W,3) or (H,W,3) uint8 array/tensor to a contiguous numpy array."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise TypeError(
                f"{what} must be uint8 in 0..255, got torch.{str(frames.dtype).split('.')[-1]}. "
                "Convert with (x.clamp(0, 1) * 255).round().to(torch.uint8)."
            )
        frames = frames.detach().cpu().numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise TypeError(
                f"{what} must be uint8 in 0..255, got numpy {frames.dtype}. "
                "Convert with (np.clip(x, 0, 1) * 255).round().astype(np.uint8)."
            )
    else:
        raise TypeError(f"{what} must be a numpy array or torch tensor, got {type(frames).__name__}.")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        hint = ""
        if frames.ndim == 4 and frames.shape[1] == 3:
            hint = " It looks channels-first (T,3,H,W): use x.permute(0, 2, 3, 1)."
        raise ValueError(f"{what} must have shape (T,H,W,3) RGB channels-last, got {tuple(frames.shape)}.{hint}")
    if 0 in frames.shape:
        raise ValueError(f"{what} is empty: shape {tuple(frames.shape)}.")
    return np.ascontiguousarray(frames)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: replicate the last row/column if odd."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


# -----------------------------------------------------------------------------
# writer


def partial_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(in-progress name, kept-on-failure name) for a final video path: .NAME.partial.mp4, NAME.partial.mp4."""
    p = Path(path)
    return p.with_name(f".{p.stem}.partial{p.suffix}"), p.with_name(f"{p.stem}.partial{p.suffix}")


def _open_codec(container, codec: str, fps: Fraction):
    """Add a video stream with `codec`, falling back through FALLBACK_CODECS."""
    tried = []
    for name in dict.fromkeys((codec, *FALLBACK_CODECS)):
        try:
            stream = container.add_stream(name, rate=fps)
        except (av.error.FFmpegError, ValueError) as e:  # unknown or unavailable encoder
            tried.append(f"{name} ({e})")
            continue
        if name != codec:
            log.warning("codec %s is not available in this PyAV build; using %s", codec, stream.codec_context.name)
        return stream
    raise RuntimeError(f"No usable video encoder in this PyAV build; tried: {', '.join(tried)}.")


def _encoder_options(codec_name: str, crf: int) -> dict[str, str]:
    if codec_name == "libx264":
        # zerolatency: no B-frames/lookahead, so every frame is muxed as soon as it is encoded;
        # scenecut=0: keyframes (= fragment boundaries) only where we force them.
        return {"crf": str(crf), "preset": "medium", "tune": "zerolatency", "x264-params": "scenecut=0"}
    if codec_name == "libopenh264":
        return {}
    # mpeg4 and others: rough crf -> qscale mapping (crf 18 ~ q 4); no scene-cut keyframes, as above.
    return {"qscale": str(int(np.clip(round(1 + crf / 6), 2, 31))), "sc_threshold": "1000000000"}


class VideoWriter:
    """Chunked, crash-tolerant MP4 writer.

        with VideoWriter("out.mp4", fps=24) as w:
            for chunk in chunks:          # uint8 (T,H,W,3)
                w.write(chunk)
        # out.mp4 exists only now; w.frames_written frames

    crf: libx264 quality, 0 (lossless) .. 51, lower is better (approximated for other codecs).
    Odd frame sizes are padded by one replicated row/column (yuv420p needs even sizes).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction = 24,
        crf: int = 18,
        codec: str = "libx264",
        overwrite: bool = True,
    ):
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"VideoWriter writes fragmented MP4; give a path ending in .mp4, got {self.path}.")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"Output folder {self.path.parent} does not exist; create it first.")
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass overwrite=True or choose another name.")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51 (lower is better quality), got {crf}.")
        self.fps = Fraction(fps).limit_denominator(1001)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}.")
        self.crf, self.codec, self.overwrite = crf, codec, overwrite
        self.tmp_path, self.kept_path = partial_paths(self.path)
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (H, W) as given by the caller
        self._container = None
        self._stream = None
        self._last_key = -MIN_FRAGMENT_FRAMES
        self._closed = False

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.close()
        else:
            self.abort(exc)
        return False  # never swallow the exception

    def _open(self, h: int, w: int) -> None:
        self._container = av.open(
            str(self.tmp_path),
            "w",
            format="mp4",
            # empty_moov + fragments: the file is decodable without a trailer; flush_packets
            # pushes each fragment to the OS as soon as the muxer emits it.
            options={"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"},
        )
        self._stream = _open_codec(self._container, self.codec, self.fps)
        cc = self._stream.codec_context
        self._stream.width, self._stream.height = w + w % 2, h + h % 2
        self._stream.pix_fmt = "yuv420p"
        cc.gop_size = MAX_GOP
        self._stream.options = _encoder_options(cc.name, self.crf)

    def write(self, frames) -> int:
        """Encode a uint8 (T,H,W,3) chunk (array or tensor) now; returns the total frames written."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path} is closed; open a new one to write more.")
        frames = _to_uint8_frames(frames)
        t, h, w, _ = frames.shape
        if self.size is None:
            self.size = (h, w)
            if h % 2 or w % 2:
                log.warning("frame size %dx%d is odd; padding to %dx%d for yuv420p", w, h, w + w % 2, h + h % 2)
            self._open(h, w)
        elif (h, w) != self.size:
            raise ValueError(
                f"all chunks must have the same size: first was HxW={self.size}, this one is {(h, w)}. "
                "Resize before writing."
            )
        frames = _pad_to_even(frames)
        new_fragment = self.frames_written - self._last_key >= MIN_FRAGMENT_FRAMES
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = self.frames_written
            if i == 0 and new_fragment:
                # A keyframe closes the previous fragment, so the file on disk ends on a chunk boundary.
                frame.pict_type = av.video.frame.PictureType.I
                self._last_key = self.frames_written
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1
        return self.frames_written

    def _finish_container(self) -> None:
        """Drain the encoder and write the trailer; the file at tmp_path is then complete."""
        if self._container is None:
            return
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
            self._container = None
        with open(self.tmp_path, "rb+") as f:  # make the bytes durable before the rename
            os.fsync(f.fileno())

    def close(self) -> Path:
        """Finish the file and atomically move it to the final path. Returns the final path."""
        if self._closed:
            return self.path
        self._closed = True
        if self.frames_written == 0:
            raise ValueError(f"No frames were written to {self.path}; nothing to save.")
        self._finish_container()
        os.replace(self.tmp_path, self.path)
        log.info("wrote %d frames (%.1f s at %s fps) to %s", self.frames_written,
                 self.frames_written / self.fps, self.fps, self.path)
        return self.path

    def abort(self, exc: BaseException | None = None) -> Path | None:
        """Finish what was written as NAME.partial.mp4 (never the final path). Returns it, or None if empty."""
        if self._closed:
            return None
        self._closed = True
        if self.frames_written == 0:  # nothing worth keeping
            if self._container is not None:
                try:
                    self._container.close()
                except Exception:  # a header-only file is being discarded anyway
                    pass
                self._container = None
                self.tmp_path.unlink(missing_ok=True)
            return None
        try:
            self._finish_container()
        except Exception as e:  # the fragments already on disk are still playable
            log.warning("could not finalise %s cleanly (%s); earlier fragments remain playable", self.tmp_path, e)
        os.replace(self.tmp_path, self.kept_path)
        msg = (f"video interrupted: kept {self.frames_written} frames written so far in {self.kept_path} "
               f"(playable); {self.path} was not written")
        log.warning(msg)
        if exc is not None and hasattr(exc, "add_note"):
            exc.add_note(msg)
        return self.kept_path

    def discard(self) -> None:
        """Stop and delete what was written (a cancelled video nobody will see); the final path is untouched."""
        if self._closed:
            return
        self._closed = True
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # the file is deleted anyway
                pass
            self._container = None
        self.tmp_path.unlink(missing_ok=True)


def write_video(path: str | os.PathLike, frames, fps: float = 24, crf: int = 18) -> Path:
    """Write a whole uint8 (T,H,W,3) video at once (chunked internally). Returns the path."""
    frames = _to_uint8_frames(frames)
    with VideoWriter(path, fps=fps, crf=crf) as w:
        for i in range(0, len(frames), CHUNK_FRAMES):
            w.write(frames[i : i + CHUNK_FRAMES])
    return Path(path)


# -----------------------------------------------------------------------------
# readers


class VideoInfo(NamedTuple):
    frames: int
    fps: float
    width: int
    height: int


def _check_file(path: str | os.PathLike, kind: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{kind} file not found: {p}. Check the path (cwd is {Path.cwd()}).")
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a folder; expected a {kind.lower()} file.")
    return p


def _open_video(p: Path):
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{p} is not a readable video ({e}). Expected a video file such as .mp4/.webm/.mkv; "
            "if it is one, it may be truncated or corrupt (re-encode or regenerate it)."
        ) from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"{p} has no video stream (audio-only or not a video); pass a video file.")
    return container


def _parse_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def iter_video(
    path: str | os.PathLike, chunk_frames: int = CHUNK_FRAMES, size: int | tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> Iterator[torch.Tensor]:
    """Decode a video lazily as uint8 (t,H,W,3) chunks of up to chunk_frames; size=(H, W) resizes.

    Missing/unreadable files raise here, not at the first next(). A truncated file (e.g. a killed
    writer's partial) yields the frames before the damage, with a warning.
    """
    p = _check_file(path, "Video")
    container = _open_video(p)
    return _decode_chunks(p, container, chunk_frames, _parse_size(size), max_frames)


def _decode_chunks(p: Path, container, chunk_frames: int, hw, max_frames) -> Iterator[torch.Tensor]:
    buf: list[np.ndarray] = []
    n = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        kw = {"width": hw[1], "height": hw[0]} if hw else {}
        while max_frames is None or n < max_frames:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except (av.error.FFmpegError, EOFError) as e:
                if n == 0:
                    raise ValueError(f"{p} could not be decoded ({e}); the file is corrupt or not a video.") from e
                log.warning("%s: decoding stopped after %d frames (%s); the file looks truncated", p, n, e)
                break
            buf.append(frame.to_ndarray(format="rgb24", **kw))
            n += 1
            if len(buf) == chunk_frames:
                yield torch.from_numpy(np.stack(buf))
                buf = []
    finally:
        container.close()
    if buf:
        yield torch.from_numpy(np.stack(buf))
    if n == 0:
        raise ValueError(f"{p} contains zero decodable video frames; regenerate or re-encode it.")


def read_video(
    path: str | os.PathLike, max_frames: int | None = None, size: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """Decode a video to a uint8 tensor (T,H,W,3). size=(H, W) (or an int for square) resizes."""
    return torch.cat(list(iter_video(path, chunk_frames=256, size=size, max_frames=max_frames)))


def _crop_box(h: int, w: int, H: int, W: int) -> tuple[int, int, int, int]:
    """Centre crop of an ``h x w`` frame to the ``H / W`` aspect ratio: ``(top, left, nh, nw)``."""
    if h / w >= H / W:
        nh = int(w * H / W)
        return (h - nh) // 2, 0, nh, w
    nw = int(h * W / H)
    return 0, (w - nw) // 2, h, nw


def _frame_to_array(frame, size: tuple[int, int] | None):
    """PyAV frame -> uint8 ``(H, W, 3)``: centre crop to the target aspect + area/bilinear resize
    (done by libswscale on the whole frame, then cropped, which is much faster than resizing
    float tensors)."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    H, W = size
    h, w = frame.height, frame.width
    top, left, nh, nw = _crop_box(h, w, H, W)
    sy, sx = H / nh, W / nw
    sh, sw = max(H, int(round(h * sy))), max(W, int(round(w * sx)))
    interp = "AREA" if sh < h else "BILINEAR"
    arr = frame.reformat(width=sw, height=sh, format="rgb24", interpolation=interp).to_ndarray()
    y0 = min(int(round(top * sy)), sh - H)
    x0 = min(int(round(left * sx)), sw - W)
    return arr[y0 : y0 + H, x0 : x0 + W]


def read_frames(path: str | os.PathLike, num_frames: int, start_frame: int = 0, stride: int = 1,
                size: tuple[int, int] | None = None) -> torch.Tensor:
    """Frames ``start_frame + k * stride`` (k < num_frames) as uint8 (num_frames, H, W, 3).

    size=(H, W) centre-crops each frame to that aspect ratio, then resizes (training's clips). Raises
    ValueError when the file is not a readable video or holds fewer frames than asked."""
    p = _check_file(path, "Video")
    size = (int(size[0]), int(size[1])) if size is not None else None
    wanted = start_frame + (num_frames - 1) * stride
    frames = []
    container = _open_video(p)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i > wanted:
                break
            if i >= start_frame and (i - start_frame) % stride == 0:
                frames.append(torch.from_numpy(_frame_to_array(frame, size)))
    except (av.error.FFmpegError, EOFError) as e:
        raise ValueError(f"{p} could not be decoded: {type(e).__name__}: {e}") from e
    finally:
        container.close()
    if len(frames) < num_frames:
        raise ValueError(f"{p} is too short: {len(frames)} of {num_frames} frames decoded")
    return torch.stack(frames[:num_frames])


def video_fps(path: str | os.PathLike) -> float:
    """Frame rate from the container (no decoding)."""
    container = _open_video(_check_file(path, "Video"))
    try:
        s = container.streams.video[0]
        rate = s.average_rate or s.guessed_rate or s.base_rate
        return float(rate) if rate else 0.0
    finally:
        container.close()


def video_info(path: str | os.PathLike) -> VideoInfo:
    """(frames, fps, width, height); frames is counted by decoding, so it is exact even for fragmented MP4."""
    p = _check_file(path, "Video")
    container = _open_video(p)
    try:
        s = container.streams.video[0]
        s.thread_type = "AUTO"
        width, height = s.codec_context.width, s.codec_context.height
        n = 0
        try:
            for _ in container.decode(s):
                n += 1
        except (av.error.FFmpegError, EOFError) as e:
            if n == 0:
                raise ValueError(f"{p} could not be decoded ({e}); the file is corrupt or not a video.") from e
            log.warning("%s: decoding stopped after %d frames (%s); the file looks truncated", p, n, e)
        rate = s.average_rate or s.guessed_rate or s.base_rate
    finally:
        container.close()
    if n == 0:
        raise ValueError(f"{p} contains zero decodable video frames; regenerate or re-encode it.")
    return VideoInfo(frames=n, fps=float(rate) if rate else 0.0, width=width, height=height)


def read_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Load an image as a uint8 RGB tensor (H,W,3); size=(H, W) (or an int for square) resizes."""
    from PIL import Image, UnidentifiedImageError

    p = _check_file(path, "Image")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            hw = _parse_size(size)
            if hw:
                im = im.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{p} is not a readable image ({e}). Expected PNG/JPEG/WebP/...; check the file.") from e
    return torch.from_numpy(arr)
