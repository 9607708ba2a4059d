"""The minute-long evaluation of a small model: held-out captions x seeds, full 60-second videos, scored
per 10-second window against their captions with helios.eval (no learned weights).

    nice -n 10 python benchmarks/minute_eval.py --out runs/minute-eval            # the bundled model
    python benchmarks/minute_eval.py --model anti-drift=runs/ad/model --model plain=runs/plain/model \
        --out runs/minute-eval-ablation                                            # compare model folders
    python benchmarks/minute_eval.py --captions 2 --seeds 1 --seconds 10 --out /tmp/smoke   # a quick run

Every video samples with the model's defaults (what `helios generate` does). Per window, over its
frames (helios.eval.metrics.adherence_frame / adherence_summary):
  background_right  fraction of frames whose median colour is nearest the captioned background
  objects_present   fraction of (frame, captioned colour) pairs with an object-sized blob of that colour
  count_match       fraction of frames where every captioned count is right
  shape_right       fraction of detected objects whose mask is classified as the captioned shape
and the late-versus-early decline of each (last window minus first; negative: worse late). Per model:
the mean over videos of each, the spread of the decline over seeds (each seed's mean over captions),
and the whole-video figures. Writes OUT/minute-eval.json, OUT/minute-eval.png (per-window curves, one
line per model, bars: seed-to-seed range) and OUT/strips/MODEL__CAPTION_sSEED.png (a frame every
--strip-seconds, downscaled to --strip-size pixels: a few KB each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

METRICS = {
    "background_right": "background right (frames)",
    "objects_present": "object colours present (frame, colour)",
    "count_match": "counts right (frames)",
    "shape_right": "shape right (detected objects)",
}
TARGETS = {"background_right": 0.98, "objects_present": 0.90, "count_match": 0.70, "shape_right": 0.70}


def parse_models(items: list[str] | None) -> dict[str, Path]:
    """NAME=FOLDER items (or a bare FOLDER, named after it) -> {name: folder}; default: the bundle."""
    if not items:
        from helios.cli import default_model

        return {"bundle": default_model()}
    models: dict[str, Path] = {}
    for item in items:
        name, _, folder = item.rpartition("=")
        path = Path(folder)
        name = name or path.name
        if not (path / "model_index.json").is_file():
            raise SystemExit(f"--model {item}: {path} is not a model folder (no model_index.json)")
        if name in models:
            raise SystemExit(f"--model {item}: the name {name!r} is given twice")
        models[name] = path
    return models


def window_rows(rows: list[dict[str, float]], fps: float, window_seconds: float) -> list[dict[str, float]]:
    """Per-frame adherence rows -> one adherence_summary per window, with its start and end in seconds."""
    from helios.eval.metrics import adherence_summary, window_bounds

    return [{"start_s": s / fps, "end_s": e / fps, **adherence_summary(rows[s:e])}
            for s, e in window_bounds(len(rows), fps, window_seconds)]


def decline(windows: list[dict[str, float]]) -> dict[str, float]:
    """Last window minus first, per metric (NaN where either is undefined)."""
    return {k: windows[-1][k] - windows[0][k] for k in METRICS}


def write_strip(frames: list[np.ndarray], size: int, path: Path) -> None:
    """Frames side by side, each downscaled to size x size, as a small PNG (written atomically)."""
    from PIL import Image

    tiles = [np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames]
    strip = np.concatenate([np.pad(t, ((0, 0), (0, 1), (0, 0)), constant_values=255) for t in tiles], axis=1)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(strip).save(tmp, optimize=True)
    tmp.replace(path)


def evaluate_video(pipe, caption: str, seed: int, seconds: float, fps: int, strip_seconds: float,
                   window_seconds: float) -> tuple[dict, list[np.ndarray]]:
    """Generate one video chunk by chunk with the model's defaults and score every frame as it arrives."""
    from helios.eval.metrics import adherence_frame, adherence_summary, caption_scene

    scene = caption_scene(caption)
    n = int(round(seconds * fps))
    every = max(1, int(round(strip_seconds * fps)))
    rows, strip = [], []
    t0 = time.perf_counter()
    generating = 0.0
    chunks = pipe.stream(caption, num_frames=n, seed=seed)
    while True:
        g0 = time.perf_counter()
        chunk = next(chunks, None)
        generating += time.perf_counter() - g0
        if chunk is None:
            break
        for frame in chunk.frames.numpy()[: n - len(rows)]:  # whole chunks: the last may run past n
            if len(rows) % every == every // 2:  # the middle of each strip interval
                strip.append(frame)
            rows.append(adherence_frame(frame, scene))
    windows = window_rows(rows, fps, window_seconds)
    result = {"caption": caption, "seed": seed, "frames": len(rows), "windows": windows,
              "whole": adherence_summary(rows), "decline": decline(windows),
              "seconds": time.perf_counter() - t0, "generation_fps": len(rows) / max(generating, 1e-9)}
    return result, strip


def nanmean(xs) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return float(np.mean(xs)) if xs else math.nan


def summarise(videos: list[dict]) -> dict:
    """One model's videos -> per-window means, whole-video means, decline (mean, per seed, seed spread)."""
    n_windows = min(len(v["windows"]) for v in videos)
    per_window = {k: [nanmean(v["windows"][w][k] for v in videos) for w in range(n_windows)] for k in METRICS}
    seeds = sorted({v["seed"] for v in videos})
    by_seed = {k: {str(s): nanmean(v["decline"][k] for v in videos if v["seed"] == s) for s in seeds} for k in METRICS}
    per_seed_windows = {k: {str(s): [nanmean(v["windows"][w][k] for v in videos if v["seed"] == s)
                                     for w in range(n_windows)] for s in seeds} for k in METRICS}
    return {
        "videos": len(videos),
        "window_starts_s": [videos[0]["windows"][w]["start_s"] for w in range(n_windows)],
        "per_window": per_window,
        "per_window_by_seed": per_seed_windows,
        "whole": {k: nanmean(v["whole"][k] for v in videos) for k in METRICS},
        "decline": {k: nanmean(v["decline"][k] for v in videos) for k in METRICS},
        "decline_by_seed": by_seed,
        "decline_seed_spread": {k: (max(by_seed[k].values()) - min(by_seed[k].values())) if len(seeds) > 1 else math.nan
                                for k in METRICS},
        "generation_fps": nanmean(v["generation_fps"] for v in videos),
        "meets_targets": {k: bool(nanmean(v["whole"][k] for v in videos) >= t) for k, t in TARGETS.items()},
    }


def plot(summaries: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, (key, label) in zip(axes, METRICS.items()):
        for name, s in summaries.items():
            xs = [t + 5 for t in s["window_starts_s"]]
            runs = np.array(list(s["per_window_by_seed"][key].values()), dtype=np.float64)
            lo, hi = np.nanmin(runs, axis=0), np.nanmax(runs, axis=0)
            ys = np.array(s["per_window"][key], dtype=np.float64)
            ax.errorbar(xs, ys, yerr=[ys - lo, hi - ys], marker="o", capsize=3, label=name)
        ax.axhline(TARGETS[key], color="grey", lw=0.8, ls="--")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("seconds into the video")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Held-out captions, per 10-second window (dashed: target; bars: range over seeds)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def markdown(summaries: dict[str, dict]) -> str:
    lines = ["| model | metric | " + " | ".join(f"{t:.0f}-{t + 10:.0f} s" for t in
                                                 next(iter(summaries.values()))["window_starts_s"])
             + " | whole | decline (last - first) | seed spread of decline |",
             "|---|---|" + "---|" * (len(next(iter(summaries.values()))["window_starts_s"]) + 3)]
    for name, s in summaries.items():
        for key in METRICS:
            cells = " | ".join(f"{x:.2f}" for x in s["per_window"][key])
            lines.append(f"| {name} | {key} | {cells} | {s['whole'][key]:.2f} | {s['decline'][key]:+.2f} | "
                         f"{s['decline_seed_spread'][key]:.2f} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="NAME=FOLDER (repeat to compare); default: the bundled model")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--captions", type=int, default=16, help="held-out captions (the README's prompt first)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--window-seconds", type=float, default=10.0)
    ap.add_argument("--grammar", default="classic", choices=["classic", "wide"],
                    help="wording and shapes of the held-out captions (wide: triangles, other words and orders)")
    ap.add_argument("--strip-seconds", type=float, default=5.0, help="one strip frame per this many seconds")
    ap.add_argument("--strip-size", type=int, default=32, help="strip frames are downscaled to this many pixels")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.captions < 1 or args.seeds < 1 or args.seconds <= 0 or args.window_seconds <= 0:
        ap.error("--captions and --seeds must be >= 1, --seconds and --window-seconds > 0")
    models = parse_models(args.model)

    import torch

    import helios
    from helios.train.tiny import held_out_captions

    if args.threads:
        torch.set_num_threads(args.threads)
    captions = held_out_captions(args.captions, grammar=args.grammar)
    (args.out / "strips").mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    record = {"models": {k: str(v) for k, v in models.items()}, "captions": captions, "seeds": args.seeds,
              "seconds": args.seconds, "fps": args.fps, "grammar": args.grammar, "device": args.device,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "videos": {}, "summary": {}}
    t_start = time.perf_counter()
    for name, folder in models.items():
        pipe = helios.load_pipeline(folder, dtype=dtype, device=args.device, optimize=False)
        record["videos"][name] = []
        for i, caption in enumerate(captions):
            for seed in range(args.seeds):
                result, strip = evaluate_video(pipe, caption, seed, args.seconds, args.fps, args.strip_seconds,
                                               args.window_seconds)
                record["videos"][name].append(result)
                write_strip(strip, args.strip_size, args.out / "strips" / f"{name}__{i:02d}_s{seed}.png")
                w = result["whole"]
                print(f"{name} [{i + 1}/{len(captions)} seed {seed}] " + " ".join(
                    f"{k} {w[k]:.2f} ({result['decline'][k]:+.2f})" for k in METRICS)
                      + f"  {result['generation_fps']:.1f} frames/s  {caption!r}", flush=True)
                write_json(args.out / "minute-eval.json", record)  # a partial record survives an interruption
        record["summary"][name] = summarise(record["videos"][name])
    record["wall_seconds"] = time.perf_counter() - t_start
    write_json(args.out / "minute-eval.json", record)
    plot(record["summary"], args.out / "minute-eval.png")
    table = markdown(record["summary"])
    (args.out / "minute-eval.md").write_text(table)
    print(table)
    print(f"{record['wall_seconds']:.0f} s in all; wrote {args.out}/minute-eval.json, minute-eval.png, "
          f"minute-eval.md, strips/")


if __name__ == "__main__":
    main()
