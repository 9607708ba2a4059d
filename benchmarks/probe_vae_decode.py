"""The Wan VAE decode of one 14B chunk (9 latent frames at 48x80 -> 33 frames at 384x640, bf16) on one GPU,
in the settings that could make it faster: the engine's decode (`LatentCodec.decode`, latent frames 1..8 in
groups of `frames_per_decode`), cuDNN autotuning, channels-last-3d memory format. Each variant's frames are
compared with the engine's default; a profile of the default names the kernels the time goes to.

    python benchmarks/probe_vae_decode.py --out vae.json
"""

from __future__ import annotations

import argparse
import json

import torch

from probe_transformer import cuda_time


def main() -> None:
    from diffusers import AutoencoderKLWan

    from helios.engine.conditioning import LatentCodec

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="vae.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    codec = LatentCodec(AutoencoderKLWan().to("cuda", torch.bfloat16).eval())
    z = torch.randn(1, 16, 9, 48, 80, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    base = codec.decode(z).float()

    def measure(name: str) -> None:
        torch.cuda.reset_peak_memory_stats()
        t = cuda_time(lambda: codec.decode(z), warmup=2, iters=5)
        out = codec.decode(z).float()
        res[name] = {"decode_s": t, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                     "max_abs_vs_default": (out - base).abs().max().item()}
        print(name, json.dumps(res[name]), flush=True)

    from torch.profiler import ProfilerActivity, profile

    codec.decode(z)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the default layout, before any variant
        codec.decode(z)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70)
    print(table)
    res["profile_top20"] = table

    measure("default")
    codec.frames_per_decode = 8
    measure("groups-of-8")
    codec.frames_per_decode = 4
    torch.backends.cudnn.benchmark = True
    measure("cudnn-benchmark")
    torch.backends.cudnn.benchmark = False
    codec.channels_last_()  # what optimize() does on CUDA
    measure("channels-last-3d")
    torch.backends.cudnn.benchmark = True
    measure("channels-last-3d+cudnn-benchmark")
    torch.backends.cudnn.benchmark = False
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
