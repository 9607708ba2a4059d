"""`helios eval VIDEO_OR_FOLDER`: score videos and their decay over time, print a table per video."""

from __future__ import annotations

import argparse
import os
import sys

from helios.eval.report import evaluate_path

# (report key, column header, format) for the per-window table
COLUMNS = (
    ("sharpness", "sharp", "{:8.1f}"),
    ("brightness", "bright", "{:7.1f}"),
    ("saturation", "sat", "{:6.3f}"),
    ("color_shift", "colshift", "{:8.2f}"),
    ("flicker", "flicker", "{:7.3f}"),
    ("motion", "motion", "{:7.2f}"),
    ("smoothness", "smooth", "{:7.4f}"),
    ("background_error", "bg_err", "{:7.1f}"),
    ("count_match", "count_ok", "{:8.2f}"),
    ("clip_similarity", "clip", "{:6.3f}"),
)


def _fmt(fmt: str, v) -> str:
    return "n/a".rjust(len(fmt.format(0.0))) if v is None else fmt.format(v)


def format_report(report: dict) -> str:
    """A short plain-text summary: header, one row per window, drift and chunk-seam lines."""
    if "error" in report:
        return f"{report['source']}: ERROR {report['error']}"
    cols = [c for c in COLUMNS if any(w.get(c[0]) is not None for w in report["windows"])]
    lines = [f"{report['source']}: {report['frames']} frames, {report['fps']:g} fps, "
             f"{report['width']}x{report['height']}, {report['duration_s']:.1f} s"]
    if report.get("caption"):
        lines.append(f"  caption: {report['caption']}")
    lines.append(f"  {'time (s)':>13} " + " ".join(h.rjust(len(f.format(0.0))) for _, h, f in cols))
    for w in report["windows"]:
        span = f"{w['start_s']:6.1f}-{w['end_s']:<6.1f}"
        lines.append(f"  {span:>13} " + " ".join(_fmt(f, w.get(k)) for k, _, f in cols))
    drifts = []
    for k, h, _ in cols:
        d = report["drift"].get(k)
        if d and d.get("change") is not None:
            rel = f" ({100 * d['change'] / abs(d['first']):+.0f}%)" if d.get("first") else ""
            drifts.append(f"{h} {d['change']:+.4g}{rel}")
    lines.append("  drift, last 15% - first 15%: " + ", ".join(drifts))
    cb = report["chunk_boundary"]
    if cb["flicker"]["seams"]:
        fl, fd = (_fmt("{:.2f}", cb[k]["ratio"]).strip() for k in ("flicker", "frame_diff"))
        lines.append(f"  chunk seams ({cb['flicker']['seams']}): flicker x{fl}, frame jump x{fd} vs within chunks")
    if "outputs" in report:
        lines.append(f"  wrote {report['outputs']['json']} and {report['outputs']['png']}")
    return "\n".join(lines)


def eval_command(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    caption: str | None = None,
    window_seconds: float = 10.0,
    clip_model: str | os.PathLike | None = None,
) -> int:
    """Evaluate a video or a folder of videos. Returns 0 on success, 1 if any video failed, 2 on bad input."""
    if window_seconds <= 0:
        print(f"error: window_seconds must be positive, got {window_seconds}", file=sys.stderr)
        return 2
    try:
        reports = evaluate_path(path, out_dir=out_dir, caption=caption, window_seconds=window_seconds,
                                clip_model=clip_model)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in reports:
        print(format_report(r))
        print()
    failed = [r for r in reports if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(reports)} videos could not be evaluated", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helios.eval.cli", description=__doc__)
    ap.add_argument("path", help="a video file or a folder of videos")
    ap.add_argument("--out-dir", help="where to write STEM.eval.json/.png (default: next to each video)")
    ap.add_argument("--caption", help="caption for every video (default: STEM.txt or captions.jsonl sidecars)")
    ap.add_argument("--window-seconds", type=float, default=10.0)
    ap.add_argument("--clip-model", help="local transformers CLIP folder for text-frame similarity")
    a = ap.parse_args(argv)
    return eval_command(a.path, a.out_dir, a.caption, a.window_seconds, a.clip_model)


if __name__ == "__main__":
    sys.exit(main())
