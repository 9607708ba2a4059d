"""Probe: per-forward times of the 14B transformer at the distilled pyramid's three stage sizes.

Not the end-to-end benchmark (benchmarks/bench_e2e.py is): this measures where the time goes, for
benchmarks/NOTES.md. Ours (eager, regional torch.compile, attention backends) and the diffusers
reference (eager), random bf16 weights made on the GPU, and the Wan VAE decode of one chunk
(alone, and overlapped with a transformer forward on another stream).

    python benchmarks/probe_transformer.py --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from helios.model.attention import set_attention_backends
from helios.model.config import HeliosConfig
from helios.model.transformer import build_transformer

H, W = 48, 80  # latent size at 384x640
STAGES = {"stage0": (12, 20), "stage1": (24, 40), "stage2": (48, 80)}


def cuda_time(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return sorted(times)[len(times) // 2]


def inputs(dev, dtype):
    g = torch.Generator(device=dev).manual_seed(0)
    hist = dict(
        latents_history_short=torch.randn(1, 16, 2, H, W, device=dev, generator=g).to(dtype),
        latents_history_mid=torch.randn(1, 16, 2, H, W, device=dev, generator=g).to(dtype),
        latents_history_long=torch.randn(1, 16, 16, H, W, device=dev, generator=g).to(dtype),
        indices_latents_history_short=torch.tensor([[0, 19]], device=dev),
        indices_latents_history_mid=torch.tensor([[17, 18]], device=dev),
        indices_latents_history_long=torch.arange(1, 17, device=dev)[None],
        indices_hidden_states=torch.arange(20, 29, device=dev)[None],
    )
    ctx = torch.randn(1, 512, 4096, device=dev, generator=g).to(dtype)
    noisy = {k: torch.randn(1, 16, 9, h, w, device=dev, generator=g).to(dtype) for k, (h, w) in STAGES.items()}
    return hist, ctx, noisy


def flops_per_forward(noisy_tokens: int, history_tokens: int = 2400, text: int = 512, d: int = 5120,
                      ffn: int = 13824, layers: int = 40) -> float:
    n, L = noisy_tokens, noisy_tokens + history_tokens
    linear = 2 * layers * (L * (4 * d * d + 2 * d * ffn) + n * 2 * d * d)
    attn = layers * (4 * L * L * d + 4 * n * text * d)
    return linear, attn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe.json")
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    hist, ctx, noisy = inputs(dev, dtype)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_transformer(HeliosConfig(), device=dev, dtype=dtype).eval()
    torch.cuda.synchronize()
    res["build_s"] = time.perf_counter() - t0
    ours: dict = {}
    with torch.no_grad():
        text = model.prepare_text(ctx)
        for backend in (["cudnn", "flash", "efficient", "math"], ["flash", "efficient", "math"]):
            set_attention_backends(backend)
            key = f"eager_{backend[0]}"
            ours[key] = {}
            for stage, x in noisy.items():
                ours[key][stage] = cuda_time(lambda: model(x, 500.0, text, **hist))
            print(key, ours[key], flush=True)
        set_attention_backends(["cudnn", "flash", "efficient", "math"])
        if not args.skip_compile:
            t0 = time.perf_counter()
            for blk in model.blocks:
                blk.compile(dynamic=False)
            ours["compiled"] = {}
            for stage, x in noisy.items():
                model(x, 500.0, text, **hist)
                torch.cuda.synchronize()
            ours["compile_s"] = time.perf_counter() - t0
            for stage, x in noisy.items():
                ours["compiled"][stage] = cuda_time(lambda: model(x, 500.0, text, **hist))
            print("compiled", ours["compiled"], "compile_s", ours["compile_s"], flush=True)
        res["ours_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9

        # Overlap of a VAE decode with a transformer forward on another stream.
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan().to(dev, dtype).eval()
        z = torch.randn(1, 16, 9, H, W, device=dev, dtype=dtype)
        res["vae_decode_s"] = cuda_time(lambda: vae.decode(z).sample, warmup=1, iters=3)
        torch.backends.cudnn.benchmark = True
        res["vae_decode_cudnn_benchmark_s"] = cuda_time(lambda: vae.decode(z).sample, warmup=1, iters=3)
        side = torch.cuda.Stream()
        fwd = "compiled" if "compiled" in ours else "eager_cudnn"

        def both():
            with torch.cuda.stream(side):
                vae.decode(z)
            model(noisy["stage2"], 500.0, text, **hist)
            torch.cuda.current_stream().wait_stream(side)

        res["overlap_decode_plus_stage2_s"] = cuda_time(both, warmup=1, iters=3)
        res["overlap_reference_sum_s"] = res["vae_decode_cudnn_benchmark_s"] + ours[fwd]["stage2"]
        print("vae", res["vae_decode_s"], res["vae_decode_cudnn_benchmark_s"], "overlap",
              res["overlap_decode_plus_stage2_s"], "vs sum", res["overlap_reference_sum_s"], flush=True)
        del vae
    res["ours"] = ours
    del model, text
    gc.collect()
    torch.cuda.empty_cache()

    from diffusers import HeliosTransformer3DModel

    torch.set_default_dtype(dtype)
    with torch.device(dev):
        ref = HeliosTransformer3DModel().eval()
    torch.set_default_dtype(torch.float32)
    res["reference_eager"] = {}
    with torch.no_grad():
        for stage, x in noisy.items():
            res["reference_eager"][stage] = cuda_time(
                lambda: ref(hidden_states=x, timestep=torch.tensor([500], device=dev), encoder_hidden_states=ctx,
                            return_dict=False, **hist))
    print("reference eager", res["reference_eager"], flush=True)

    res["floor"] = {}
    for stage, (h, w) in STAGES.items():
        lin, att = flops_per_forward(9 * h * w // 4)
        res["floor"][stage] = {"linear_tflop": lin / 1e12, "attn_tflop": att / 1e12,
                               "floor_s": lin / 754e12 + att / 580e12}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
