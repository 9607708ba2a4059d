"""Procedural long videos with captions: coloured circles / squares / triangles bouncing on a solid background.

Every video is a pure function of ``(cfg.seed, index)``: the scene (background, objects, sizes,
start positions, velocities) is drawn once from a numpy ``SeedSequence([seed, index])`` and the
motion is analytic (elastic bounces off the walls = a triangle wave of the unfolded
coordinate), so any frame of an arbitrarily long video (minutes, hours) is rendered directly,
without simulating the frames before it. Rendering is vectorised over frames and pixels.

The caption comes from the shared colour/shape vocabulary in :mod:`helios.scenes`::

    "two red circles and a green square bouncing on a blue background"      (grammar "classic")
    "on a blue background, two red circles and a green triangle drifting"  (grammar "wide")

The classic grammar (the default, the bundled model's data) draws circles and squares and words every
caption one way. The wide one draws triangles too, and words each caption in one of the forms of
:data:`helios.scenes.WIDE_FORMS`, chosen from a stream of its own: the scene of an index is the same
under both grammars as long as the shapes are.

Objects of a caption group share colour and shape; different groups have different colours,
and no object has the background colour. Objects may overlap while moving (the later object is
drawn on top); at frame 0 they do not overlap.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from helios.engine.video_io import write_video
from helios.model_folder import CHUNK_FRAMES
from helios.scenes import (CLASSIC_FORM, COLORS, WIDE_FORMS, CaptionForm, ObjectSpec, Scene, check_grammar,
                           describe_scene, grammar_shapes, shape_coverage)

from .video_data import collate_samples

__all__ = [
    "SyntheticConfig",
    "ObjectTrack",
    "SyntheticVideo",
    "SyntheticVideoDataset",
    "to_model_tensor",
    "from_model_tensor",
    "write_video",
    "export_synthetic_videos",
    "collate_samples",
]


@dataclass(frozen=True)
class SyntheticConfig:
    height: int = 64
    width: int = 64
    num_frames: int = 24 * 60  # length of every long video (frames); frames beyond it also render
    fps: int = 24
    min_objects: int = 1
    max_objects: int = 3
    max_groups: int = 2  # distinct (colour, shape) groups per video
    shapes: tuple[str, ...] | None = None  # None: the grammar's (classic: circle, square; wide: + triangle)
    colors: tuple[str, ...] | None = None  # None: every palette colour
    size_range: tuple[float, float] = (0.07, 0.14)  # radius / half side as a fraction of min(H, W)
    speed_range: tuple[float, float] = (0.004, 0.02)  # pixels per frame as a fraction of min(H, W)
    seed: int = 0
    grammar: str = "classic"  # caption wording: "classic" (one form) or "wide" (helios.scenes.WIDE_FORMS)

    def __post_init__(self):
        check_grammar(self.grammar)
        if self.shapes is not None:
            for shape in self.shapes:
                shape_coverage(shape, np.zeros(1), np.zeros(1), 1.0)  # a clear error for an unknown shape

    def shape_names(self) -> tuple[str, ...]:
        return tuple(self.shapes) if self.shapes else grammar_shapes(self.grammar)

    def palette(self) -> tuple[str, ...]:
        names = tuple(self.colors) if self.colors else tuple(COLORS)
        unknown = [c for c in names if c not in COLORS]
        if unknown:
            raise ValueError(f"colours not in the palette: {unknown}")
        return names

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SyntheticConfig":
        d = dict(d or {})
        for k in ("shapes", "colors", "size_range", "speed_range"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class ObjectTrack:
    shape: str
    color: str
    radius: int  # circle radius / square half side / triangle half base and half height, pixels
    x0: float  # centre at frame 0 (pixel coordinates, pixel centres at integers)
    y0: float
    vx: float  # pixels per frame
    vy: float

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLORS[self.color]


def _bounce(p0: float, v: float, lo: float, hi: float, t: np.ndarray) -> np.ndarray:
    """Position of a point bouncing elastically in [lo, hi]: triangle wave of p0 + v t."""
    L = hi - lo
    if L <= 0:
        return np.full(t.shape, lo, dtype=np.float64)
    u = np.mod(p0 - lo + v * t.astype(np.float64), 2 * L)
    return lo + L - np.abs(u - L)


@dataclass
class SyntheticVideo:
    index: int
    cfg: SyntheticConfig
    background: str
    objects: list[ObjectTrack] = field(default_factory=list)
    form: CaptionForm = CLASSIC_FORM

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_index(cls, index: int, cfg: SyntheticConfig = SyntheticConfig()) -> "SyntheticVideo":
        if index < 0:
            raise IndexError("index must be >= 0")
        H, W = cfg.height, cfg.width
        rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed) & 0xFFFFFFFF, int(index)]))
        names = cfg.palette()
        background = str(rng.choice(names))
        obj_colors = [c for c in names if c != background]
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        n_groups = int(rng.integers(1, min(cfg.max_groups, n, len(obj_colors)) + 1))
        # split n objects into n_groups non-empty groups
        cuts = sorted(rng.choice(np.arange(1, n), size=n_groups - 1, replace=False).tolist()) if n_groups > 1 else []
        sizes = np.diff([0, *cuts, n]).tolist()
        colors = rng.choice(obj_colors, size=n_groups, replace=False).tolist()
        shapes = [str(rng.choice(cfg.shape_names())) for _ in range(n_groups)]
        m = min(H, W)
        objects: list[ObjectTrack] = []
        for g in range(n_groups):
            for _ in range(sizes[g]):
                r = int(round(rng.uniform(*cfg.size_range) * m))
                r = max(1, min(r, (m - 1) // 2))
                speed = rng.uniform(*cfg.speed_range) * m
                ang = rng.uniform(0, 2 * math.pi)
                x = y = 0.0
                for _try in range(200):  # no overlap at frame 0 when possible
                    x = rng.uniform(r, W - 1 - r)
                    y = rng.uniform(r, H - 1 - r)
                    if all(
                        math.hypot(x - o.x0, y - o.y0) > math.sqrt(2) * (r + o.radius) + 1 for o in objects
                    ):
                        break
                objects.append(
                    ObjectTrack(str(shapes[g]), str(colors[g]), r, x, y, speed * math.cos(ang), speed * math.sin(ang))
                )
        return cls(index=index, cfg=cfg, background=background, objects=objects, form=caption_form(index, cfg))

    # ---------------------------------------------------------------- text / metadata
    @property
    def groups(self) -> list[tuple[int, str, str]]:
        out: dict[tuple[str, str], int] = {}
        for o in self.objects:
            out[(o.color, o.shape)] = out.get((o.color, o.shape), 0) + 1
        return [(c, col, sh) for (col, sh), c in out.items()]

    @property
    def scene(self) -> Scene:
        objects = [ObjectSpec(count=c, color=col, shape=sh) for c, col, sh in self.groups]
        return Scene(objects=objects, background=self.background)

    @property
    def caption(self) -> str:
        return describe_scene(self.scene, form=self.form)

    @property
    def num_frames(self) -> int:
        return self.cfg.num_frames

    @property
    def metadata(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.cfg.seed,
            "height": self.cfg.height,
            "width": self.cfg.width,
            "fps": self.cfg.fps,
            "num_frames": self.cfg.num_frames,
            "background": self.background,
            "background_rgb": COLORS[self.background],
            "count": len(self.objects),
            "colors": sorted({o.color for o in self.objects}),
            "groups": [{"count": c, "color": col, "shape": sh} for c, col, sh in self.groups],
            "objects": [dict(asdict(o), rgb=o.rgb) for o in self.objects],
        }

    # ---------------------------------------------------------------- geometry
    def centers(self, frame_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Object centres ``(T, N, 2)`` as ``(x, y)`` at the given frame indices."""
        t = np.asarray(frame_indices, dtype=np.int64)
        H, W = self.cfg.height, self.cfg.width
        out = np.empty((t.shape[0], len(self.objects), 2), dtype=np.float64)
        for i, o in enumerate(self.objects):
            out[:, i, 0] = _bounce(o.x0, o.vx, o.radius, W - 1 - o.radius, t)
            out[:, i, 1] = _bounce(o.y0, o.vy, o.radius, H - 1 - o.radius, t)
        return out

    def object_masks(self, frame_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Per-object coverage ``(T, N, H, W)`` bool, before occlusion."""
        c = self.centers(frame_indices)
        H, W = self.cfg.height, self.cfg.width
        xs = np.arange(W, dtype=np.float64)[None, None, :]
        ys = np.arange(H, dtype=np.float64)[None, :, None]
        masks = np.zeros((c.shape[0], len(self.objects), H, W), dtype=bool)
        for i, o in enumerate(self.objects):
            dx = xs - c[:, i, 0][:, None, None]  # (T, 1, W)
            dy = ys - c[:, i, 1][:, None, None]  # (T, H, 1)
            masks[:, i] = shape_coverage(o.shape, dx, dy, o.radius)
        return masks

    # ---------------------------------------------------------------- rendering
    def frames(self, start: int = 0, num: int | None = None, stride: int = 1) -> np.ndarray:
        """uint8 frames ``(T, H, W, 3)`` for frame indices ``start, start+stride, ...``."""
        if num is None:
            num = max(0, (self.cfg.num_frames - start + stride - 1) // stride)
        t = start + stride * np.arange(num, dtype=np.int64)
        H, W = self.cfg.height, self.cfg.width
        out = np.empty((num, H, W, 3), dtype=np.uint8)
        out[...] = np.asarray(COLORS[self.background], dtype=np.uint8)
        if num == 0 or not self.objects:
            return out
        masks = self.object_masks(t)
        for i, o in enumerate(self.objects):  # later objects on top
            out[masks[:, i]] = np.asarray(o.rgb, dtype=np.uint8)
        return out

    def clip(self, start: int, num: int, stride: int = 1, output: str = "float") -> torch.Tensor:
        """``output="float"``: ``(C, T, H, W)`` float32 in [-1, 1]; ``"uint8"``: ``(T, H, W, 3)``."""
        fr = self.frames(start, num, stride)
        if output == "uint8":
            return torch.from_numpy(fr)
        if output == "float":
            return to_model_tensor(fr)
        raise ValueError(f"unknown output {output!r}")


def caption_form(index: int, cfg: SyntheticConfig) -> CaptionForm:
    """The wording of video `index`'s caption: the classic form, or (wide grammar) one of WIDE_FORMS drawn
    from a stream apart from the scene's, so the wording never changes what is drawn."""
    if cfg.grammar == "classic":
        return CLASSIC_FORM
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed) & 0xFFFFFFFF, int(index), 1]))
    return WIDE_FORMS[int(rng.integers(len(WIDE_FORMS)))]


def to_model_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(3, T, H, W)`` in [-1, 1] (``x / 127.5 - 1``)."""
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    return (x.permute(3, 0, 1, 2).float() / 127.5) - 1.0


def from_model_tensor(x: torch.Tensor) -> np.ndarray:
    """float ``(3, T, H, W)`` in [-1, 1] -> uint8 ``(T, H, W, 3)``."""
    y = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(1, 2, 3, 0).cpu().numpy()


class SyntheticVideoDataset(Dataset):
    """Random clips of ``clip_frames`` frames from ``num_videos`` long synthetic videos.

    Item ``i`` is a clip of video ``i``; its start frame is drawn uniformly in
    ``[0, num_frames - span]`` from a generator seeded with ``(clip_seed, epoch, i)``, so items
    are deterministic for a given epoch and change with :meth:`set_epoch`.
    Returns ``{"video", "caption", "index", "start_frame", "metadata"}`` where ``video`` is
    float ``(3, T, H, W)`` in [-1, 1] (``output="float"``) or uint8 ``(T, H, W, 3)``.
    Use ``collate_fn=collate_samples`` in a DataLoader (metadata is ragged).
    """

    def __init__(
        self,
        cfg: SyntheticConfig = SyntheticConfig(),
        num_videos: int = 1000,
        clip_frames: int = CHUNK_FRAMES,
        frame_stride: int = 1,
        output: str = "float",
        clip_seed: int = 0,
    ):
        span = (clip_frames - 1) * frame_stride + 1
        if span > cfg.num_frames:
            raise ValueError(f"clip span {span} longer than the videos ({cfg.num_frames} frames)")
        self.cfg = cfg
        self.num_videos = num_videos
        self.clip_frames = clip_frames
        self.frame_stride = frame_stride
        self.output = output
        self.clip_seed = clip_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_videos

    def video(self, index: int) -> SyntheticVideo:
        return SyntheticVideo.from_index(index, self.cfg)

    def clip_start(self, index: int) -> int:
        span = (self.clip_frames - 1) * self.frame_stride + 1
        state = np.random.SeedSequence([int(self.clip_seed) & 0xFFFFFFFF, self.epoch, int(index)]).generate_state(2)
        g = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        return int(torch.randint(0, self.cfg.num_frames - span + 1, (1,), generator=g).item())

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_videos:
            raise IndexError(index)
        v = self.video(index)
        start = self.clip_start(index)
        return {
            "video": v.clip(start, self.clip_frames, self.frame_stride, self.output),
            "caption": v.caption,
            "index": index,
            "start_frame": start,
            "metadata": v.metadata,
        }


def export_synthetic_videos(
    out_dir: str | os.PathLike,
    num_videos: int,
    cfg: SyntheticConfig = SyntheticConfig(),
    num_frames: int | None = None,
    start_index: int = 0,
) -> str:
    """Write videos ``start_index ..`` as ``video_XXXXX.mp4`` plus ``captions.csv`` (path, caption)
    into ``out_dir``; returns the CSV path. Input for :func:`helios.train.video_data.build_latent_cache`."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i in range(start_index, start_index + num_videos):
        v = SyntheticVideo.from_index(i, cfg)
        name = f"video_{i:05d}.mp4"
        write_video(os.path.join(out_dir, name), v.frames(0, num_frames or cfg.num_frames), fps=cfg.fps, crf=10)
        rows.append((name, v.caption))
    csv_path = os.path.join(out_dir, "captions.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows(rows)
    return csv_path
