"""The tiny preview decoder (TAEHV architecture) against the full Wan VAE decoder: speed and fidelity.

Parts (--parts, comma-separated):
  speed    one chunk (9 latent frames -> 33 frames) at 384x640 on the GPU, bf16: the full decoder on our
           fast path (LatentCodec.fast_decode_: channels-last, tuned convolutions, CUDA graph) against the
           tiny decoder at TAEHV's own widths (taew2_1's layout), eager and as a CUDA graph; random weights
           (the time does not depend on them).
  e2e      end-to-end frames/s of the 14B distilled engine (random weights, as bench_e2e.py), 1/1/1 bf16 and
           FP8, full decoder and tiny decoder in the same run, and the time to the first frame with fast start.
  quality  the bundled model's shipped preview decoder (or --decoder FILE, repeatable) against its full VAE
           on held-out clips (procedural and real, as `helios train-decoder` makes them): PSNR / SSIM per clip
           and per frame of a chunk (--frames-plot PNG draws the curves), and both decoders' time per chunk
           on this machine's CPU (and GPU when there is one).

    python benchmarks/bench_tiny_decoder.py --parts speed,e2e --out tiny.json            # on the GPU
    python benchmarks/bench_tiny_decoder.py --parts quality --out quality.json           # anywhere
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import torch

HEIGHT, WIDTH = 384, 640


def cuda_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of fn() by CUDA events, after warm-up."""
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
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def cpu_ms(fn, iters: int = 3) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[len(times) // 2]


def wan_tiny_decoder(vae_cfg, device, dtype):
    """TinyDecoder at TAEHV's own Wan2.1 layout (taew2_1), random weights, on the VAE's latent statistics."""
    from helios.engine.preview import TinyDecoder
    from helios.model.taehv import TAEHV, TAEHVConfig

    torch.manual_seed(0)
    return TinyDecoder(TAEHV(TAEHVConfig(encoder=False)), vae_cfg.latents_mean, vae_cfg.latents_std,
                       "random taew2_1 layout").to(device, dtype)


class GraphedTiny:
    """The tiny decoder's chunk decode replayed as one CUDA graph (static input and output)."""

    def __init__(self, tiny, z: torch.Tensor):
        self.tiny, self.z = tiny, z.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                tiny.decode(self.z)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = tiny.decode(self.z)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.z.copy_(z)
        self.graph.replay()
        return self.out


def part_speed(res: dict) -> None:
    from diffusers import AutoencoderKLWan

    from helios.engine.conditioning import LatentCodec

    dev, dt = torch.device("cuda"), torch.bfloat16
    z = torch.randn(1, 16, 9, HEIGHT // 8, WIDTH // 8, device=dev)
    torch.manual_seed(0)
    codec = LatentCodec(AutoencoderKLWan().to(dev, dt).eval().requires_grad_(False))
    out = {"full_eager_ms": cuda_ms(lambda: codec.decode(z), iters=5)}
    codec.fast_decode_(tuple(z.shape), graphs=True)
    out["full_fast_ms"] = cuda_ms(lambda: codec.decode(z), iters=10)
    full = codec.decode(z).float()
    vae_cfg = codec.vae.config
    codec = None  # free the full decoder before the tiny one is timed
    gc.collect()
    torch.cuda.empty_cache()
    tiny = wan_tiny_decoder(vae_cfg, dev, dt)
    out["tiny_eager_ms"] = cuda_ms(lambda: tiny.decode(z))  # the default path: contiguous
    graphed = GraphedTiny(tiny, z)
    out["tiny_graph_ms"] = cuda_ms(lambda: graphed(z))
    frames = tiny.decode(z)
    out["frames"] = list(frames.shape)
    assert tuple(frames.shape) == tuple(full.shape), (frames.shape, full.shape)
    out["tiny_graph_equals_eager_max_abs"] = (graphed(z).float() - frames.float()).abs().max().item()
    out["tiny_params"] = sum(p.numel() for p in tiny.taehv.parameters())
    out["speedup_vs_full_fast"] = out["full_fast_ms"] / min(out["tiny_graph_ms"], out["tiny_eager_ms"])
    res["speed"] = out
    print("speed", json.dumps(out), flush=True)


def plain_decode(tiny, z: torch.Tensor) -> torch.Tensor:
    """The decode before the reductions: the published layer order over every frame, trimmed at the end."""
    from helios.model.taehv import run_sequence

    x = run_sequence(tiny.taehv.decoder, tiny._raw(z))[:, tiny.taehv.frames_to_trim:].clamp(0, 1)
    return tiny._frames(x)


def wall_ms(fn, dev: torch.device, warmup: int = 3, iters: int = 20) -> float:
    if dev.type == "cuda":
        return cuda_ms(fn, warmup, iters)
    return cpu_ms(fn, iters)


def part_tiny(res: dict, height: int, width: int) -> None:
    """Old (plain) against new (reduced) tiny decode of one 9-latent chunk, contiguous, and new as a CUDA graph."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    from diffusers import AutoencoderKLWan

    vae_cfg = AutoencoderKLWan().config
    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # this part only: its large workspaces would crowd the e2e part out
    z = torch.randn(1, 16, 9, height // 8, width // 8, device=dev)
    tiny = wan_tiny_decoder(vae_cfg, dev, dt)
    out = {"height": height, "width": width, "dtype": str(dt), "cudnn_benchmark": True,
           "old_contiguous_ms": wall_ms(lambda: plain_decode(tiny, z), dev),
           "new_contiguous_ms": wall_ms(lambda: tiny.decode(z), dev)}
    new = tiny.decode(z).float()
    out["new_vs_old_max_abs"] = (new - plain_decode(tiny, z).float()).abs().max().item()
    if cuda:
        graphed = GraphedTiny(tiny, z)
        out["new_graph_ms"] = cuda_ms(lambda: graphed(z))
        out["new_graph_vs_eager_max_abs"] = (graphed(z).float() - new).abs().max().item()
    out["frames"] = list(new.shape)
    torch.backends.cudnn.benchmark = benchmark_before
    res["tiny"] = out
    print("tiny", json.dumps(out), flush=True)


def part_e2e(res: dict, precisions: tuple[str, ...] = ("bf16", "fp8")) -> None:
    from bench_e2e import build_ours  # same folder: the 14B distilled engine with random weights

    out = {}
    for fp8 in [p == "fp8" for p in precisions]:
        pipe = build_ours(fp8=fp8, compile=True)
        pipe.preview = wan_tiny_decoder(pipe.c.vae.config, pipe.device, pipe.codec.dtype)
        for decoder in ("full", "tiny"):
            def run(frames: int, fast: bool = False):
                t0, first = time.perf_counter(), None
                for c in pipe.stream("benchmark", num_frames=frames, height=HEIGHT, width=WIDTH,
                                     settings="distilled", steps=[1, 1, 1], seed=0, decoder=decoder,
                                     amplify_first_chunk=False if fast else None, first_frame_early=fast):
                    first = first if first is not None else time.perf_counter() - t0
                return time.perf_counter() - t0, first

            run(66)  # compiles and captures every stage size
            torch.cuda.synchronize()
            t33, _ = run(33)
            t165, _ = run(165)
            run(33, fast=True)  # warm the fast-start path (its own stage sizes) before timing it
            torch.cuda.synchronize()
            _, first_fast = run(33, fast=True)
            name = f"{'fp8' if fp8 else 'bf16'}-111-{decoder}"
            out[name] = {"fps": 33 * 4 / (t165 - t33), "s_per_chunk": (t165 - t33) / 4,
                         "first_frame_fast_start_s": first_fast}
            print(name, json.dumps(out[name]), flush=True)
        pipe = None
        gc.collect()
        torch.cuda.empty_cache()
    res["e2e"] = out


def part_quality(res: dict, model: Path, decoders: list[Path] | None = None, frames_plot: Path | None = None) -> None:
    """Held-out PSNR / SSIM (per clip, and per frame of a chunk) of the shipped preview decoder, or of each file
    in `decoders` (the first one's result is res["quality"], the others' res["quality_more"]), on the held-out
    clips that its training made (the test clips' count, seed and real share come from its metadata)."""
    from helios.engine.conditioning import LatentCodec
    from helios.engine.preview import PREVIEW_FILE, PREVIEW_FOLDER, TinyDecoder
    from helios.train.decoder import (CHUNK_LATENTS, DecoderTrainConfig, evaluate, latent_stats, load_vae, make_clips,
                                      plot_frame_psnr, summarize, teacher_pairs)

    vae = load_vae(model)
    codec = LatentCodec(vae)
    index = json.loads((model / "model_index.json").read_text())
    size = tuple(index.get("helios_default_size", (HEIGHT, WIDTH)))
    mean, std = latent_stats(vae.config)
    results, curves = [], {}
    for path in decoders or [model / PREVIEW_FOLDER / PREVIEW_FILE]:
        tiny = TinyDecoder.from_file(path, vae.config)
        meta = _metadata(path)
        trained = json.loads(meta.get("helios_train_config", "{}") or "{}")
        cfg = DecoderTrainConfig(model=model, out=Path("."), train_videos=1,
                                 test_videos=int(trained.get("test_videos", 12)), seed=int(trained.get("seed", 0)),
                                 real_fraction=float(trained.get("real_fraction", 0.5)))
        frames = (CHUNK_LATENTS - 1) * codec.temporal + 1
        clips = make_clips(cfg, size, {"train": frames, "test": frames})["test"]
        pairs = teacher_pairs(codec, clips, lambda: None, cfg.seed)
        rows = evaluate(tiny.taehv, pairs, mean, std, clips)
        z = pairs["latents"][:1]
        out = {"decoder": str(path), "bytes": path.stat().st_size, "size": list(size), "summary": summarize(rows),
               "clips": rows, "train_latents": trained.get("train_latents"), "steps": meta.get("helios_steps"),
               "cpu_threads": torch.get_num_threads(),
               "cpu_full_ms": cpu_ms(lambda: codec.decode(z)), "cpu_tiny_ms": cpu_ms(lambda: tiny.decode(z))}
        if torch.cuda.is_available():
            codec_gpu = LatentCodec(vae.to("cuda"))
            tiny.to("cuda")
            zg = z.to("cuda")
            out["gpu_full_ms"] = cuda_ms(lambda: codec_gpu.decode(zg), iters=10)
            out["gpu_tiny_ms"] = cuda_ms(lambda: tiny.decode(zg))
            vae.to("cpu")
        results.append(out)
        label = f"{path.parent.name}/{path.name}"
        if out["train_latents"] and out["steps"]:
            label += f" ({out['train_latents']}-latent clips, {out['steps']} steps)"
        curves[label] = out["summary"]["all"]["psnr_frames"]
        summary = {k: {m: v for m, v in s.items() if m != "psnr_frames"} for k, s in out["summary"].items()}
        print("quality", path, json.dumps(summary), flush=True)
    res["quality"] = results[0]
    if len(results) > 1:
        res["quality_more"] = results[1:]
    if frames_plot is not None:
        plot_frame_psnr(curves, frames_plot, target=28.0)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="speed,e2e")
    ap.add_argument("--model", default=None, help="model folder for the quality part (default: the bundled one)")
    ap.add_argument("--decoder", action="append", type=Path, default=None,
                    help="quality part: a decoder file to score (repeatable; default: the model's own)")
    ap.add_argument("--frames-plot", type=Path, default=None,
                    help="quality part: plot the held-out PSNR per frame of a chunk of each decoder here")
    ap.add_argument("--out", default="tiny_decoder.json")
    ap.add_argument("--e2e-precisions", default="bf16,fp8", help="e2e part: which engines to build (bf16, fp8)")
    ap.add_argument("--height", type=int, default=HEIGHT, help="frame size for the tiny part")
    ap.add_argument("--width", type=int, default=WIDTH)
    args = ap.parse_args()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    precisions = tuple(p.strip() for p in args.e2e_precisions.split(",") if p.strip())
    if not precisions or set(precisions) - {"bf16", "fp8"}:
        raise SystemExit(f"--e2e-precisions {args.e2e_precisions!r}: give bf16, fp8 or both, comma-separated")
    for part in parts:
        if part in ("speed", "e2e") and not torch.cuda.is_available():
            raise SystemExit(f"the {part} part needs a CUDA GPU")
    with torch.no_grad():
        for part in parts:
            if part == "speed":
                part_speed(res)
            elif part == "tiny":
                part_tiny(res, args.height, args.width)
            elif part == "e2e":
                part_e2e(res, precisions)
            elif part == "quality":
                from helios.cli import default_model

                part_quality(res, Path(args.model) if args.model else default_model(), args.decoder, args.frames_plot)
            else:
                raise SystemExit(f"unknown part {part!r}: speed, tiny, e2e or quality")
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")  # what is done survives a later part's failure
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
