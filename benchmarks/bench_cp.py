"""Context-parallel inference on N GPUs against one GPU: equality and time per chunk (transformer only).

The 14B configuration with random bf16 weights (made on every rank from one seed, then broadcast
from rank 0 so that all ranks certainly hold the same weights), random prompt embeddings of the real
shape (1, 512, 4096), the engine's history window (16/2/1 + anchor, full-resolution history latents)
and one distilled chunk: pyramid 2/2/2, i.e. two forwards at each of the three stage sizes.

For each frame size: rank 0 times the chunk alone (one GPU, the other ranks wait), then every strategy
runs on all ranks; each forward's output is compared with rank 0's one-GPU output (relative L2 error,
bf16 tolerance) and the chunk is timed (slowest rank). Rows are appended to benchmarks/RESULTS.md.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_cp.py
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_cp.py --sizes 384x640 --strategies ulysses
    # CPU check of everything but the GPUs: gloo, tiny config, float32, nothing appended
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_cp.py --dry-run

NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set by init_distributed before NCCL starts.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from helios.engine.history import HistoryLayout
from helios.model.config import named_config
from helios.model.parallel import disable_context_parallel
from helios.runtime import init_distributed, launched_world_size
from helios.model.transformer import build_transformer

STEPS = (2, 2, 2)  # distilled preset: forwards per pyramid stage, coarsest first
TOLERANCE = 2e-2  # relative L2 error allowed against one GPU in bf16 (float32: 1e-5)
RESULTS = Path(__file__).parent / "RESULTS.md"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_inputs(cfg, height: int, width: int, text_len: int, device: torch.device, dtype: torch.dtype):
    """Text embeddings, history keyword arguments and the noisy latents of each forward of one chunk."""
    g = torch.Generator().manual_seed(0)  # on the CPU: the same values on every rank and device
    h, w = height // 8, width // 8
    layout = HistoryLayout()
    long, mid, short = layout.term_sizes
    hist = {"latents_history_long": torch.randn(1, cfg.in_channels, long, h, w, generator=g),
            "latents_history_mid": torch.randn(1, cfg.in_channels, mid, h, w, generator=g),
            "latents_history_short": torch.randn(1, cfg.in_channels, short + 1, h, w, generator=g)}
    hist = {k: v.to(device, dtype) for k, v in hist.items()}
    hist.update({k: v.to(device) for k, v in layout.indices().items()})
    text = (torch.randn(1, text_len, cfg.text_dim, generator=g) * 0.1).to(device, dtype)
    forwards = []
    ph = cfg.patch_size[1]
    for stage, n in enumerate(STEPS):
        f = 2 ** (len(STEPS) - 1 - stage)
        # Stage latents floored to whole patches: 720x1280 is no multiple of 64, so the engine's 3-stage
        # pyramid refuses it; here its stages are 22x40, 44x80 and 90x160 latents (the last one exact).
        hs, ws = h // f // ph * ph, w // f // ph * ph
        for step in range(n):
            x = torch.randn(1, cfg.in_channels, layout.chunk_frames, hs, ws, generator=g).to(device, dtype)
            t = torch.tensor([1000.0 * (1 - (stage * n + step) / sum(STEPS))], device=device)
            forwards.append((x, t))
    return text, hist, forwards


@torch.no_grad()
def run_chunk(model, text, hist, forwards) -> list[torch.Tensor]:
    ctx = model.prepare_text(text)
    layouts = {}
    outs = []
    for x, t in forwards:
        key = tuple(x.shape)
        if key not in layouts:
            layouts[key] = model.layout_for(key, **hist)
        outs.append(model(x, t, ctx, layout=layouts[key], **hist).sample)
    return outs


def timed(fn, device: torch.device, repeats: int, group_max: bool) -> tuple[float, list[torch.Tensor]]:
    """Median seconds of fn() after one warm-up call (the slowest rank's, with group_max), and its output."""
    out = fn()  # warm-up: kernels, allocator, compile
    times = []
    for _ in range(repeats):
        sync(device)
        if group_max:
            dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        if group_max:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times), out


def relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    return max(((o.double() - r.double()).norm() / r.double().norm()).item() for o, r in zip(outs, refs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=None, help="HxW frame sizes (default 384x640 720x1280)")
    p.add_argument("--strategies", nargs="+", default=["ulysses", "ring"], choices=["ulysses", "ring"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (as the engine does on CUDA)")
    p.add_argument("--dry-run", action="store_true", help="CPU/gloo, tiny config, float32, nothing appended")
    p.add_argument("--results", type=Path, default=None, help=f"markdown file to append to (default {RESULTS})")
    p.add_argument("--allow-one-process", action="store_true",
                   help="run with world size 1: a check of the code path and the one-GPU time, no speedup")
    args = p.parse_args()
    if launched_world_size() < 2 and not args.allow_one_process:
        print("run under torchrun with 2 or more processes, e.g. torchrun --standalone --nproc_per_node 2 "
              "benchmarks/bench_cp.py", file=sys.stderr)
        return 2

    device = init_distributed("cpu" if args.dry_run else "cuda")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.dry_run:
        cfg, dtype, text_len, tol = named_config("tiny"), torch.float32, 16, 1e-5
        sizes = args.sizes or ["64x128", "80x160"]  # 80x160: odd token rows, like 720x1280
        results = args.results
    else:
        cfg, dtype, text_len, tol = named_config("14b"), torch.bfloat16, 512, TOLERANCE
        sizes = args.sizes or ["384x640", "720x1280"]
        results = args.results or RESULTS

    torch.manual_seed(0)
    model = build_transformer(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    for param in model.parameters():  # identical weights on every rank, whatever the RNG does per device
        dist.broadcast(param.data, 0)
    model.fuse_projections_()
    if args.compile:
        model.compile_blocks_()

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    rows = []
    failed = False
    for size in sizes:
        height, width = (int(v) for v in size.split("x"))
        text, hist, forwards = chunk_inputs(cfg, height, width, text_len, device, dtype)
        chunk = functools.partial(run_chunk, model, text, hist, forwards)
        disable_context_parallel(model)
        one_s, refs = 0.0, []
        if rank == 0:  # one GPU; the other ranks wait at the barrier below
            one_s, refs = timed(chunk, device, args.repeats, False)
        dist.barrier()
        for strategy in args.strategies:
            model.enable_context_parallel(strategy=strategy)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            n_s, outs = timed(chunk, device, args.repeats, True)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            if rank == 0:
                err = relative_error(outs, refs)
                ok = err < tol
                failed |= not ok
                tokens = model.layout_for(tuple(forwards[-1][0].shape), **hist)
                row = (f"| {datetime.date.today()} | {world}x {gpu} | {torch.__version__} | {height}x{width} | "
                       f"{tokens.cos.shape[1]} | {strategy} | {'compiled' if args.compile else 'eager'} | "
                       f"{one_s:.3f} | {n_s:.3f} | {one_s / n_s:.2f}x | {err:.1e} ({'ok' if ok else 'FAIL'}) | "
                       f"{peak:.1f} |")
                print(row, flush=True)
                rows.append(row)
        disable_context_parallel(model)
        del refs
    if rank == 0 and results is not None and rows:
        header = ("\n## Context parallel (benchmarks/bench_cp.py)\n\n"
                  "14B, random bf16 weights, one distilled chunk (pyramid 2/2/2, six forwards), transformer "
                  "only; s/chunk is the median of the repeats (slowest rank); error is the largest relative "
                  "L2 error of a forward against one GPU.\n\n"
                  "| date | GPUs | torch | size | tokens (last stage) | strategy | blocks | 1-GPU s/chunk | "
                  "N-GPU s/chunk | speedup | rel. error | peak GB/GPU |\n"
                  "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        text = results.read_text() if results.exists() else ""
        with results.open("a") as f:
            if "## Context parallel" not in text:
                f.write(header)
            f.write("\n".join(rows) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
