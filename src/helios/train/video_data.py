"""Folder of mp4 files + captions -> one-time cache of VAE latents and text embeddings.

Stages 1-2 of the official recipe never run the VAE or the text encoder during training: the
latents and prompt embeddings are computed once and read back from disk. Here:

* :func:`read_captions` reads a CSV (columns ``path`` or ``video``, and ``caption``) or a JSONL
  file (same keys);
* :func:`decode_video` decodes ``num_frames`` frames with PyAV, centre-crops to the target aspect
  ratio and resizes (as the official loader) -> float ``(3, T, H, W)`` in [-1, 1];
* :func:`build_latent_cache` encodes every listed video with the injected ``encode_video_fn`` /
  ``encode_text_fn`` and writes one safetensors file per entry, atomically (temp file +
  ``os.replace``). It is resumable: entries whose file exists and opens are skipped. Missing,
  unreadable or too short videos are skipped and *reported*: ``out_dir/skipped.json`` lists every
  skipped file with the reason, and a summary line with the counts is printed;
* :class:`LatentCacheDataset` reads the cache back, optionally cutting (anchor, history,
  target) training samples from the stored sections (see :mod:`helios.train.history`).

Like the official preprocessing, a clip is encoded as independent sections of
``section_frames`` (33) RGB frames -> ``(S, C, 9, h, w)`` latents, so every section starts
with a single-frame latent exactly as chunks do at inference. ``section_frames=None`` encodes
the clip in one call (S = 1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from helios.engine.video_io import read_frames, video_fps
from helios.model_folder import CHUNK_FRAMES

from .history import HistoryLayout, choose_section, history_from_sections

__all__ = [
    "CaptionEntry",
    "VideoDecodeError",
    "read_captions",
    "decode_video",
    "entry_key",
    "CacheReport",
    "build_latent_cache",
    "LatentCacheDataset",
    "load_cache_entry",
    "collate_samples",
    "save_safetensors_atomic",
    "write_cache_entry",
    "is_valid_entry",
]

CACHE_FORMAT = "helios-latent-cache-v1"
REPORT_NAME = "skipped.json"


@dataclass(frozen=True)
class CaptionEntry:
    path: str  # as written in the captions file (relative to the folder, or absolute)
    caption: str
    line: int  # 1-based line/row number in the captions file (for reports)


class VideoDecodeError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# captions


def read_captions(captions_file: str | os.PathLike) -> list[CaptionEntry]:
    """CSV with a header containing ``path`` (or ``video``) and ``caption``, or JSONL with objects
    having those keys. Rows with a missing path are returned with ``path=""`` (reported later)."""
    captions_file = os.fspath(captions_file)
    entries: list[CaptionEntry] = []
    if captions_file.endswith((".jsonl", ".json")):
        with open(captions_file, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                path = rec.get("path", rec.get("video", ""))
                entries.append(CaptionEntry(str(path or ""), str(rec.get("caption", "") or ""), i))
        return entries
    with open(captions_file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        pcol = cols.get("path", cols.get("video"))
        ccol = cols.get("caption")
        if pcol is None or ccol is None:
            raise ValueError(f"{captions_file}: need columns path|video and caption, got {reader.fieldnames}")
        for i, row in enumerate(reader, 2):
            entries.append(CaptionEntry((row.get(pcol) or "").strip(), (row.get(ccol) or "").strip(), i))
    return entries


# --------------------------------------------------------------------------------------------
# decoding


def mp4_truncation(path: str | os.PathLike) -> str | None:
    """For an MP4/MOV file whose last top-level box runs past the end of the file (a copy cut off),
    what is wrong in words; None for an intact file or another format."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            head = f.read(16)
            length, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if offset == 0 and kind != b"ftyp":
                return None  # not an MP4 file
            if length == 1:  # a 64-bit size follows
                length = int.from_bytes(head[8:16], "big")
            elif length == 0:  # to the end of the file
                return None
            if length < 8:
                return (f"truncated or damaged: a broken MP4 box at byte {offset} of {size}; copy it again or "
                        "re-encode it")
            if offset + length > size:
                name = kind.decode("latin-1")
                return (f"truncated: the file ends inside its MP4 box {name!r} ({size} bytes, the box needs "
                        f"{offset + length}); copy it again or re-encode it")
            offset += length
    return None


def decode_video(
    path: str | os.PathLike,
    num_frames: int,
    size: tuple[int, int] | None = None,
    start_frame: int = 0,
    stride: int = 1,
) -> torch.Tensor:
    """Decode frames ``start_frame + k * stride`` (k < num_frames) with :func:`helios.engine.video_io.read_frames`.

    Returns float32 ``(3, num_frames, H, W)`` in [-1, 1]; ``size=(H, W)`` centre-crops to that
    aspect ratio and resizes (as the official loader). Raises :class:`VideoDecodeError` when the
    file cannot be opened or decoded, has no video stream, or is too short."""
    try:
        frames = read_frames(path, num_frames, start_frame, stride, size)
    except (OSError, ValueError) as e:  # missing, unreadable, no video stream, too short
        # A copy cut off mid-file decodes its first frames and then ends: say so rather than "too short".
        truncated = mp4_truncation(path) if os.path.isfile(path) else None
        raise VideoDecodeError(truncated or str(e)) from e
    x = frames.float() / 127.5 - 1.0  # (T, H, W, 3)
    return x.permute(3, 0, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# cache


def entry_key(path: str, caption: str, num_frames: int, size: Sequence[int] | None, section_frames: int | None) -> str:
    """File stem of a cache entry: sanitised path + hash of everything that defines its content."""
    h = hashlib.sha1(
        json.dumps([path, caption, int(num_frames), list(size) if size else None, section_frames]).encode()
    ).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(path)[0]).strip("._")[-80:] or "video"
    return f"{stem}-{h}"


@dataclass
class CacheReport:
    built: list[str] = field(default_factory=list)
    already_cached: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"path", "line", "reason"}
    report_path: str = ""

    def summary(self) -> str:
        return (
            f"latent cache: {len(self.built)} built, {len(self.already_cached)} already cached, "
            f"{len(self.skipped)} skipped" + (f" (see {self.report_path})" if self.skipped else "")
        )


def _as_embeds(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, dict):
        emb, mask = out.get("prompt_embeds", out.get("embeds")), out.get("attention_mask")
    elif isinstance(out, (tuple, list)):
        emb, mask = out[0], (out[1] if len(out) > 1 else None)
    else:
        emb, mask = out, None
    if emb.ndim == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if mask is not None and mask.ndim == 2 and mask.shape[0] == 1:
        mask = mask[0]
    return emb, mask


def _encode_sections(video: torch.Tensor, encode_video_fn, section_frames: int | None) -> torch.Tensor:
    """video ``(3, T, H, W)`` -> latents ``(S, C, t, h, w)``."""
    T = video.shape[1]
    chunks = [video] if not section_frames else [video[:, s : s + section_frames] for s in range(0, T, section_frames)]
    lat = []
    for c in chunks:
        z = encode_video_fn(c.unsqueeze(0))
        if z.ndim == 5:
            if z.shape[0] != 1:
                raise ValueError("encode_video_fn must return one latent for a batch of one video")
            z = z[0]
        lat.append(z)
    return torch.stack(lat)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    """Write a safetensors file via a temporary file + ``os.replace``: a crash leaves the old file or none."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=d)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_cache_entry(path: str, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, caption: str, source: str, num_frames: int,
                      size: Sequence[int], section_frames: int | None, start_frame: int = 0, stride: int = 1,
                      fps: str = "") -> None:
    """One cache entry (``latents (S, C, t, h, w)`` + the caption's embeddings), written atomically."""
    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
    if attention_mask is not None:
        tensors["prompt_attention_mask"] = attention_mask
    meta = {
        "format": CACHE_FORMAT,
        "caption": caption,
        "source": source,
        "num_frames": str(num_frames),
        "height": str(size[0]),
        "width": str(size[1]),
        "section_frames": str(section_frames or 0),
        "start_frame": str(start_frame),
        "stride": str(stride),
        "fps": fps,
    }
    save_safetensors_atomic(tensors, meta, path)


def is_valid_entry(path: str, fmt: str = CACHE_FORMAT, key: str = "latents") -> bool:
    """A finished entry: it opens, has the format tag ``fmt`` and holds ``key``."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            return meta.get("format") == fmt and key in f.keys()
    except Exception:
        return False


def build_latent_cache(
    folder: str | os.PathLike,
    captions_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    encode_video_fn: Callable[[torch.Tensor], torch.Tensor],
    encode_text_fn: Callable[[str], Any],
    num_frames: int,
    size: tuple[int, int] | None,
    *,
    section_frames: int | None = CHUNK_FRAMES,
    start_frame: int = 0,
    stride: int = 1,
    latent_dtype: torch.dtype = torch.float32,
    embed_dtype: torch.dtype = torch.bfloat16,
    verbose: bool = True,
) -> CacheReport:
    """Encode every video of ``captions_file`` once into ``out_dir``.

    ``encode_video_fn(video)`` gets float ``(1, 3, T, H, W)`` in [-1, 1] (``T = section_frames``
    per call, or ``num_frames`` when ``section_frames`` is None) and must return the normalised
    latent ``(1, C, t, h, w)`` (``(z - latents_mean) / latents_std`` for the Wan VAE).
    ``encode_text_fn(caption)`` returns the embeddings ``(L, D)`` / ``(1, L, D)``, or a tuple
    ``(embeds, attention_mask)``, or a dict with ``prompt_embeds`` [and ``attention_mask``].

    Each entry ``<key>.safetensors`` holds ``latents (S, C, t, h, w)``, ``prompt_embeds (L, D)``
    [, ``prompt_attention_mask``] and string metadata (caption, source path, frames, size, fps).
    Exceptions from the encoders propagate; only video problems are skipped. The skip report
    ``out_dir/skipped.json`` is rewritten on every run (it lists this run's skips).
    """
    folder, out_dir = os.fspath(folder), os.fspath(out_dir)
    if section_frames and num_frames % section_frames:
        raise ValueError(f"num_frames={num_frames} is not a multiple of section_frames={section_frames}")
    os.makedirs(out_dir, exist_ok=True)
    report = CacheReport(report_path=os.path.join(out_dir, REPORT_NAME))
    seen: set[str] = set()
    # recent captions only: a dataset of unique captions would otherwise keep every embedding in memory
    text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
    for e in read_captions(captions_file):
        if not e.path:
            report.skipped.append({"path": "", "line": e.line, "reason": "no path in captions file"})
            continue
        if not e.caption:
            report.skipped.append({"path": e.path, "line": e.line, "reason": "empty caption"})
            continue
        key = entry_key(e.path, e.caption, num_frames, size, section_frames)
        if key in seen:
            report.skipped.append({"path": e.path, "line": e.line, "reason": "duplicate of an earlier row"})
            continue
        seen.add(key)
        out_path = os.path.join(out_dir, key + ".safetensors")
        if os.path.exists(out_path) and is_valid_entry(out_path):
            report.already_cached.append(key)
            continue
        src = e.path if os.path.isabs(e.path) else os.path.join(folder, e.path)
        if not os.path.isfile(src):
            report.skipped.append({"path": e.path, "line": e.line, "reason": "missing file"})
            continue
        try:
            video = decode_video(src, num_frames, size, start_frame=start_frame, stride=stride)
        except VideoDecodeError as err:
            report.skipped.append({"path": e.path, "line": e.line, "reason": f"unreadable: {err}"})
            continue
        fps = ""
        try:
            fps = str(video_fps(src))
        except (OSError, ValueError):
            pass
        with torch.no_grad():
            latents = _encode_sections(video, encode_video_fn, section_frames).to(latent_dtype).cpu()
            if e.caption not in text_cache:
                emb, mask = _as_embeds(encode_text_fn(e.caption))
                text_cache[e.caption] = (emb.to(embed_dtype).cpu(), None if mask is None else mask.cpu())
                if len(text_cache) > 64:
                    text_cache.popitem(last=False)
            text_cache.move_to_end(e.caption)
            emb, mask = text_cache[e.caption]
        write_cache_entry(out_path, latents, emb, mask, caption=e.caption, source=e.path, num_frames=num_frames,
                          size=(video.shape[2], video.shape[3]), section_frames=section_frames,
                          start_frame=start_frame, stride=stride, fps=fps)
        report.built.append(key)
    with open(report.report_path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "captions_file": os.fspath(captions_file),
                "built": len(report.built),
                "already_cached": len(report.already_cached),
                "skipped_count": len(report.skipped),
                "skipped": report.skipped,
            },
            f,
            indent=2,
        )
    if verbose:
        print(report.summary())
        for s in report.skipped:
            print(f"  skipped {s['path'] or '<row ' + str(s['line']) + '>'}: {s['reason']}")
    return report


# --------------------------------------------------------------------------------------------
# reading back


def load_cache_entry(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(os.fspath(path), framework="pt") as f:
        out: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}
        out["metadata"] = dict(f.metadata() or {})
    out["caption"] = out["metadata"].get("caption", "")
    return out


class LatentCacheDataset(Dataset):
    """Entries of a latent cache (sorted by file name).

    ``layout=None``: items are ``{"latents" (S,C,t,h,w), "prompt_embeds", "caption", "metadata",
    "key"}``. With a :class:`HistoryLayout`, each item is a stage-1 training sample:
    the target section is chosen uniformly per ``(seed, epoch, index)`` and the item also has
    ``"anchor" (C,1,h,w)``, ``"history" (C,19,h,w)``, ``"target" (C,t,h,w)``,
    ``"section_index"`` (latents dropped to keep items small unless ``keep_latents``).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        layout: HistoryLayout | None = None,
        seed: int = 0,
        dtype: torch.dtype | None = torch.float32,
        keep_latents: bool = False,
    ):
        self.cache_dir = os.fspath(cache_dir)
        self.files = sorted(
            os.path.join(self.cache_dir, n)
            for n in os.listdir(self.cache_dir)
            if n.endswith(".safetensors") and not n.startswith(".tmp-")
        )
        self.layout = layout
        self.seed = seed
        self.dtype = dtype
        self.keep_latents = keep_latents
        self.epoch = 0
        self._loaded: list[dict[str, Any]] | None = None

    def preload(self) -> "LatentCacheDataset":
        """Read every entry into memory once: a small-model step then costs no file reads (thousands
        of short entries, a few MB each at most). Call after the file list is final."""
        loaded = []
        for f in self.files:
            try:
                loaded.append(load_cache_entry(f))
            except Exception as e:
                raise ValueError(f"cache entry {f} is unreadable: {type(e).__name__}: {e}") from e
        self._loaded = loaded
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self._loaded[index]) if self._loaded is not None else load_cache_entry(self.files[index])
        item["key"] = os.path.basename(self.files[index])[: -len(".safetensors")]
        if self.dtype is not None:
            item["latents"] = item["latents"].to(self.dtype)
        if self.layout is not None:
            lat = item["latents"]
            s = choose_section(lat.shape[0], self.seed, self.epoch, index)
            anchor, history, target = history_from_sections(lat, s, self.layout)
            item.update(anchor=anchor, history=history, target=target, section_index=s)
            if not self.keep_latents:
                del item["latents"]
        return item


def collate_samples(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for the dict items of this package: tensors of equal shape are
    stacked, everything else (captions, metadata, ragged tensors) is returned as a list."""
    out: dict[str, Any] = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if all(torch.is_tensor(v) for v in vals) and len({tuple(v.shape) for v in vals}) == 1:
            out[k] = torch.stack(vals)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out
