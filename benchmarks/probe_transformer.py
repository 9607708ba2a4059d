"""Probe: per-forward times of the 14B transformer at the distilled pyramid's three stage sizes.

Not the end-to-end benchmark (benchmarks/bench_e2e.py is): this measures where the time goes, for
benchmarks/NOTES.md. Ours (eager, regional torch.compile, attention backends) and the diffusers
reference (eager), random bf16 weights made on the GPU, and the Wan VAE decode of one chunk
(alone, and overlapped with a transformer forward on another stream).

    python benchmarks/probe_transformer.py --out results.json
    python benchmarks/probe_transformer.py --glue --out glue.json   # the optimize() path's kernel breakdown
    python benchmarks/probe_transformer.py --attention-kernels --out attn.json  # cuDNN plans, FlashAttention-4
    python benchmarks/probe_transformer.py --gemm-shapes --out gemm.json        # the block GEMMs per stage, clocks

`--glue` profiles the forwards of one 1/1/1 chunk as `optimize()` runs them (fused projections, compiled
blocks, CUDA graphs): per-stage times, each stage's kernels by category (GEMM, attention, fused elementwise,
copies), and the attention backends and FP8 attention at the stages' sequence lengths.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from helios.model.attention import attention, set_attention_backends
from helios.model.config import HeliosConfig
from helios.model.transformer import build_transformer

H, W = 48, 80  # latent size at 384x640
STAGES = {"stage0": (12, 20), "stage1": (24, 40), "stage2": (48, 80)}
# tokens per forward: 9 latent frames of 2x2 patches + the 2400 history tokens
STAGE_LENGTHS = {k: 9 * h * w // 4 + 2400 for k, (h, w) in STAGES.items()}


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


def kernel_category(name: str) -> str:
    n = name.lower()
    if n.startswith("triton"):
        return "triton"
    if any(k in n for k in ("sdpa", "fmha", "flash", "attention")):
        return "attention"
    if any(k in n for k in ("conv", "fprop", "dgrad", "wgrad")):  # cuDNN's and cuBLAS's convolution kernels
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "wgmma")):
        return "gemm"
    if any(k in n for k in ("copy", "memcpy", "memset", "cat", "fill")):
        return "copy"
    return "other"


def kernel_table(prof) -> dict:
    """Kernel time of a profiled region: by category and the largest kernels by name (ms)."""
    from torch.autograd import DeviceType

    by_name: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            by_name.setdefault(evt.name, []).append(evt.time_range.elapsed_us() / 1000)
    cats: dict[str, float] = {}
    for name, ts in by_name.items():
        cats[kernel_category(name)] = cats.get(kernel_category(name), 0.0) + sum(ts)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:40]
    return {"total_ms": sum(cats.values()), "by_category_ms": cats,
            "top": [{"name": n[:160], "category": kernel_category(n), "ms": sum(ts), "calls": len(ts)}
                    for n, ts in top]}


def timeline_table(prof, chunks: int = 1) -> dict:
    """Where the GPU's time went over a profiled run, across streams: `timeline` of its kernels and copies."""
    from torch.autograd import DeviceType

    return timeline([(e.time_range.start, e.time_range.end, e.device_resource_id, e.name)
                     for e in prof.events() if e.device_type == DeviceType.CUDA], chunks)


def timeline(spans: list[tuple[float, float, int, str]], chunks: int = 1, top: int = 15) -> dict:
    """GPU time of (start_us, end_us, stream, kernel name) spans, in ms, also per chunk over `chunks`.

    busy: the union of the spans on every stream; idle: the window less busy (the GPU waiting on the host);
    concurrent: time two streams ran at once (the streams' sums less busy). Per stream, its time by category
    (`kernel_category`) and its `top` kernels by time."""
    if not spans:
        return {"kernels": 0}
    spans = sorted(spans)
    busy, gaps = 0.0, []
    start, end = spans[0][0], spans[0][1]
    for s, e, _, _ in spans[1:]:
        if s > end:
            busy, start = busy + end - start, s
            gaps.append(s - end)
        end = max(end, e)
    busy += end - start
    window = end - spans[0][0]
    streams: dict[int, dict] = {}
    names: dict[int, dict[str, list[float]]] = {}
    for s, e, stream, name in spans:
        row = streams.setdefault(stream, {"kernels": 0, "ms": 0.0, "by_category_ms": {}})
        cat = kernel_category(name)
        row["kernels"] += 1
        row["ms"] += (e - s) / 1e3
        row["by_category_ms"][cat] = row["by_category_ms"].get(cat, 0.0) + (e - s) / 1e3
        names.setdefault(stream, {}).setdefault(name, []).append((e - s) / 1e3)
    for stream, row in streams.items():
        ranked = sorted(names[stream].items(), key=lambda kv: -sum(kv[1]))[:top]
        row["top"] = [{"name": n[:160], "category": kernel_category(n), "ms": sum(t), "calls": len(t)}
                      for n, t in ranked]
    big = [g for g in gaps if g > 50]
    out = {"kernels": len(spans), "window_ms": window / 1e3, "busy_ms": busy / 1e3, "idle_ms": (window - busy) / 1e3,
           "concurrent_ms": sum(r["ms"] for r in streams.values()) - busy / 1e3,
           "gaps_over_50us": len(big), "idle_in_gaps_over_50us_ms": sum(big) / 1e3,
           "largest_gaps_ms": [g / 1e3 for g in sorted(gaps, reverse=True)[:10]],
           "per_stream": {str(k): v for k, v in streams.items()}}
    out["per_chunk_ms"] = {k: out[k] / chunks for k in ("window_ms", "busy_ms", "idle_ms", "concurrent_ms")}
    return out


def attention_times(dev, lengths: dict[str, int], heads: int = 40, head_dim: int = 128) -> dict:
    """Self-attention at each stage's length: each SDPA backend, and FP8 (cuDNN frontend) with its error."""
    from helios.model.attention import CudnnFp8Attention, cudnn_frontend_available

    out: dict = {"cudnn_frontend": cudnn_frontend_available() or "ok"}
    fp8 = None
    if out["cudnn_frontend"] == "ok":
        try:
            fp8 = CudnnFp8Attention()
            import cudnn
            out["cudnn_backend_version"] = cudnn.backend_version()
        except Exception as e:
            out["cudnn_frontend"] = f"{type(e).__name__}: {e}"[:400]
    g = torch.Generator(device=dev).manual_seed(0)
    for stage, length in lengths.items():
        q, k, v = (torch.randn(1, length, heads, head_dim, device=dev, generator=g, dtype=torch.bfloat16)
                   for _ in range(3))
        flop = 4 * length * length * heads * head_dim
        row: dict = {"length": length}
        ref = attention(q.float(), k.float(), v.float())
        for names in (["cudnn"], ["flash"], ["efficient"]):
            set_attention_backends(names)
            try:
                t = cuda_time(lambda: attention(q, k, v), warmup=3, iters=10)
                row[names[0]] = {"ms": t * 1e3, "tflops": flop / t / 1e12}
            except RuntimeError as e:
                row[names[0]] = f"{type(e).__name__}: {e}"[:200]
        set_attention_backends(["cudnn", "flash", "efficient", "math"])
        bf16 = attention(q, k, v)
        row["bf16_rel_err"] = ((bf16.float() - ref).norm() / ref.norm()).item()
        # contiguous (B, H, L, D) inputs: what the (B, L, H, D) views cost
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            t = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), warmup=3, iters=10)
        row["cudnn_bhld_contiguous"] = {"ms": t * 1e3, "tflops": flop / t / 1e12}
        try:  # does torch's own SDPA take e4m3 inputs?
            torch.nn.functional.scaled_dot_product_attention(*(t.to(torch.float8_e4m3fn) for t in (qt, kt, vt)))
            row["torch_sdpa_fp8"] = "ran"
        except Exception as e:
            row["torch_sdpa_fp8"] = f"{type(e).__name__}: {e}"[:300]
        if fp8 is not None:
            try:
                o = fp8(q, k, v)
                t = cuda_time(lambda: fp8(q, k, v), warmup=3, iters=10)
                row["cudnn_fp8"] = {"ms": t * 1e3, "tflops": flop / t / 1e12,
                                    "rel_err": ((o.float() - ref).norm() / ref.norm()).item()}
                from helios.model.attention import quantize_tensor
                (q8, dq), (k8, dk), (v8, dv) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
                t = cuda_time(lambda: fp8.run_quantized(q8, k8, v8, dq, dk, dv), warmup=3, iters=10)
                row["cudnn_fp8_kernel_only"] = {"ms": t * 1e3, "tflops": flop / t / 1e12}
            except Exception as e:
                row["cudnn_fp8"] = f"{type(e).__name__}: {e}"[:600]
        # v as a strided view of a fused (B, L, 3D) projection, as rope_attention passes it
        qkv = torch.randn(1, length, 3 * heads * head_dim, device=dev, generator=g, dtype=torch.bfloat16)
        vv = qkv[..., 2 * heads * head_dim:].unflatten(-1, (heads, head_dim))
        t = cuda_time(lambda: attention(q, k, vv), warmup=3, iters=10)
        row["cudnn_strided_v"] = {"ms": t * 1e3, "tflops": flop / t / 1e12}
        # cross-attention: the noisy tokens against the 512 text tokens
        lq = length - 2400
        qc = q[:, :lq]
        kc, vc = k[:, :512], v[:, :512]
        cflop = 4 * lq * 512 * heads * head_dim
        for names in (["cudnn"], ["flash"], ["efficient"]):
            set_attention_backends(names)
            try:
                t = cuda_time(lambda: attention(qc, kc, vc), warmup=3, iters=10)
                row[f"cross_{names[0]}"] = {"ms": t * 1e3, "tflops": cflop / t / 1e12}
            except RuntimeError as e:
                row[f"cross_{names[0]}"] = f"{type(e).__name__}: {e}"[:200]
        set_attention_backends(["cudnn", "flash", "efficient", "math"])
        out[stage] = row
        print("attention", stage, row, flush=True)
    return out


def _frontend_sdpa_plans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """cuDNN's bf16 attention through its Python frontend, every execution plan its heuristics offer:
    [(plan name, run())], run() writing into one output; PyTorch's cuDNN path runs the first plan only."""
    import cudnn

    handle = cudnn.create_handle()
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)

    def bhsd(name: str, t: torch.Tensor):  # (B, L, H, D) memory seen as (B, H, L, D)
        b, s, h, d = t.shape
        return graph.tensor(name=name, dim=[b, h, s, d], stride=[s * h * d, d, h * d, 1],
                            data_type=cudnn.data_type.BFLOAT16)

    tq, tk, tv = bhsd("q", q), bhsd("k", k), bhsd("v", v)
    try:
        o, _ = graph.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=False, attn_scale=q.shape[-1] ** -0.5,
                          use_causal_mask=False)
    except TypeError:  # older frontends spell it is_inference
        o, _ = graph.sdpa(name="sdpa", q=tq, k=tk, v=tv, is_inference=True, attn_scale=q.shape[-1] ** -0.5,
                          use_causal_mask=False)
    b, s, h, d = q.shape
    o.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1])
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    out = torch.empty_like(q)
    plans = []
    for i in range(graph.get_execution_plan_count()):
        try:
            graph.build_plan_at_index(i)
            ws = torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=q.device)
            name = graph.get_plan_name_at_index(i)
        except Exception as e:  # a plan that does not build for this shape
            plans.append((f"plan{i}: {type(e).__name__}: {e}"[:200], None))
            continue

        def run(i=i, ws=ws):
            cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
            graph.execute_plan_at_index({tq: q, tk: k, tv: v, o: out}, ws, i, handle=handle)
            return out
        plans.append((f"plan{i}:{name}", run))
    return plans


# The block's GEMMs as (name, N, K) for M tokens: fused q/k/v, the attention output, the cross-attention's query
# and output (its keys and values come from the text, once per prompt), the feed-forward's two.
BLOCK_GEMMS = (("qkv", 3 * 5120, 5120), ("out", 5120, 5120), ("cross_q", 5120, 5120), ("cross_out", 5120, 5120),
               ("ffn_up", 13824, 5120), ("ffn_down", 5120, 13824))


def clock_and_power(dev) -> dict:
    """The SM clock (MHz) and board power (W) now: NVML through torch, else nvidia-smi."""
    try:
        return {"sm_clock_mhz": torch.cuda.clock_rate(dev), "power_w": torch.cuda.power_draw(dev) / 1e3}
    except Exception:  # torch reads NVML through nvidia-ml-py, which may be absent
        import subprocess

        try:
            line = subprocess.run(["nvidia-smi", "-i", str(dev.index or 0), "--query-gpu=clocks.sm,power.draw",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
            clock, power = (float(v) for v in line.strip().split(",")[:2])
            return {"sm_clock_mhz": clock, "power_w": power}
        except Exception as e:
            return {"clock": f"{type(e).__name__}: {e}"[:120]}


def gemm_shapes(dev, lengths: dict[str, int], seconds: float = 1.0) -> dict:
    """Each block GEMM alone at each stage's token count, bf16 with bias (as the model's Linear): TFLOP/s, and
    the same with its rows in two halves (the same numbers per row, another kernel choice), with the SM clock
    and board power read while it runs (`torch.cuda.clock_rate`, `power_draw`): is a stage's lower GEMM rate
    the kernel chosen for its shape, or the card slowing under sustained load?"""
    import torch.nn.functional as F

    def probe(fn, flop):
        t = cuda_time(fn, warmup=3, iters=10)
        reps = max(1, int(seconds / t))
        start = time.perf_counter()
        for _ in range(reps):  # sustained, for the clock and power reading at its end
            fn()
        torch.cuda.synchronize()
        row = {"ms": t * 1e3, "tflops": flop / t / 1e12, "sustained_tflops": flop * reps / (time.perf_counter() - start) / 1e12}
        row.update(clock_and_power(dev))
        return row

    g = torch.Generator(device=dev).manual_seed(0)
    out: dict = {}
    for stage, m in lengths.items():
        for name, n, k in BLOCK_GEMMS:
            x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) / k**0.5
            b = torch.randn(n, device=dev, generator=g, dtype=torch.bfloat16)
            flop = 2 * m * n * k
            half = m // 2
            out[f"{stage}_{name}"] = {"m": m, "n": n, "k": k, "whole": probe(lambda: F.linear(x, w, b), flop),
                                      "halves": probe(lambda: (F.linear(x[:half], w, b), F.linear(x[half:], w, b)),
                                                      flop)}
            print(stage, name, {h: round(out[f"{stage}_{name}"][h]["tflops"]) for h in ("whole", "halves")},
                  flush=True)
    return out


def attention_kernel_candidates(dev, lengths: dict[str, int], heads: int = 40, head_dim: int = 128) -> dict:
    """Self-attention kernels that could replace PyTorch's cuDNN path, at each stage's length (and the last
    block's noisy-rows-only queries): every plan of cuDNN's frontend, and FlashAttention-4's Hopper forward
    (`flash_attn.cute`) where it is installed, each with its error against a float32 reference."""
    out: dict = {}
    try:
        from flash_attn.cute.interface import flash_attn_func as fa4
        out["fa4"] = "ok"
    except Exception as e:
        fa4, out["fa4"] = None, f"{type(e).__name__}: {e}"[:300]
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = dict(lengths)
    shapes["stage2_last_block"] = (lengths["stage2"] - 2400, lengths["stage2"])
    for stage, length in shapes.items():
        lq, lk = length if isinstance(length, tuple) else (length, length)
        q = torch.randn(1, lq, heads, head_dim, device=dev, generator=g, dtype=torch.bfloat16)
        k, v = (torch.randn(1, lk, heads, head_dim, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2))
        flop = 4 * lq * lk * heads * head_dim
        rows = q[:, :2048].float()  # the error is checked on the first 2048 queries
        ref = torch.nn.functional.scaled_dot_product_attention(
            rows.transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)

        def score(fn) -> dict:
            res = fn()
            res = res[0] if isinstance(res, tuple) else res
            err = ((res[:, :2048].float() - ref).norm() / ref.norm()).item()
            t = cuda_time(fn, warmup=3, iters=10)
            return {"ms": t * 1e3, "tflops": flop / t / 1e12, "rel_err": err}

        row: dict = {"lq": lq, "lk": lk}
        set_attention_backends(["cudnn"])
        row["torch_cudnn"] = score(lambda: attention(q, k, v))
        set_attention_backends(["cudnn", "flash", "efficient", "math"])
        try:
            for name, run in _frontend_sdpa_plans(q, k, v):
                row[f"frontend_{name}"] = score(run) if run is not None else "did not build"
        except Exception as e:
            row["frontend"] = f"{type(e).__name__}: {e}"[:300]
        if fa4 is not None:  # its own heuristics' tiles ("default")
            try:
                row["fa4_default"] = score(lambda: fa4(q, k, v))
            except Exception as e:
                row["fa4_default"] = f"{type(e).__name__}: {e}"[:300]
        out[stage] = row
        print("attention-kernels", stage, json.dumps(row), flush=True)
    return out


def gemm_epilogue_times(dev, m: int, d: int = 5120, ffn: int = 13824) -> dict:
    """The FFN's up projection + tanh-GELU: separate (compiled) against cuBLASLt's GELU epilogue."""
    import torch.nn.functional as F

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, d, device=dev, generator=g, dtype=torch.bfloat16)
    w = torch.randn(ffn, d, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    b = torch.randn(ffn, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    sep = torch.compile(lambda x: F.gelu(F.linear(x, w, b), approximate="tanh"))
    fused = lambda x: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    res = {"m": m}
    for name, fn in (("linear_then_gelu", sep), ("addmm_gelu_epilogue", fused),
                     ("linear_only", lambda x: F.linear(x, w, b))):
        t = cuda_time(lambda: fn(x), warmup=3, iters=10)
        res[name] = {"ms": t * 1e3, "tflops": 2 * m * d * ffn / t / 1e12}
        if name != "linear_only":
            res[name]["rel_err"] = ((fn(x).float() - ref).norm() / ref.norm()).item()
    # which GELU the epilogue applies: float32 GEMM, so the tanh/erf difference (~1e-4) is visible
    xf, wf, bf = x.float()[:256], w.float(), b.float()
    yf = torch._addmm_activation(bf, xf, wf.t(), use_gelu=True)
    lin = F.linear(xf, wf, bf)
    res["float32_epilogue_vs_tanh"] = (yf - F.gelu(lin, approximate="tanh")).abs().max().item()
    res["float32_epilogue_vs_erf"] = (yf - F.gelu(lin)).abs().max().item()
    return res


def glue_probe(args) -> None:
    """Profile one 1/1/1 chunk's three forwards on the optimize() path; write the breakdown to args.out."""
    from helios.model.graphs import GraphedForward

    dev, dtype = torch.device("cuda"), torch.bfloat16
    import triton

    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "cudnn": torch.backends.cudnn.version(), "layers": args.layers, "fp8": args.fp8,
                 "fused_kernels": not args.no_kernels}
    hist, ctx, noisy = inputs(dev, dtype)
    if not args.skip_attention:
        res["attention"] = attention_times(dev, STAGE_LENGTHS)
        res["gemm_gelu"] = gemm_epilogue_times(dev, STAGE_LENGTHS["stage2"])
        print("gemm_gelu", res["gemm_gelu"], flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    set_attention_backends(args.attention.split(","))
    res["attention_backends"] = args.attention
    torch.manual_seed(0)
    model = build_transformer(HeliosConfig(num_layers=args.layers), device=dev, dtype=dtype).eval()
    model.fuse_projections_(kernels=not args.no_kernels)
    if args.fp8:
        from helios.model.fp8 import quantize_blocks_
        quantize_blocks_(model, attention=False if args.no_fp8_attention else None)
        res["fp8_attention"] = model.blocks[0].attn1.fp8_attention
    model.compile_blocks_()
    graphs = GraphedForward(model)
    t500 = torch.tensor([500.0], device=dev)
    stages: dict = {}
    with torch.no_grad():
        text = model.prepare_text(ctx)
        for stage, x in noisy.items():
            layout = model.layout_for(tuple(x.shape), **hist)
            t0 = time.perf_counter()
            graphs(x, t500, text, layout, hist)
            torch.cuda.synchronize()
            row = {"warmup_s": time.perf_counter() - t0}
            row["graphed_s"] = cuda_time(lambda: graphs(x, t500, text, layout, hist), warmup=1, iters=5)
            if args.last_block_ab:  # the same forward with a last block that also computes the history
                model.last_block_noisy_only = False
                every = GraphedForward(model)
                every(x, t500, text, layout, hist)
                row["graphed_last_block_all_tokens_s"] = cuda_time(lambda: every(x, t500, text, layout, hist),
                                                                   warmup=1, iters=5)
                model.last_block_noisy_only = True
                del every
            row["compiled_s"] = cuda_time(lambda: model(x, t500, text, layout=layout, **hist), warmup=1, iters=3)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(x, t500, text, layout=layout, **hist)
                torch.cuda.synchronize()
            row["kernels"] = kernel_table(prof)
            stages[stage] = row
            print(stage, {k: v for k, v in row.items() if k != "kernels"}, row["kernels"]["by_category_ms"],
                  flush=True)
            res["stages"] = stages
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)
    res["chunk_111_graphed_s"] = sum(r["graphed_s"] for r in stages.values())
    if args.last_block_ab:
        res["chunk_111_graphed_last_block_all_tokens_s"] = sum(r["graphed_last_block_all_tokens_s"]
                                                               for r in stages.values())
    res["graph_capture_failures"] = {str(k[0]): v for k, v in graphs.failed.items()}
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print("chunk 1/1/1 graphed", res["chunk_111_graphed_s"], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe.json")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--glue", action="store_true", help="profile the optimize() path (see the module doc)")
    ap.add_argument("--layers", type=int, default=40, help="--glue: transformer blocks (40 in the 14B model)")
    ap.add_argument("--fp8", action="store_true", help="--glue: FP8 matmuls in the blocks")
    ap.add_argument("--no-kernels", action="store_true", help="--glue: without transformer_kernels' fused ops")
    ap.add_argument("--no-fp8-attention", action="store_true", help="--glue --fp8: bf16 attention")
    ap.add_argument("--skip-attention", action="store_true", help="--glue: skip the attention/GEMM timings")
    ap.add_argument("--last-block-ab", action="store_true",
                    help="--glue: also time each forward with a last block that computes every token")
    ap.add_argument("--attention", default="cudnn,flash,efficient,math",
                    help="--glue: the attention backends, in order (e.g. fa4,cudnn,flash,efficient,math)")
    ap.add_argument("--gemm-shapes", action="store_true",
                    help="only the block's GEMMs alone at each stage's token count (see gemm_shapes)")
    ap.add_argument("--attention-kernels", action="store_true",
                    help="only the self-attention kernels that could replace PyTorch's cuDNN path (see "
                         "attention_kernel_candidates)")
    args = ap.parse_args()
    if args.gemm_shapes:
        res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        with torch.no_grad():
            res["gemms"] = gemm_shapes(torch.device("cuda"), STAGE_LENGTHS)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        return
    if args.attention_kernels:
        res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
        with torch.no_grad():
            res["attention_kernels"] = attention_kernel_candidates(torch.device("cuda"), STAGE_LENGTHS)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        return
    if args.glue:
        glue_probe(args)
        return
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
