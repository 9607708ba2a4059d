"""Does a small model draw what its caption says? One chunk per held-out caption and seed, scored
against the caption with helios.eval (no learned weights), and a contact sheet.

    python benchmarks/prompt_adherence.py runs/tiny/helios-tiny-mid --out runs/tiny/adherence-mid
    python benchmarks/prompt_adherence.py MODEL --captions 12 --seeds 2 --steps 20 --guidance 5

Per video (all its frames), helios.eval.metrics.caption_adherence: the background colour error (RGB
distance of the median colour from the caption's), whether the nearest palette colour to that median
is the caption's background, the fraction of captioned object colours that appear as at least one
blob, whether every object count matches, and the fraction of detected objects of the captioned shape. The loss of a training run does not show whether a model follows its prompts; this does.
Writes OUT/adherence.json and OUT/adherence.png (rows: captions, columns: frames of each seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

def contact_sheet(rows: list[list[np.ndarray]], path: Path, every: int = 4) -> None:
    """rows[i][s]: frames (T, H, W, 3) of caption i, seed s -> one PNG, every `every`-th frame."""
    from PIL import Image

    lines = [np.concatenate([np.concatenate(list(v[::every]), axis=1) for v in row], axis=1) for row in rows]
    width = max(x.shape[1] for x in lines)
    lines = [np.pad(x, ((0, 2), (0, width - x.shape[1]), (0, 0)), constant_values=255) for x in lines]
    Image.fromarray(np.concatenate(lines, axis=0)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--captions", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--frames", type=int, default=33, help="frames per video (33: one chunk)")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="sampling steps (default: the preset's)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fast-start", action="store_true", help="the first chunk not amplified (distilled)")
    args = ap.parse_args()

    import torch

    import helios
    from helios.eval.metrics import as_uint8_numpy, caption_adherence
    from helios.train.tiny import held_out_captions

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe = helios.load_pipeline(args.model, dtype=dtype, device=args.device, optimize=False)
    steps = args.steps[0] if args.steps and len(args.steps) == 1 else args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    results, sheet = [], []
    t0 = time.perf_counter()
    for i, caption in enumerate(held_out_captions(args.captions)):
        row = []
        for seed in range(args.seeds):
            frames = as_uint8_numpy(pipe.generate(caption, num_frames=args.frames, seed=seed, steps=steps,
                                                  guidance_scale=args.guidance,
                                                  amplify_first_chunk=False if args.fast_start else None))
            row.append(frames)
            results.append({"caption": caption, "seed": seed, **caption_adherence(frames, caption)})
            r = results[-1]
            print(f"[{i + 1}/{args.captions} seed {seed}] bg err {r['background_error']:5.1f} "
                  f"bg right {r['background_right']:.2f} objects {r['objects_present']:.2f} "
                  f"counts {r['count_match']:.2f} shapes {r['shape_right']:.2f}  {caption!r} ({time.perf_counter() - t0:.0f}s)", flush=True)
        sheet.append(row)
    keys = ("background_error", "background_right", "objects_present", "count_match", "shape_right")
    summary = {k: float(np.nanmean([r[k] for r in results])) for k in keys}
    print("mean: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    (args.out / "adherence.json").write_text(json.dumps(
        {"model": str(args.model), "steps": args.steps, "guidance": args.guidance, "fast_start": args.fast_start,
         "summary": summary, "videos": results}, indent=2))
    contact_sheet(sheet, args.out / "adherence.png")


if __name__ == "__main__":
    main()
