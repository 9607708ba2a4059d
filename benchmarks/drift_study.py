"""Drift study on the synthetic bouncing-shapes data: long videos from several small models, scored per window.

    # 1. generate (GPU or CPU): 60-second videos for each model, same captions and seeds
    python benchmarks/drift_study.py generate --model anti-drift=runs/ad/model --model plain=runs/plain/model \
        --videos 4 --seconds 60 --out runs/drift
    # 2. score and plot (CPU): per-10-second-window metrics, early-vs-late drift, one PNG per metric
    python benchmarks/drift_study.py report runs/drift --docs docs/drift-study

Also drift-study-frames.png: per video, the middle frame of every window. Metrics come from helios.eval (no learned weights): palette fidelity (background colour error and the
fraction of frames whose object count matches the caption), sharpness (variance of the Laplacian),
object count, and background stability.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

METRICS = {  # key in helios.eval window rows -> label
    "background_error": "background colour error (RGB distance)",
    "count_match": "object count matches caption (fraction)",
    "sharpness": "sharpness (variance of Laplacian)",
    "background_shift": "background drift vs first window",
    "color_shift": "colour statistics shift vs first chunk",
    "flicker": "temporal flicker",
}


def captions(n: int, seed: int = 1000) -> list[str]:
    """Held-out captions: synthetic scenes of a seed no training set uses (the small model's videos are
    scenes 0.. of seed 0, thousands of them)."""
    from helios.train.synthetic import SyntheticConfig, SyntheticVideo

    return [SyntheticVideo.from_index(i, SyntheticConfig(seed=seed)).caption for i in range(n)]


def generate(models: dict[str, Path], out: Path, videos: int, seconds: float, fps: int, device: str,
             steps: int | None = None) -> None:
    import torch

    import helios

    out.mkdir(parents=True, exist_ok=True)
    prompts = captions(videos)
    timing = {}
    for name, folder in models.items():
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipe = helios.load_pipeline(folder, dtype=dtype, device=device, optimize=False)
        timing[name] = []
        for i, prompt in enumerate(prompts):
            path = out / f"{name}__{i:02d}.mp4"
            t0 = time.perf_counter()
            frames = pipe.write(path, prompt, fps=fps, num_frames=int(seconds * fps), seed=i, steps=steps)
            dt = time.perf_counter() - t0
            timing[name].append({"video": path.name, "frames": frames, "seconds": dt, "fps": frames / dt})
            (out / f"{name}__{i:02d}.txt").write_text(prompt)
            print(f"{name} video {i}: {frames} frames in {dt:.1f}s ({frames / dt:.1f} frames/s)", flush=True)
    # one file for every model generated into this folder (calls with other models or steps add to it)
    log = out / "generation.json"
    record = json.loads(log.read_text()) if log.exists() else {"device": device, "timing": {}, "steps": {}}
    if not isinstance(record.get("steps"), dict):  # an older file: one steps value for all its models
        record["steps"] = {name: record.get("steps") for name in record.get("timing", {})}
    record["timing"].update(timing)
    record["steps"].update({name: steps for name in models})
    log.write_text(json.dumps(record, indent=2))


def report(folder: Path, docs: Path, window_seconds: float = 10.0) -> None:
    from helios.eval.report import evaluate_video

    docs.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    for video in sorted(folder.glob("*__*.mp4")):
        name = video.stem.split("__")[0]
        caption = video.with_suffix(".txt").read_text()
        r = evaluate_video(video, caption=caption, window_seconds=window_seconds)
        rows.setdefault(name, []).append({"video": video.name, "caption": caption, "windows": r["windows"],
                                          "drift": {k: r["drift"][k] for k in METRICS if k in r["drift"]}})
        print(f"scored {video.name}", flush=True)
    frame_strips(sorted(folder.glob("*__*.mp4")), docs / "drift-study-frames.png", window_seconds)
    table = summarise(rows)
    (docs / "drift-study.json").write_text(json.dumps({"per_video": rows, "per_window": table}, indent=2))
    plot(table, docs)
    (docs / "drift-study-table.md").write_text(markdown(table))
    print(markdown(table))


def frame_strips(videos: list[Path], path: Path, window_seconds: float = 10.0) -> None:
    """One row per video: the middle frame of every window, so drift can be seen as well as read."""
    from PIL import Image, ImageDraw

    from helios.engine.video_io import iter_video, video_fps

    rows, labels = [], []
    for video in videos:
        step = int(round(window_seconds * video_fps(video)))
        picks, seen = [], 0
        for chunk in iter_video(video, chunk_frames=256):  # decoded lazily: a long video need not fit in memory
            picks += [f.numpy() for i, f in enumerate(chunk, seen) if i % step == step // 2]
            seen += len(chunk)
        row = np.concatenate(picks, axis=1)
        rows.append(row.repeat(2, axis=0).repeat(2, axis=1) if row.shape[0] < 128 else row)  # small frames x2
        labels.append(video.stem)
    width = max(r.shape[1] for r in rows)
    label_w = 8 * max(len(x) for x in labels) + 8
    h = rows[0].shape[0]
    sheet = Image.new("RGB", (label_w + width, len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row, label) in enumerate(zip(rows, labels)):
        sheet.paste(Image.fromarray(row), (label_w, i * (h + 2)))
        draw.text((4, i * (h + 2) + h // 2 - 6), label, fill="black")
    tmp = path.with_name(f".{path.name}.tmp.png")
    sheet.save(tmp)
    tmp.replace(path)


def summarise(rows: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """Mean over videos of each metric in each window: {model: {metric: [w0, w1, ...]}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, videos in rows.items():
        n_windows = min(len(v["windows"]) for v in videos)
        out[name] = {}
        for key in METRICS:
            per_window = []
            for w in range(n_windows):
                vals = [v["windows"][w].get(key) for v in videos]
                vals = [x for x in vals if isinstance(x, (int, float)) and np.isfinite(x)]
                per_window.append(float(np.mean(vals)) if vals else float("nan"))
            out[name][key] = per_window
    return out


def markdown(table: dict[str, dict[str, list[float]]]) -> str:
    lines = []
    for key, label in METRICS.items():
        names = list(table)
        n = max(len(table[m][key]) for m in names)
        lines += [f"\n**{label}** (mean over videos, per 10-second window)\n",
                  "| model | " + " | ".join(f"{10 * w}-{10 * (w + 1)} s" for w in range(n)) + " |",
                  "|---|" + "---|" * n]
        for m in names:
            lines.append(f"| {m} | " + " | ".join(f"{x:.3g}" for x in table[m][key]) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, list[float]]], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, label) in zip(axes.flat, METRICS.items()):
        for name, metrics in table.items():
            ys = metrics[key]
            ax.plot([10 * (w + 0.5) for w in range(len(ys))], ys, marker="o", label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("seconds into the video")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Drift over 60-second videos (synthetic bouncing shapes), mean over videos")
    fig.tight_layout()
    tmp = docs / ".drift-study.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    tmp.replace(docs / "drift-study.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--model", action="append", required=True, help="NAME=FOLDER")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--videos", type=int, default=4)
    g.add_argument("--seconds", type=float, default=60.0)
    g.add_argument("--fps", type=int, default=24)
    g.add_argument("--device", default="cuda")
    g.add_argument("--steps", type=int, default=None, help="sampler steps (per pyramid stage); default: preset's")
    r = sub.add_parser("report")
    r.add_argument("folder", type=Path)
    r.add_argument("--docs", type=Path, default=Path("docs/drift-study"))
    args = ap.parse_args()
    if args.cmd == "generate":
        models = dict(m.split("=", 1) for m in args.model)
        generate({k: Path(v) for k, v in models.items()}, args.out, args.videos, args.seconds, args.fps, args.device,
                 args.steps)
    else:
        report(args.folder, args.docs)


if __name__ == "__main__":
    main()
