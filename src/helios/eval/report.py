"""Evaluate whole videos: stream the frames once, build per-window tables, drift and chunk-seam
statistics, and write a JSON report plus a PNG of every metric over time (both atomically)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from helios.eval import metrics as M
from helios.scenes import parse_caption

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")
# Panels of the PNG and columns of the window table, in this order, when present.
PLOT_METRICS = (
    ("sharpness", "sharpness (Laplacian var)"),
    ("brightness", "brightness (0-255)"),
    ("saturation", "saturation (0-1)"),
    ("color_shift", "colour shift vs first chunk"),
    ("flicker", "brightness flicker"),
    ("frame_diff", "frame difference"),
    ("motion", "motion (px/frame)"),
    ("motion_top", "motion, top 5% blocks"),
    ("smoothness", "motion smoothness (1 = smooth)"),
    ("background_error", "background colour error"),
    ("background_shift", "background shift vs start"),
    ("count_match", "object count correct"),
    ("clip_similarity", "CLIP text-frame similarity"),
)
SUMMARY_DRIFTS = ("sharpness", "brightness", "saturation", "color_shift", "motion", "smoothness",
                  "background_error", "count_match", "clip_similarity")


# -----------------------------------------------------------------------------
# evaluation


def _chunks(path_or_frames, fps: float | None) -> tuple[str, float, Iterable[np.ndarray]]:
    """(source name, fps, iterator of uint8 (t,H,W,3) chunks) for a path or in-memory frames."""
    if isinstance(path_or_frames, (str, os.PathLike)):
        from helios.engine.video_io import iter_video, video_fps

        path = str(path_or_frames)
        chunks = iter_video(path, chunk_frames=M.CHUNK_FRAMES)  # raises now on missing/unreadable files
        return path, float(fps or video_fps(path) or 24.0), (M.as_uint8_numpy(c) for c in chunks)
    frames = M.as_uint8_numpy(path_or_frames)
    if len(frames) == 0:
        raise ValueError("no frames to evaluate: got an empty (0,H,W,3) video.")
    chunks = (frames[i : i + M.CHUNK_FRAMES] for i in range(0, len(frames), M.CHUNK_FRAMES))
    return "<frames>", float(fps or 24.0), chunks


def evaluate_video(
    path_or_frames,
    caption: str | None = None,
    window_seconds: float = 10.0,
    fps: float | None = None,
    clip_model: str | os.PathLike | None = None,
) -> dict:
    """Score a video (path or uint8 (T,H,W,3) array/tensor) and how its quality decays.

    fps: taken from the file for paths; defaults to 24 for in-memory frames.
    caption: enables palette fidelity when it names colours/shapes, and CLIP scoring with clip_model.
    Returns a JSON-serialisable dict: meta, "windows" (one row per window), "drift" (paper's first vs
    last 15% for every metric), "chunk_boundary", "summary" (flat scalars) and "per_frame" series.
    """
    source, fps, chunks = _chunks(path_or_frames, fps)
    window_frames = max(1, int(round(window_seconds * fps)))
    scene = parse_caption(caption) if caption else None
    trackers: list = [M.FrameSeries()]
    if scene and (scene.objects or scene.background):
        trackers.append(M.PaletteSeries(scene, stride=max(1, int(round(fps / 4)))))
    if clip_model is not None:
        from helios.eval.clip_score import ClipScorer, ClipSeries

        trackers.append(ClipSeries(ClipScorer(clip_model, caption or ""), stride=max(1, window_frames // 4)))
    for chunk in chunks:
        for t in trackers:
            t.update(chunk)
    n = trackers[0].n
    if n == 0:
        raise ValueError(f"{source} has no frames to evaluate.")
    series: dict[str, np.ndarray] = {}
    for t in trackers:
        series.update(t.result())

    bounds = M.window_bounds(n, fps, window_seconds)
    windows = [
        {"index": i, "start_frame": s, "end_frame": e, "start_s": s / fps, "end_s": e / fps, **means}
        for i, ((s, e), means) in enumerate(zip(bounds, M.window_means(series, bounds)))
    ]
    drift = {k: M.drift(v) for k, v in series.items()}
    boundary = {k: M.chunk_boundary_stats(series[k]) for k in ("flicker", "frame_diff")}
    h, w = trackers[0].size
    report = {
        "source": source, "caption": caption, "frames": n, "fps": fps, "width": w, "height": h,
        "duration_s": n / fps, "window_seconds": window_seconds, "window_frames": window_frames,
        "chunk_frames": M.CHUNK_FRAMES, "drift_fraction": M.DRIFT_FRACTION,
        "scene": M.scene_dict(scene) if len(trackers) > 1 and scene else None,
        "windows": windows, "drift": drift, "chunk_boundary": boundary,
        "summary": _summary(series, drift, boundary, n, fps),
        "per_frame": {k: v.tolist() for k, v in series.items()},
    }
    return json_safe(report)


def _summary(series, drift, boundary, n: int, fps: float) -> dict:
    s = {"frames": n, "duration_s": n / fps}
    for key, _ in PLOT_METRICS:
        if key in series:
            s[key] = M.nanmean(series[key])
    for key in SUMMARY_DRIFTS:
        if key in drift:
            s[f"{key}_drift"] = drift[key]["drift"]
            s[f"{key}_change"] = drift[key]["change"]
    s["seam_flicker_ratio"] = boundary["flicker"]["ratio"]
    s["seam_jump_ratio"] = boundary["frame_diff"]["ratio"]
    return s


def json_safe(x):
    """numpy -> Python, NaN/inf -> None, floats to 6 significant digits (keeps per-frame JSON small)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return float(f"{x:.6g}") if math.isfinite(x) else None
    return x


# -----------------------------------------------------------------------------
# atomic outputs


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Write JSON via a temp file + rename, so readers never see half a report."""
    path = Path(path)
    tmp = _atomic_path(path)
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_report(report: dict, png_path: str | os.PathLike) -> Path:
    """One PNG: a panel per metric over time (per-frame series, window means, window boundaries)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    png_path = Path(png_path)
    fps = report["fps"]
    per_frame = report["per_frame"]
    panels = [(k, label) for k, label in PLOT_METRICS if k in per_frame]
    height = 1.6 * len(panels) + 0.8
    fig = Figure(figsize=(10, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    edges = [w["start_s"] for w in report["windows"]] + [report["windows"][-1]["end_s"]]
    for ax, (key, label) in zip(axes[:, 0], panels):
        y = np.array([np.nan if v is None else v for v in per_frame[key]], dtype=float)
        t = np.arange(len(y)) / fps
        dense = np.isfinite(y).mean() > 0.5
        if dense:
            ax.plot(t, y, lw=0.6, color="0.6")
        else:  # sparse (sampled) metric: dots
            ax.plot(t[np.isfinite(y)], y[np.isfinite(y)], ".", ms=3, color="0.5")
        means = [np.nan if w.get(key) is None else w[key] for w in report["windows"]]
        ax.stairs(means, edges, baseline=None, color="C0", lw=1.8, label="window mean")
        for e in edges:
            ax.axvline(e, color="C3", lw=0.6, ls="--", alpha=0.6)
        d = report["drift"].get(key) or {}
        title = label if d.get("change") is None else f"{label}   (last-first 15%: {d['change']:+.4g})"
        ax.set_title(title, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(f"{Path(report['source']).name}: {report['frames']} frames @ {fps:g} fps",
                 fontsize=10, y=1 - 0.15 / height, va="top")
    # fixed margins: tight_layout would render everything an extra time
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.5 / height, top=1 - 0.75 / height, hspace=0.45)
    tmp = _atomic_path(png_path)
    try:
        fig.savefig(tmp, format="png", dpi=90)
        os.replace(tmp, png_path)
    finally:
        tmp.unlink(missing_ok=True)
    return png_path


# -----------------------------------------------------------------------------
# folders and sidecar captions


def _jsonl_captions(path: Path) -> dict[str, str]:
    """captions.jsonl lines like {"video": "a.mp4", "caption": "..."} -> {file name and stem: caption}."""
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not valid JSON ({e}); expected {{\"video\": \"a.mp4\", \"caption\": \"...\"}}") from e
        name = next((row[k] for k in ("video", "file", "path", "name", "id") if k in row), None)
        text = next((row[k] for k in ("caption", "prompt", "text") if k in row), None)
        if name is not None and text is not None:
            out[Path(str(name)).name] = out[Path(str(name)).stem] = str(text)
    return out


def find_caption(video: str | os.PathLike) -> str | None:
    """Caption from VIDEO_STEM.txt next to the video, else from captions.jsonl in its folder."""
    video = Path(video)
    txt = video.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text().strip() or None
    jsonl = video.parent / "captions.jsonl"
    if jsonl.is_file():
        caps = _jsonl_captions(jsonl)
        return caps.get(video.name) or caps.get(video.stem)
    return None


def list_videos(path: str | os.PathLike) -> list[Path]:
    """A video file, or the videos in a folder (not hidden in-progress files), sorted."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a video file or a folder of videos.")
    if p.is_file():
        return [p]
    vids = sorted(v for v in p.iterdir() if v.suffix.lower() in VIDEO_SUFFIXES and not v.name.startswith("."))
    if not vids:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in folder {p}.")
    return vids


def evaluate_path(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    caption: str | None = None,
    window_seconds: float = 10.0,
    clip_model: str | os.PathLike | None = None,
) -> list[dict]:
    """Evaluate a video or every video in a folder; write STEM.eval.json and STEM.eval.png per video.

    out_dir defaults to each video's folder. caption overrides sidecar captions. A video that fails
    (unreadable, empty) gives {"source", "error"} instead of stopping the others. For folders an
    eval_summary.json with every video's summary is written too.
    """
    videos = list_videos(path)
    if clip_model is not None:
        from helios.eval.clip_score import check_clip_folder

        check_clip_folder(clip_model)  # fail before decoding anything
    results = []
    for v in videos:
        out = Path(out_dir) if out_dir else v.parent
        out.mkdir(parents=True, exist_ok=True)
        cap = caption or find_caption(v)
        try:
            report = evaluate_video(v, caption=cap, window_seconds=window_seconds, clip_model=clip_model)
        except (ValueError, OSError) as e:
            log.error("%s: %s", v, e)
            results.append({"source": str(v), "error": str(e)})
            continue
        report["outputs"] = {"json": str(out / f"{v.stem}.eval.json"), "png": str(out / f"{v.stem}.eval.png")}
        write_json(report, report["outputs"]["json"])
        plot_report(report, report["outputs"]["png"])
        results.append(report)
    if Path(path).is_dir():
        out = Path(out_dir) if out_dir else Path(path)
        rows = [{"source": r["source"], **({"error": r["error"]} if "error" in r else {"summary": r["summary"]})}
                for r in results]
        write_json({"videos": rows}, out / "eval_summary.json")
    return results
