"""Speed of small model folders end to end, through the path users run (`pipe.stream`, frames handed
over as uint8 on the host): the distilled bundle against the undistilled one, on the CPU or a GPU.

    python benchmarks/small_model_speed.py --model distilled=runs/tiny/helios-tiny-distilled \
        --model mid=runs/tiny/helios-tiny-mid --device cpu --seconds 10 --out runs/tiny/speed-cpu.json
    python benchmarks/small_model_speed.py --model 3-step=runs/tiny/helios-tiny-distilled@1,1,1 --model mid=... --out ...

Each model streams one warm-up chunk, then `--seconds` of video (default prompt: the README's);
reported: seconds per chunk in steady state (the first, amplified chunk excluded), frames per second
over the whole video, time to the first chunk. Appends nothing: one JSON per call.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

PROMPT = "two red circles bouncing on a blue background"


def measure(folder: Path, device: str, seconds: float, fps: int, seed: int = 0,
            steps: list[int] | None = None) -> dict:
    import torch

    import helios

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = helios.load_pipeline(folder, dtype=dtype, device=device)  # the default path for the device
    for _ in pipe.stream(PROMPT, num_frames=33, seed=seed, steps=steps):  # warm-up: allocations, kernels, caches
        pass
    frames, stamps = 0, []
    t0 = time.perf_counter()
    for chunk in pipe.stream(PROMPT, num_frames=int(seconds * fps), seed=seed, steps=steps):
        frames += chunk.frames.shape[0]
        stamps.append(time.perf_counter() - t0)
    total = stamps[-1]
    steady = [b - a for a, b in zip(stamps[1:], stamps[2:])] or [total]
    return {"frames": frames, "chunks": len(stamps), "seconds": total, "fps": frames / total,
            "first_chunk_s": stamps[0], "s_per_chunk_steady": sorted(steady)[len(steady) // 2],
            "fps_steady": 33 / sorted(steady)[len(steady) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="NAME=FOLDER, or NAME=FOLDER@1,1,1 for other steps per pyramid stage than the preset's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    rows = {}
    for spec in args.model:
        name, folder = spec.split("=", 1)
        folder, _, steps = folder.partition("@")
        rows[name] = r = measure(Path(folder), args.device, args.seconds, args.fps,
                                 steps=[int(x) for x in steps.split(",")] if steps else None) | {"steps": steps or "preset"}
        print(f"{name}: {r['frames']} frames in {r['seconds']:.2f}s = {r['fps']:.1f} frames/s "
              f"(steady {r['s_per_chunk_steady']:.3f} s/chunk, first chunk {r['first_chunk_s']:.2f}s) on {where}",
              flush=True)
    names = list(rows)
    result = {"device": args.device, "where": where, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "prompt": PROMPT, "models": rows}
    if len(names) >= 2:  # every model against the last one
        b = names[-1]
        result["speedup"] = {f"{a}_vs_{b}": rows[b]["s_per_chunk_steady"] / rows[a]["s_per_chunk_steady"]
                             for a in names[:-1]}
        for a in names[:-1]:
            print(f"{a} is {result['speedup'][f'{a}_vs_{b}']:.1f}x faster per chunk than {b}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
