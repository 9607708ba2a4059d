"""Does weighting the objects' pixels in the small VAE's loss keep its objects over a whole chunk?

    python benchmarks/vae_object_weight.py src/helios/assets/helios-tiny/vae --steps 90 --batch 4 \
        --weights 0 10 --out benchmarks/results/vae-object-weight

From one trained vae/ folder, the same number of steps (same clips, same seed) with each object weight,
then the reconstruction error per latent frame over whole frames and over the objects' pixels
(helios.train.tiny.reconstruction_errors_per_latent_frame, held-out scenes). Writes OUT/results.json,
OUT/errors.png, OUT/reconstructions.png (every 4th frame of held-out chunks: the input, then each VAE's
decoding) and each trained VAE in OUT/vae-w<weight>/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def errors(vae) -> dict[str, list[float]]:
    from helios.train.tiny import reconstruction_errors_per_latent_frame

    return reconstruction_errors_per_latent_frame(vae, clips=8)


def reconstruction_sheet(vaes: list, path: Path, scenes: int = 3) -> None:
    """Rows per scene: the input chunk, then its decoding by each VAE (every 4th frame)."""
    import numpy as np
    import torch
    from PIL import Image

    from helios.train.synthetic import SyntheticVideo, from_model_tensor
    from helios.train.tiny import CHUNK_FRAMES, reconstruct, scene_config

    rows = []
    for i in range(scenes):
        x = SyntheticVideo.from_index(i, scene_config(seed=2)).clip(0, CHUNK_FRAMES)[None]
        outs = [from_model_tensor(x[0])]
        with torch.no_grad():
            outs += [from_model_tensor(reconstruct(v, x)[0]) for v in vaes]
        rows += [np.concatenate(list(o[::4]), axis=1) for o in outs]
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, region in zip(axes, ("frame", "objects")):
        ax.plot(results["start"][region], "k--", label="start")
        for w, r in results["runs"].items():
            ax.plot(r["errors"][region], marker="o", label=f"object weight {w}")
        ax.set_title(f"error per latent frame, {'whole frames' if region == 'frame' else 'object pixels'}")
        ax.set_xlabel("latent frame of the chunk")
    axes[0].set_ylabel("mean |decoded - input| ([-1, 1] scale)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path, help="a trained vae/ folder to start every run from")
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 10.0])
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoder-only", action="store_true",
                    help="freeze the encoder: the latents, and the transformers trained on them, stay valid")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    from diffusers import AutoencoderKLWan

    from helios.train.tiny import train_vae

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"vae": str(args.vae), "steps": args.steps, "batch": args.batch, "lr": args.lr,
               "decoder_only": args.decoder_only,
               "start": errors(AutoencoderKLWan.from_pretrained(args.vae)), "runs": {}}
    for w in args.weights:
        torch.manual_seed(0)
        vae = AutoencoderKLWan.from_pretrained(args.vae)
        t0 = time.perf_counter()
        losses = train_vae(vae, args.steps, batch=args.batch, lr=args.lr, device=args.device, object_weight=w,
                           decoder_only=args.decoder_only)
        vae.to("cpu")
        vae.save_pretrained(args.out / f"vae-w{w:g}")
        results["runs"][str(w)] = {"seconds": time.perf_counter() - t0, "losses": losses, "errors": errors(vae)}
        e = results["runs"][str(w)]["errors"]
        print(f"object weight {w}: frame " + " ".join(f"{x:.3f}" for x in e["frame"]) +
              " | objects " + " ".join(f"{x:.3f}" for x in e["objects"]), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "errors.png")
    reconstruction_sheet([AutoencoderKLWan.from_pretrained(args.vae),
                          *(AutoencoderKLWan.from_pretrained(args.out / f"vae-w{w:g}") for w in args.weights)],
                         args.out / "reconstructions.png")


if __name__ == "__main__":
    main()
