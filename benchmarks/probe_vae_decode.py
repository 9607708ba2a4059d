"""The Wan VAE decode of one 14B chunk (9 latent frames at 48x80 -> 33 frames at 384x640, bf16) on one GPU:
diffusers' `AutoencoderKLWan.decode` (the reference) against ours (helios.model.wan_vae) in each of its
settings (each step of the decoder's development measured in the same run), the error of each against a float32 decode by diffusers, each convolution's timed implementations,
and a profile of our fastest path naming the kernels its time goes to.

    python benchmarks/probe_vae_decode.py --out vae.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from probe_transformer import cuda_time


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def profile(fn, top: int = 20) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:top]
    return [{"kernel": e.key[:120], "calls": e.count, "ms": e.device_time_total / 1e3} for e in rows]


def main() -> None:
    from diffusers import AutoencoderKLWan

    from helios.engine.conditioning import LatentCodec
    from helios.model.wan_vae import CONV_IMPLS, UPSAMPLE_IMPLS, autotune_convs

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="vae.json")
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--quick", action="store_true",
                    help="only the reference, the default tuned graph, the implicit-GEMM convolution (alone and "
                         "fused with the norm after it) and cuDNN's own searches (its top 10 algorithms, then all "
                         "of them), not each development step")
    args = ap.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda").eval()
    shape = (1, 16, 9, args.height // 8, args.width // 8)
    z = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "latents": list(shape)}
    exact = LatentCodec(vae).decode_reference(z).float()  # diffusers, float32
    codec = LatentCodec(vae.to(torch.bfloat16))
    z_raw = codec._vae_latents(z)  # what the decoder itself sees

    def record(name, fn):
        torch.cuda.reset_peak_memory_stats()
        out = fn().float()
        res[name] = {"s": cuda_time(fn, warmup=2, iters=5), "rel_error_vs_fp32": rel(out, exact),
                     "max_abs_vs_fp32": (out - exact).abs().max().item(),
                     "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        print(name, json.dumps(res[name]), flush=True)
        save()

    def save():  # after every measurement, so a run cut short keeps what it measured
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f, indent=2)
        os.replace(args.out + ".tmp", args.out)

    record("diffusers", lambda: codec.decode_reference(z))
    if args.quick:
        quick(codec, shape, z, res, record, save)
        return
    record("ours-eager", lambda: codec.decode(z))
    decoder = codec.decoder
    decoder.channels_last_()
    record("ours-channels-last", lambda: codec.decode(z))
    # what each step brings, same run: the 2026-12-02 choices (cuDNN 3-D or per-tap 2-D, materialised
    # upsampling, biases added by cuDNN's separate pass), then biases deferred into the fused norms, then the
    # per-tap sums too, then the folded taps, then the phase convolution, then (the default) the padded
    # output convolution
    old = {"conv3d", "taps", "upsample"}
    steps = [("ours-tuned-v1", old, False, False), ("ours-tuned-v1+deferred-biases", old, True, False),
             ("ours-tuned-v1+deferred-biases+tap-sums", old, True, True),
             ("ours-tuned+folded-taps", old | {"folded"}, True, True),
             ("ours-tuned+folded-taps+phase-conv", old | {"folded", "phase"}, True, True)]
    for name, impls, biases, tap_sums in steps:
        decoder.defer_biases, decoder.defer_tap_sums = biases, tap_sums
        autotune_convs(decoder, z_raw, impls)
        record(name, lambda: codec.decode(z))
    res["conv_timings_ms"] = codec.fast_decode_(shape, graphs=False)
    res["chosen"] = {impl: sum(t["chosen"] == impl for t in res["conv_timings_ms"].values())
                     for impl in sorted({t["chosen"] for t in res["conv_timings_ms"].values()})}
    record("ours-tuned", lambda: codec.decode(z))
    res["profile_tuned"] = profile(lambda: codec.decode(z))
    # not tuned by default yet (wan_vae.NOT_TUNED_BY_DEFAULT): the gathered output convolution
    res["conv_timings_with_gather_ms"] = autotune_convs(decoder, z_raw, set(CONV_IMPLS) | set(UPSAMPLE_IMPLS))
    record("ours-tuned+gather-out", lambda: codec.decode(z))
    codec.fast_decode_(shape, graphs=False)  # back to the default choices
    codec.fast_decode_(None, graphs=True)  # keeps the tuned choices
    record("ours-tuned-graph", lambda: codec.decode(z))
    igemm(codec, shape, z, z_raw, res, record)
    first, rest = codec.decode_parts(z)
    res["parts_vs_whole_max_abs"] = (torch.cat([first, rest], 2).float() - codec.decode(z).float()).abs().max().item()
    res["first_frame_s"] = cuda_time(lambda: next(iter(codec.decode_parts(z))), warmup=1, iters=5)
    # not the default: cuDNN's own search over its algorithms for every convolution shape, then tuned again
    torch.backends.cudnn.benchmark = True
    res["conv_timings_cudnn_benchmark_ms"] = codec.fast_decode_(shape, graphs=True)
    record("ours-tuned-graph+cudnn-benchmark", lambda: codec.decode(z))
    torch.backends.cudnn.benchmark = False
    save()


def igemm(codec, shape, z, z_raw, res: dict, record) -> None:
    """Not tuned by default yet: the implicit-GEMM convolution (`igemm`, every output channel of a position in one
    Triton program) as one more candidate, then each residual block's conv1 with the norm2 + SiLU after it fused
    into it, then conv2 with the next norm too; each as a CUDA graph, and back to the default choices after."""
    from helios.model.wan_vae import CONV_IMPLS, UPSAMPLE_IMPLS, autotune_convs

    decoder = codec.decoder
    res["conv_timings_with_igemm_ms"] = autotune_convs(decoder, z_raw, set(CONV_IMPLS) | set(UPSAMPLE_IMPLS))
    codec.fast_decode_(None, graphs=True)
    record("ours-tuned-graph+igemm", lambda: codec.decode(z))
    for convs in (("conv1",), ("conv1", "conv2")):
        name = "+".join(convs)
        res[f"fused_{name}"] = decoder.fuse_conv_norms_(convs)
        res[f"conv_timings_fused_{name}_ms"] = autotune_convs(decoder, z_raw, set(CONV_IMPLS) | set(UPSAMPLE_IMPLS))
        codec.fast_decode_(None, graphs=True)
        record(f"ours-tuned-graph+igemm+fused-{name}-norm", lambda: codec.decode(z))
    res["profile_fused_conv_norms"] = profile(lambda: codec.decode(z))
    decoder.fuse_conv_norms_(())
    codec.fast_decode_(shape, graphs=True)  # the default choices again


def quick(codec, shape, z, res: dict, record, save) -> None:
    """The default fast path (tuned, graphed), then the same tuned again under cuDNN's benchmark mode: first
    its default search (the heuristics' top 10 algorithms per shape), then every algorithm it has
    (`benchmark_limit = 0`), for a better kernel for the 96-channel full-resolution convolutions."""
    res["conv_timings_ms"] = codec.fast_decode_(shape, graphs=True)
    record("ours-tuned-graph", lambda: codec.decode(z))
    igemm(codec, shape, z, codec._vae_latents(z), res, record)
    save()
    limit = torch.backends.cudnn.benchmark_limit
    try:
        torch.backends.cudnn.benchmark = True
        for name, n in (("ours-tuned-graph+cudnn-benchmark", limit), ("ours-tuned-graph+cudnn-benchmark-all", 0)):
            torch.backends.cudnn.benchmark_limit = n
            res[f"conv_timings_{name}_ms"] = codec.fast_decode_(shape, graphs=True)
            record(name, lambda: codec.decode(z))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit = False, limit
    save()


if __name__ == "__main__":
    main()
