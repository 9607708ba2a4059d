"""Where a memory plan's first chunk parts from the unconstrained FP8 engine's (issue 23's "frames equal").

Each variant loads the 14B random-weight folder of `bench_memory.py` in its own process, deterministic, and
generates the same one chunk (fixed prompt embeddings, seed 3) as `bench_memory.py`'s compare step, recording
the first three transformer calls (their inputs and outputs). Then it runs the last recorded call's forward again
with the blocks compiled (no graph) and with every block eager, keeping the patch embedding's and some blocks'
outputs. The parent compares every record against the first variant's and prints the largest differences:
the first record that differs names the step that changed the numbers.

    python benchmarks/probe_plan_numerics.py --out probe.json                        # on the GPU, ~4 min
    python benchmarks/probe_plan_numerics.py --variants fp8,24gb --out probe.json
    python benchmarks/probe_plan_numerics.py --kernels 3 --out kernels.json         # ~1 min

--own-caches: each process compiles from scratch into an Inductor and a Triton cache of its own, and the report
lists the generated kernels (their files are named by their source's hash) that one process made and the other
did not, and the autotuning choices (`.best_config`) that differ: code, or launch configs, or neither.

PROBE_DETERMINISTIC_ALGORITHMS=1 (environment): each variant also turns on torch.use_deterministic_algorithms
(warn only; Inductor filters its reduction configs on it too) before loading.

--kernels N: the stage-2 forward's kernels alone (cuDNN FP8 attention, the fused q/k/v norm + RoPE + FP8
attention op, FP8 matmuls, the GELU + quantisation pass, bf16 cross-attention) on fixed random inputs, in N
processes: each op runs twice per process, once on memory the allocator last held as zeros and once as NaN
(a kernel that reads memory it did not write shows it), and the parent compares the processes' outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {  # name: (memory budget or None, GPU capped to the budget, expandable segments forced on)
    "fp8": (None, False, False),
    "fp8-expandable": (None, False, True),
    "24gb": ("24gb", True, False),
    "24gb-uncapped": ("24gb", False, False),
}
TRACED_BLOCKS = (0, 1, 2, 20, -1)


class Recorder:
    """Stands in for the pipeline's GraphedForward: the same calls, the first `keep` recorded."""

    def __init__(self, inner, keep: int = 3):
        self.inner, self.keep, self.calls, self.live = inner, keep, [], []

    def __call__(self, x, t, text, layout, inputs, slot=0):
        out = self.inner(x, t, text, layout, inputs, slot=slot)
        if len(self.calls) < self.keep:
            kv = [torch.stack([k.float().sum(), v.float().sum()]).double().cpu() for k, v in text.kv]
            self.calls.append({"x": x.float().cpu(), "t": t.float().cpu(), "out": out.float().cpu(),
                               "cos": layout.cos.float().cpu(), "sin": layout.sin.float().cpu(),
                               "kv_sums": torch.stack(kv), "kv0": text.kv[0][0].float().cpu(),
                               **{f"in_{k}": v.float().cpu() for k, v in inputs.items()}})
            self.live.append((x.clone(), t.clone(), text, layout, dict(inputs)))
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def traced_forward(model, call, eager: bool) -> dict[str, torch.Tensor]:
    """The call's forward outside any graph (blocks compiled, or all eager), with some modules' outputs."""
    x, t, text, layout, inputs = call
    saved, hooks, compiled = {}, [], {}
    if eager:
        for i, blk in enumerate(model.blocks):
            compiled[i], blk._compiled_call_impl = blk._compiled_call_impl, None
        n = len(model.blocks)
        names = {"patch_embedding": model.patch_embedding,
                 **{f"block{i % n}": model.blocks[i] for i in TRACED_BLOCKS if -n <= i < n}}
        for name, module in names.items():
            def hook(_m, _a, out, name=name):
                saved[name] = (out[0] if isinstance(out, tuple) else out).float().cpu()
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            saved["out"] = model(x, t, text, layout=layout, **inputs).sample.float().cpu()
    finally:
        for h in hooks:
            h.remove()
        for i, c in compiled.items():
            model.blocks[i]._compiled_call_impl = c
    return {f"{'eager' if eager else 'compiled'}_{k}": v for k, v in saved.items()}


def run_variant(name: str, folder: Path, out: Path) -> None:
    import bench_memory as bm
    from helios.engine.pipeline import load_pipeline

    budget, capped, _ = VARIANTS[name.split("#")[0]]  # "fp8#2": the variant again, in another process
    if os.environ.get("PROBE_DETERMINISTIC_ALGORITHMS") == "1":  # torch's switch too (Inductor reads it)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    from helios.runtime import use_deterministic_kernels

    print(name, "deterministic kernels:", use_deterministic_kernels(), flush=True)
    if capped:
        bm.cap_memory(budget)
    pipe = load_pipeline(folder, dtype=torch.bfloat16, device="cuda", fp8=True, memory_budget=budget,
                         deterministic=True)
    pipe.prompts = bm.FixedPrompt(pipe.device)
    model = pipe.model
    rec = Recorder(pipe.graphs or (lambda x, t, text, layout, inputs, slot=0:
                                   model(x, t, text, layout=layout, **inputs).sample))
    pipe.graphs = rec
    mine, _ = bm.compared_chunk(pipe)  # bench_memory.py's compared chunk
    res = {"latents": mine["latents"].float().cpu()}
    for i, call in enumerate(rec.calls):
        res.update({f"call{i}_{k}": v for k, v in call.items()})
    for eager in (False, True):
        res.update(traced_forward(pipe.model, rec.live[-1], eager))  # the last stage's forward
    res["fp8_attention"] = torch.tensor([float(b.attn1.fp8_attention) for b in pipe.model.blocks])
    torch.save(res, out)


def kernel_outputs(out: Path) -> None:
    """One process's outputs of the stage-2 kernels (1/1/1 at 384x640: 2400 history + 8640 noisy tokens)."""
    import torch.nn.functional as F

    from helios.model.attention import FP8, fp8_attention_kernel
    from helios.model.fp8 import Fp8Linear, quantize_rows
    from helios.model.transformer_kernels import gelu_quantize_rows, rope_attention_fp8

    dev, bf16, heads, d, ffn, tokens, history = "cuda", torch.bfloat16, 40, 5120, 13824, 11040, 2400
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, bf16)

    qkv, hidden, h_ffn = rand(1, tokens, 3 * d), rand(tokens, d), rand(tokens, ffn)
    q_w, k_w = rand(d, scale=0.1) + 1, rand(d, scale=0.1) + 1
    angle = torch.rand(1, tokens, 64, generator=g) * 6.28
    cos, sin = angle.cos().to(dev), angle.sin().to(dev)
    text_k, text_v = rand(1, 512, heads, 128), rand(1, 512, heads, 128)
    torch.manual_seed(0)  # the Linears' weights: the same in every process
    linears = {n: Fp8Linear(torch.nn.Linear(k, n_out, device=dev, dtype=bf16)) for n, (k, n_out) in
               {"qkv": (d, 3 * d), "out": (d, d), "up": (d, ffn), "down": (ffn, d)}.items()}
    for lin in linears.values():
        lin.to(dev)
    q8, _ = quantize_rows(hidden)
    q8 = q8.view(1, tokens, heads, 128)
    one = torch.ones(1, 1, 1, 1, device=dev)
    ops = {
        "cudnn_fp8_attention": lambda: fp8_attention_kernel().run_quantized(q8, q8, q8, one, one, one).float(),
        "cudnn_fp8_attention_noisy_queries": lambda: fp8_attention_kernel().run_quantized(
            q8[:, history:].contiguous(), q8, q8, one, one, one).float(),
        "rope_attention_fp8": lambda: torch.cat([t.float().flatten() for t in rope_attention_fp8(
            qkv, q_w, k_w, cos, sin, 1e-6, heads, history, None, 16, 0)]),
        "rope_attention_fp8_noisy_queries": lambda: torch.cat([t.float().flatten() for t in rope_attention_fp8(
            qkv, q_w, k_w, cos, sin, 1e-6, heads, history, None, 16, history)]),
        **{f"fp8_linear_{n}": (lambda lin=lin: lin(hidden if lin.in_features == d else h_ffn).float())
           for n, lin in linears.items()},
        "gelu_quantize_rows": lambda: torch.cat([t.float().flatten() for t in gelu_quantize_rows(h_ffn, 16)]),
        "bf16_cross_attention": lambda: F.scaled_dot_product_attention(
            hidden.view(1, tokens, heads, 128).transpose(1, 2), text_k.transpose(1, 2),
            text_v.transpose(1, 2)).float(),
    }
    res = {}
    for name, op in ops.items():
        got = []
        for fill in (0.0, float("nan")):
            junk = torch.full((3 * 2**30,), fill, dtype=torch.float32, device=dev)  # 12 GB of it
            del junk  # (kept by the caching allocator: the op's buffers come from it)
            got.append(op().cpu())
            torch.cuda.synchronize()
        res[name] = got[0]
        res[f"{name}_nan_fill_max_abs"] = torch.tensor((got[0].double() - got[1].double()).abs().max().item())
    torch.save(res, out)


def generated_code(cache: Path) -> dict[str, str]:
    """An Inductor cache's generated kernels and autotuning records: {file name: content hash}."""
    out = {}
    for f in sorted(cache.rglob("*")) if cache.is_dir() else []:
        if f.is_file() and f.suffix in (".py", ".best_config"):
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out


def code_differences(caches: dict[str, Path], reference: str) -> dict:
    """Per process against the reference's: kernels only one of them generated, autotuning records that differ."""
    ref = generated_code(caches[reference])
    report = {}
    for name, cache in caches.items():
        if name == reference:
            continue
        mine = generated_code(cache)
        py = lambda d: {k for k in d if k.endswith(".py")}  # noqa: E731
        report[name] = {
            "kernels": len(py(mine)), "reference_kernels": len(py(ref)),
            "only_here": sorted(py(mine) - py(ref))[:20], "only_in_reference": sorted(py(ref) - py(mine))[:20],
            "best_config_differs": sorted(k for k in mine if k.endswith(".best_config") and k in ref
                                          and mine[k] != ref[k])[:20],
        }
        for key in report[name]["best_config_differs"][:5]:
            report[name][key] = [next(caches[n].rglob(key)).read_text()[:400] for n in (reference, name)]
    for name, cache in caches.items():  # was Inductor's deterministic mode in each kernel's metadata?
        sources = [f.read_text() for f in cache.rglob("*.py")] if cache.is_dir() else []
        report.setdefault(name, {})["inductor_meta_deterministic"] = {
            flag: sum(f"'deterministic': {flag}" in src for src in sources) for flag in ("True", "False")}
    return report


def pack_kernels(caches: dict[str, Path], out: Path) -> None:
    """Every process's generated kernels and autotuning records, in one archive beside the report."""
    import tarfile

    with tarfile.open(out, "w:gz") as tar:
        for name, cache in caches.items():
            for f in sorted(cache.rglob("*")) if cache.is_dir() else []:
                if f.is_file() and f.suffix in (".py", ".best_config"):
                    tar.add(f, arcname=f"{name}/{f.name}")


def compare(results: dict[str, Path], reference: str) -> dict:
    ref = torch.load(results[reference])
    report = {}
    for name, path in results.items():
        if name == reference:
            continue
        mine, rows = torch.load(path), {}
        for key, want in ref.items():
            got = mine.get(key)
            if got is None or got.shape != want.shape:
                rows[key] = f"missing or shape {None if got is None else tuple(got.shape)} vs {tuple(want.shape)}"
            else:
                rows[key] = (got.double() - want.double()).abs().max().item()
        report[name] = rows
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--folder", default="auto", help="bench_memory.py's random-weight folder (written if absent)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/probe-plan-numerics"))
    ap.add_argument("--own-caches", action="store_true",
                    help="every process compiles from scratch in caches of its own; the report diffs their kernels")
    ap.add_argument("--kernels", type=int, default=0, help="the kernels alone, in this many processes")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # the child's own variant
    ap.add_argument("--timeout-s", type=float, default=150)
    a = ap.parse_args()
    if a.variant:
        if a.variant.startswith("kernels"):
            kernel_outputs(a.scratch / f"{a.variant}.pt")
        else:
            run_variant(a.variant, Path(a.folder), a.scratch / f"{a.variant}.pt")
        return
    if a.kernels:
        a.scratch.mkdir(parents=True, exist_ok=True)
        names = [f"kernels{i}" for i in range(a.kernels)]
        status = {n: subprocess.run([sys.executable, __file__, "--variant", n, "--scratch", str(a.scratch),
                                     "--out", str(a.out)], timeout=a.timeout_s).returncode for n in names}
        results = {n: a.scratch / f"{n}.pt" for n in names if status[n] == 0}
        first = torch.load(results[names[0]])
        report = {"gpu": torch.cuda.get_device_name(0), "status": status,
                  "nan_fill": {k: v.item() for k, v in first.items() if k.endswith("_nan_fill_max_abs")},
                  "max_abs_vs_first_process": compare(results, names[0])}
        a.out.write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return
    import bench_memory as bm

    folder, text = bm.choose_folder(a.folder, False)
    if not (folder / ".complete").exists():
        bm.write_folder(folder, False, text)
    a.scratch.mkdir(parents=True, exist_ok=True)
    names = [v for v in a.variants.split(",") if v]
    status, results, caches = {}, {}, {}
    for name in names:
        env = dict(os.environ)
        if VARIANTS[name.split("#")[0]][2]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        if a.own_caches:
            caches[name] = a.scratch / f"inductor-{name}"
            shutil.rmtree(caches[name], ignore_errors=True)
            env.update(TORCHINDUCTOR_CACHE_DIR=str(caches[name]), TRITON_CACHE_DIR=str(a.scratch / f"triton-{name}"))
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, __file__, "--variant", name, "--folder", str(folder),
                                 "--scratch", str(a.scratch), "--out", str(a.out)], env=env,
                                timeout=a.timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        status[name] = {"rc": rc, "s": time.perf_counter() - t0}
        if rc == 0:
            results[name] = a.scratch / f"{name}.pt"
        print(name, status[name], flush=True)
        report = {"gpu": torch.cuda.get_device_name(0), "status": status, "reference": names[0],
                  "max_abs_vs_reference": compare(results, names[0]) if names[0] in results else {}}
        if caches:
            report["generated_code"] = code_differences(caches, names[0])
            pack_kernels(caches, a.out.with_suffix(".kernels.tgz"))
        a.out.write_text(json.dumps(report, indent=1))  # after every process: a run cut short keeps what it did
    for name, rows in report["max_abs_vs_reference"].items():
        print(f"== {name} vs {names[0]}")
        for key, value in rows.items():
            print(f"  {key:32s} {value}")


if __name__ == "__main__":
    main()
