"""End-to-end speed of 14B Helios-Distilled generation on one GPU: ours against the diffusers reference.

Both sides get the same work: the default 14B transformer with random bf16 weights made on the GPU,
the default Wan VAE (random weights), random prompt embeddings of the real shape (1, 512, 4096),
384x640, pyramid 2/2/2 with the DMD scheduler, no CFG, amplified first chunk (the official script).
Ours runs its default optimized engine path (`pipe.optimize()`, as `helios generate` on CUDA: compiled
blocks, each forward replayed as a CUDA graph, and each chunk's VAE decode overlapped with the next
chunk's denoising; then `HeliosVideoPipeline.stream`, frames handed over as uint8 on the host);
`ours-no-overlap` is the same with the decode after the denoising and `ours-no-graphs` the same with
the forwards launched kernel by kernel, for each one's effect in one run; `-inline` configs queue the decode in
line between the chunks' denoising on one stream (`optimize(decode_beside=False)`). Ours picks its attention as
`load_pipeline` does (FlashAttention-4 first on Hopper where `flash-attn-4` is installed); a config ending in
`-no-fa4` keeps cuDNN's, for the A/B in one process. The reference runs
`HeliosPyramidPipeline` with tensor output.

Seconds per chunk = (time for 165 frames - time for 33 frames) / 4, after warm-up (as in
shared/reference/anchors.md). Writes a JSON and appends rows to benchmarks/RESULTS.md.

    python benchmarks/bench_e2e.py --configs ours,ours-no-overlap,ours-fp8 --out result.json
    python benchmarks/bench_e2e.py --configs reference-eager,reference-compiled --out ref.json
    python benchmarks/bench_e2e.py --configs ours-111,ours-111-no-fa4,reference-compiled --ref-steps 111 --out fa4.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import time
from pathlib import Path

import torch

from probe_transformer import cuda_time, timeline_table  # same folder

HEIGHT, WIDTH = 384, 640
STEPS = (2, 2, 2)
EMB_SHAPE = (1, 512, 4096)
MATMUL_TFLOPS, ATTN_TFLOPS = 754.0, 580.0  # measured ceilings on one H100 (anchors.md)


def sync() -> None:
    torch.cuda.synchronize()


def chunk_flops(noisy_latent_hw=(48, 80), steps=STEPS, history_tokens=2400, d=5120, ffn=13824, layers=40,
                text=512) -> tuple[float, float]:
    """(matmul, attention) FLOPs of one distilled chunk: every stage's forwards at its token count."""
    lin = att = 0.0
    h, w = noisy_latent_hw
    for k, n_steps in enumerate(steps):
        f = 2 ** (len(steps) - 1 - k)
        n = 9 * (h // f) * (w // f) // 4
        L = n + history_tokens
        lin += n_steps * 2 * layers * (L * (4 * d * d + 2 * d * ffn) + n * 2 * d * d)
        att += n_steps * layers * (4 * L * L * d + 4 * n * text * d)
    return lin, att


class FixedPrompt:
    """Random prompt embeddings of the umT5 shape, standing in for the text encoder (run once per prompt)."""

    def __init__(self, device):
        g = torch.Generator(device=device).manual_seed(1)
        self.emb = torch.randn(EMB_SHAPE, device=device, generator=g) * 0.1

    def __call__(self, prompt, dtype=None):
        return self.emb.to(dtype) if dtype else self.emb


def build_ours(fp8: bool, compile: bool, overlap: bool = True, graphs: bool = True, deterministic: bool = False,
               fa4: bool | None = None, beside: bool = True):
    """The 14B distilled engine on random weights, as `load_pipeline` sets it up (its attention backends too:
    FlashAttention-4 first on Hopper where installed; fa4=False: without it)."""
    from diffusers import AutoencoderKLWan, HeliosDMDScheduler

    from helios.model.backends import configure_device

    from helios.engine.components import Components
    from helios.engine.pipeline import HeliosVideoPipeline
    from helios.model.config import HeliosConfig
    from helios.model.transformer import build_transformer

    dev = torch.device("cuda")
    configure_device(dev, fa4=fa4)
    torch.manual_seed(0)
    transformer = build_transformer(HeliosConfig(), device=dev, dtype=torch.bfloat16).eval().requires_grad_(False)
    vae = AutoencoderKLWan().to(dev, torch.bfloat16).eval()
    sched = {"_class_name": "HeliosDMDScheduler",  # .config lacks it; load_scheduler needs it
             **HeliosDMDScheduler(use_dynamic_shifting=True, time_shift_type="linear").config}
    comps = Components(transformer, vae, None, None, sched, "HeliosPyramidPipeline", {"is_distilled": True})
    pipe = HeliosVideoPipeline(comps, prompt_encoder=FixedPrompt(dev))
    return pipe.optimize(compile=compile, fp8=fp8, overlap_decode=overlap, cuda_graphs=graphs,
                         deterministic=deterministic, decode_beside=beside)


def run_ours(pipe, frames: int, seed: int = 0, steps=STEPS, fast_start: bool = False):
    t0 = time.perf_counter()
    first = None
    chunks = []
    for c in pipe.stream("benchmark", num_frames=frames, height=HEIGHT, width=WIDTH, settings="distilled",
                         steps=list(steps), seed=seed, amplify_first_chunk=False if fast_start else None,
                         first_frame_early=fast_start):  # --fast-start
        if first is None:
            first = time.perf_counter() - t0
        chunks.append(c)
    return time.perf_counter() - t0, first, chunks


VIDEOS: dict[str, tuple[tuple, torch.Tensor]] = {}  # config -> (sampling, its 165 frames), for frames_vs


def measure_ours(name: str, fp8: bool, compile: bool, res: dict, steps=STEPS, fp8_check: bool = True,
                 overlap: bool = True, graphs: bool = True, fast_start: bool = False,
                 deterministic: bool = False, fa4: bool | None = None, profile: bool = False,
                 beside: bool = True) -> None:
    from helios.model import attention

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe = build_ours(fp8, compile, overlap, graphs, deterministic, fa4, beside)
    sync()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_ours(pipe, 66, steps=steps, fast_start=fast_start)  # compiles every stage size
    sync()
    warmup_s = time.perf_counter() - t0
    t33, first, _ = run_ours(pipe, 33, steps=steps, fast_start=fast_start)
    t165, _, parts = run_ours(pipe, 165, steps=steps, fast_start=fast_start)
    chunks = [c for c in parts if c.complete]  # (fast start hands chunk 0's frame 0 over on its own)
    steady = chunks[1:]
    per_chunk = (t165 - t33) / 4
    out = {
        "steps": list(steps), "fast_start": fast_start, "attention": list(attention._preferred), "overlap_decode": overlap,
        "decode_beside": beside, "build_s": build_s,
        "cuda_graphs": len(pipe.graphs.graphs) if pipe.graphs else 0,  # graphs captured (0: graphs off)
        "graph_failures": dict(pipe.graphs.failed) if pipe.graphs else {},
        "warmup_s": warmup_s,
        "s_per_chunk": per_chunk, "fps": 33 / per_chunk,
        "first_frame_s": first, "t33_s": t33, "t165_s": t165,
        "denoise_s": sum(c.denoise_seconds for c in steady) / len(steady),
        "decode_s": sum(c.decode_seconds for c in steady) / len(steady),
        "first_chunk_denoise_s": chunks[0].denoise_seconds,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "frames_returned": sum(c.frames.shape[0] for c in parts),
    }
    if profile:  # where a chunk's time goes between the forwards, the decode and the GPU waiting
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:  # four chunks alike: none amplified
            for _ in pipe.stream("benchmark", num_frames=132, height=HEIGHT, width=WIDTH, settings="distilled",
                                 steps=list(steps), seed=0, amplify_first_chunk=False):
                pass
            sync()
        out["profile_4_chunks"] = timeline_table(prof, chunks=4)
    # Each optimisation alone, on the warm model (for NOTES.md): decode paths, one stage-2 forward.
    z = torch.randn(1, 16, 9, HEIGHT // 8, WIDTH // 8, device="cuda")
    out["decode_batched_s"] = timed(lambda: pipe.codec.decode(z))
    out["decode_framewise_s"] = timed(lambda: pipe.codec.decode_reference(z))
    # The same 165 frames (same weights, same seed) as each earlier config of the same sampling: what an
    # option changes in the output (CUDA graphs and the overlap should change nothing; five chunks, so that
    # each decode overlaps the next chunk's denoising). Exact only with --deterministic: without it each
    # configuration's own timed kernel choices differ at rounding level.
    video = torch.cat([c.frames for c in parts])
    same = (tuple(steps), fp8, fast_start)
    out["frames_vs"] = {other: {"max_abs": (video.float() - v.float()).abs().max().item(),
                                "mean_abs": (video.float() - v.float()).abs().mean().item()}
                        for other, (k, v) in VIDEOS.items() if k == same}
    VIDEOS[name] = (same, video)
    res[name] = out
    print(name, json.dumps(out), flush=True)
    if fp8 and fp8_check:
        res[name]["error_vs_bf16"] = fp8_error(pipe)
    release(pipe)
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    res[name]["allocated_after_release_gb"] = torch.cuda.memory_allocated() / 1e9


def release(pipe) -> None:
    """Drop what outlives `del pipe`: the captured graphs' memory pools and the compiled code that holds
    the blocks (on an 80 GB card the next config would not fit beside them)."""
    pipe.graphs = None
    pipe.codec.graphed = None
    torch._dynamo.reset()


def timed(fn, iters: int = 3) -> float:
    return cuda_time(fn, warmup=1, iters=iters)


def fp8_error(fp8_pipe) -> dict:
    """Relative error of the FP8 transformer output and PSNR of decoded frames, against bf16, same inputs."""
    ref = build_ours(fp8=False, compile=False)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1, 16, 9, 48, 80, device="cuda", generator=g).bfloat16()
    hist = {"latents_history_short": torch.randn(1, 16, 2, 48, 80, device="cuda", generator=g).bfloat16(),
            "latents_history_mid": torch.randn(1, 16, 2, 48, 80, device="cuda", generator=g).bfloat16(),
            "latents_history_long": torch.randn(1, 16, 16, 48, 80, device="cuda", generator=g).bfloat16()}
    from helios.engine.history import HistoryLayout

    idx = {k: v.cuda() for k, v in HistoryLayout().indices().items()}
    emb = FixedPrompt("cuda").emb.bfloat16()
    with torch.no_grad():
        a = ref.model(x, 500.0, emb, **hist, **idx).sample.float()
        b = fp8_pipe.model(x, 500.0, emb, **hist, **idx).sample.float()
        rel = ((a - b).norm() / a.norm()).item()
        va = torch.cat([c.frames for c in ref.stream("e", num_frames=33, height=HEIGHT, width=WIDTH,
                                                      settings="distilled", seed=3)]).float()
        vb = torch.cat([c.frames for c in fp8_pipe.stream("e", num_frames=33, height=HEIGHT, width=WIDTH,
                                                           settings="distilled", seed=3)]).float()
    mse = ((va - vb) ** 2).mean().item()
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    return {"transformer_rel_error": rel, "frames_psnr_db": 10 * math.log10(255**2 / max(mse, 1e-12))}


def measure_reference(name: str, compile: bool, res: dict, steps_list=(STEPS,)) -> None:
    """The diffusers pipeline at each of `steps_list` (one model, compiled once: the stage shapes are the same)."""
    from diffusers import AutoencoderKLWan, HeliosDMDScheduler, HeliosPyramidPipeline, HeliosTransformer3DModel

    torch.cuda.reset_peak_memory_stats()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        transformer = HeliosTransformer3DModel().eval()
    torch.set_default_dtype(torch.float32)
    vae = AutoencoderKLWan().to(dev, torch.bfloat16 if compile else torch.float32).eval()
    sched = HeliosDMDScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    pipe = HeliosPyramidPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched,
                                 transformer=transformer, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    if compile:
        transformer.compile()
    emb = FixedPrompt(dev).emb.bfloat16()

    def call(frames, steps):
        t0 = time.perf_counter()
        pipe(prompt_embeds=emb, height=HEIGHT, width=WIDTH, num_frames=frames, guidance_scale=1.0,
             pyramid_num_inference_steps_list=list(steps), is_amplify_first_chunk=True, output_type="pt",
             generator=torch.Generator(device=dev).manual_seed(0))
        sync()
        return time.perf_counter() - t0

    for steps in steps_list:
        key = name if tuple(steps) == STEPS else f"{name}-{''.join(map(str, steps))}"
        t0 = time.perf_counter()
        call(66, steps)
        warmup = time.perf_counter() - t0
        t33 = call(33, steps)
        t165 = call(165, steps)
        per = (t165 - t33) / 4
        res[key] = {"steps": list(steps), "warmup_s": warmup, "t33_s": t33, "t165_s": t165, "s_per_chunk": per,
                    "fps": 33 / per, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        print(key, json.dumps(res[key]), flush=True)
    torch.cuda.empty_cache()
    z = torch.randn(1, 16, 9, HEIGHT // 8, WIDTH // 8, device=dev, dtype=vae.dtype)
    try:
        res[key]["vae_decode_s"] = timed(lambda: vae.decode(z))
    except torch.OutOfMemoryError as e:  # keep the end-to-end numbers even if the lone decode does not fit
        res[key]["vae_decode_s"] = f"out of memory: {str(e)[:120]}"
    print(key, json.dumps(res[key]), flush=True)
    del pipe, transformer, vae
    torch._dynamo.reset()  # the compiled code holds the transformer
    gc.collect()
    torch.cuda.empty_cache()


def append_results(res: dict, path: Path) -> None:
    """Add a row per measured config at the end of the file's first table (other tables follow it)."""
    rows = []
    for name, r in res.items():
        if not isinstance(r, dict) or "s_per_chunk" not in r:
            continue
        lin, att = chunk_flops(steps=tuple(r.get("steps", STEPS)))
        fl = lin / ((1382.0 if "fp8" in name else MATMUL_TFLOPS) * 1e12) + att / (ATTN_TFLOPS * 1e12)
        rows.append(f"| {res['date']} | {res['gpu']} | {res['torch']} | {name} | {r['s_per_chunk']:.3f} | "
                    f"{r['fps']:.2f} | {_num(r.get('denoise_s'))} | {_num(r.get('decode_s', r.get('vae_decode_s')))} | "
                    f"{_num(r.get('first_frame_s'), 2)} | {r['warmup_s']:.0f} | {r['peak_gb']:.1f} | "
                    f"{fl:.3f} ({100 * fl / r['s_per_chunk']:.0f}%) |")
    if not path.exists():
        path.write_text("# Benchmark results\n\nEnd-to-end 14B Helios-Distilled at 384x640, pyramid 2/2/2, no CFG, "
                        "amplified first chunk; s/chunk = (t(165 frames) - t(33 frames)) / 4 after warm-up. "
                        "Written by benchmarks/bench_e2e.py.\n\n"
                        "| date | GPU | torch | config | s/chunk | frames/s | denoise s | decode s | first frame s "
                        "| warm-up s | peak GB | transformer floor s (% of chunk) |\n"
                        "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = path.read_text().splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    last = table[0]
    while last + 1 < len(lines) and lines[last + 1].startswith("|"):
        last += 1
    path.write_text("\n".join(lines[:last + 1] + rows + lines[last + 1:]) + "\n")


def _num(v, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


# Our configurations: the engine's default path with these options.
OURS = {
    "ours": dict(fp8=False, compile=True),
    "ours-no-overlap": dict(fp8=False, compile=True, overlap=False),  # decode after denoising: the overlap's effect
    "ours-no-graphs": dict(fp8=False, compile=True, graphs=False),  # forwards launched kernel by kernel
    "ours-111-no-graphs": dict(fp8=False, compile=True, steps=(1, 1, 1), graphs=False),
    "ours-111-no-overlap": dict(fp8=False, compile=True, steps=(1, 1, 1), overlap=False),
    # the decode in line between the chunks' denoising, the host still a chunk ahead: no sharing, no idle GPU
    "ours-inline": dict(fp8=False, compile=True, beside=False),
    "ours-111-inline": dict(fp8=False, compile=True, steps=(1, 1, 1), beside=False),
    "ours-fp8-111-inline": dict(fp8=True, compile=True, steps=(1, 1, 1), fp8_check=False, beside=False),
    "ours-eager": dict(fp8=False, compile=False),
    "ours-fp8": dict(fp8=True, compile=True),
    "ours-111": dict(fp8=False, compile=True, steps=(1, 1, 1)),  # the paper's 3-step setting
    "ours-fp8-111": dict(fp8=True, compile=True, steps=(1, 1, 1), fp8_check=False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="ours,ours-no-overlap,ours-fp8,reference-eager")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--ref-steps", default="222", help="the reference's pyramid steps, e.g. 111,222")
    ap.add_argument("--results-md", default=str(Path(__file__).parent / "RESULTS.md"))
    ap.add_argument("--deterministic", action="store_true",
                    help="kernel choices that do not depend on timing (helios.runtime.use_deterministic_kernels), "
                         "so that frames_vs compares what the options change and nothing else")
    ap.add_argument("--profile", action="store_true",
                    help="ours: also profile a 4-chunk run after the timed ones (GPU busy and idle time per chunk, "
                         "per stream and kernel category; the profiler slows it, so its times are not the timed ones)")
    args = ap.parse_args()
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": datetime.date.today().isoformat(), "deterministic": args.deterministic}
    if args.deterministic:
        from helios.runtime import use_deterministic_kernels

        use_deterministic_kernels()
    lin, att = chunk_flops()
    res["chunk_tflop"] = {"matmul": lin / 1e12, "attention": att / 1e12}
    for name in args.configs.split(","):
        base, no_fa4 = (name[:-len("-no-fa4")], True) if name.endswith("-no-fa4") else (name, False)
        base, fast_start = (base[:-len("-fast-start")], True) if base.endswith("-fast-start") else (base, False)
        if base in OURS:  # "-fast-start": first chunk not amplified, its frame 0 handed over before the rest;
            # "-no-fa4": cuDNN attention even where FlashAttention-4 is installed
            measure_ours(name, res=res, fast_start=fast_start, deterministic=args.deterministic,
                         fa4=False if no_fa4 else None, profile=args.profile, **OURS[base])
        elif name in ("reference-eager", "reference-compiled"):
            steps_list = [tuple(int(c) for c in s) for s in args.ref_steps.split(",")]
            measure_reference(name, compile=name.endswith("compiled"), res=res, steps_list=steps_list)
        else:
            raise SystemExit(f"unknown config {name} (ours: {', '.join(OURS)}, each also with -fast-start and/or "
                             "-no-fa4 (in that order); "
                             "reference-eager, reference-compiled)")
        Path(args.out).write_text(json.dumps(res, indent=2))
    append_results(res, Path(args.results_md))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
