"""Measure GPU memory, host memory and time of stage-3 iterations at 14B (not a test).

    python benchmarks/measure_distill_memory.py --out distill_memory.json        # on an H200, ~6 min
    python benchmarks/measure_distill_memory.py --smoke --out /tmp/smoke.json          # tiny model, CPU, seconds

One process, three configurations in this order (docs/distillation.md, "Memory at 14B"):

* ``official_one_gpu``: LoRA r256 on G and the critic, GAN heads of width 768, with the memory options
  (``distill.memory``: idle base, AdamW moments and EMA in pinned host memory), the GPU capped to an
  80 GB card's 79.6 GiB with ``torch.cuda.set_per_process_memory_fraction``;
* ``official_resident``: the same sizes without the options, uncapped (the time reference; on a 141 GB
  card it may fit);
* ``r32_resident``: LoRA r32, heads of width 256, without the options, capped likewise (the
  configuration that fits without them).

Each runs the trainer's iteration (``helios train``): a *generator iteration* (G's DMD + GAN backward,
the critic's flow + GAN + R1 backward, per-group clipping, one AdamW step over both groups, the EMA),
then a *critic iteration* (critic backward, clipping, step), first once to warm up, then timed.
Random bf16 weights (the numbers do not depend on them), one 384x640 chunk (9 x 48 x 80 latents), a
512-token prompt, a full random history, gradient checkpointing, bf16 autocast; the G rollout exits
every stage at its first step (the most graded forwards). Reports per configuration: parameter
counts, peak allocated / reserved GPU memory per phase, peak host RSS (VmHWM, reset per
configuration where the kernel allows), seconds per iteration and their parts; ``oom`` names the
phase that ran out of memory. Writes one JSON file (atomically) and prints one JSON line per config.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def _host_peak_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / GIB, 2)
    except OSError:
        pass
    return None


def _reset_host_peak() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(name: str, preset: str, rank: int, head_dim: int, height: int, width: int, text_len: int,
            options: bool, cap_gib: float | None, dev: torch.device) -> dict[str, Any]:
    from helios.engine.history import HistoryLayout, split_history
    from helios.model.config import named_config
    from helios.model.transformer import build_transformer
    from helios.sampling.dmd import DMDScheduler
    from helios.train.stage3 import (DistillBatch, DistillConfig, Distiller, GANConfig, ScoreCritic,
                                     build_generator, scaled_head_blocks)
    from helios.train.stage3.memory import BaseResidency, HostAdamW, HostEMA, update_ema
    from helios.train.timesteps import TimestepConfig

    cuda = dev.type == "cuda"
    cfg = named_config(preset)
    res: dict[str, Any] = {"config": name, "preset": preset, "rank": rank, "head_dim": head_dim,
                           "memory_options": options, "cap_gib": cap_gib, "latent": [9, height // 8, width // 8],
                           "text_len": text_len, "device": torch.cuda.get_device_name(dev) if cuda else "cpu"}
    if cuda:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total) if cap_gib else 1.0, dev.index or 0)
        res["device_total_gib"] = round(total / GIB, 2)
        torch.cuda.reset_peak_memory_stats(dev)
    res["host_peak_reset"] = _reset_host_peak()

    def mark(phase: str) -> None:
        _sync(dev)
        if cuda:
            res[f"{phase}_peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / GIB, 2)
            res[f"{phase}_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / GIB, 2)
            res[f"{phase}_now_gib"] = round(torch.cuda.memory_allocated(dev) / GIB, 2)
            torch.cuda.reset_peak_memory_stats(dev)
        res[f"{phase}_host_peak_gib"] = _host_peak_gib()

    phase = "build"
    try:
        torch.manual_seed(0)
        dtype = torch.bfloat16 if cuda else torch.float32
        gen_base = build_transformer(cfg, device=dev, dtype=dtype)
        critic_base = build_transformer(cfg, device=dev, dtype=dtype)
        for m in (gen_base, critic_base):
            m.enable_gradient_checkpointing(True)
        gen, params = build_generator(gen_base, lora_rank=rank, copy_model=False)
        gan = GANConfig(head_blocks=scaled_head_blocks(cfg.num_layers), head_dim=head_dim, start_step=0)
        critic = ScoreCritic(critic_base, rank=rank, gan=gan)
        residency = None
        if options:
            residency = BaseResidency({"generator": gen, "critic": critic.transformer})
            residency.use("generator")
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
        d = Distiller(gen, critic, DistillConfig(gan=gan), DMDScheduler(use_dynamic_shifting=True),
                      TimestepConfig(use_dynamic_shifting=True), generator_params=params, residency=residency,
                      **({"autocast": autocast} if autocast else {}))
        dc = d.cfg
        # the trainer's optimiser (one AdamW, a group each) and EMA of G's trainable parameters
        groups = [{"params": d.generator_params, "clip": dc.grad_clip},
                  {"params": d.critic_params, "lr": dc.critic_lr, "clip": dc.critic_grad_clip}]
        kw = dict(lr=dc.generator_lr, betas=tuple(dc.betas), eps=dc.eps, weight_decay=dc.weight_decay)
        opt = HostAdamW(groups, **kw) if options else torch.optim.AdamW(groups, **kw)
        for g in opt.param_groups:  # the trainer makes every state up front (_zero_adamw_state)
            for p in g["params"]:
                opt.state[p] = opt.zero_state(p) if options else {
                    "step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        ema = HostEMA(d.generator_named) if options else {n: p.detach().clone() for n, p in d.generator_named}
        res["base_params_b"] = round(sum(p.numel() for p in gen_base.parameters() if not p.requires_grad) / 1e9, 3)
        res["generator_lora_b"] = round(sum(p.numel() for p in params) / 1e9, 3)
        res["critic_lora_b"] = round(sum(p.numel() for p in critic.lora_parameters) / 1e9, 3)
        res["heads_b"] = round(sum(p.numel() for p in critic.heads.parameters()) / 1e9, 3)
        if options:
            res["host_pinned_gib"] = round((residency.arena.reserved_bytes + opt.arena.reserved_bytes
                                            + ema.arena.reserved_bytes) / GIB, 2)
        layout = HistoryLayout()
        h, w = height // 8, width // 8
        g = torch.Generator(device=dev).manual_seed(0)
        hist = torch.randn(1, 16, 19, h, w, device=dev, generator=g)
        anchor = torch.randn(1, 16, 1, h, w, device=dev, generator=g)
        history = {**split_history(hist, layout, anchor), **{k: v.to(dev) for k, v in layout.indices(1).items()}}
        text = torch.randn(1, text_len, cfg.text_dim, device=dev, generator=g)
        batch = DistillBatch(text, torch.zeros_like(text), history, history,
                             torch.randn(1, 16, 9, h, w, device=dev, generator=g))
        mark("build")

        def timed(key: str, fn) -> Any:
            _sync(dev)
            t0 = time.perf_counter()
            out = fn()
            _sync(dev)
            res[key] = round(time.perf_counter() - t0, 3)
            return out

        def step() -> None:
            for grp in opt.param_groups:
                with_grad = [p for p in grp["params"] if p.grad is not None]
                if grp["clip"] is not None and with_grad:
                    torch.nn.utils.clip_grad_norm_(with_grad, float(grp["clip"]))
            opt.step()
            opt.zero_grad(set_to_none=True)

        def backward(loss: torch.Tensor) -> None:
            loss.backward()

        for it in ("warmup", "timed"):
            rng = torch.Generator().manual_seed(1)
            pre = "" if it == "timed" else "warmup_"
            phase = f"{pre}generator_iteration"
            t0 = time.perf_counter()
            m = timed(f"{pre}generator_backward_s",
                      lambda: d.generator_backward(batch, 1000, rng, rng, backward, exits=[0, 0, 0]))
            timed(f"{pre}generator_iteration_critic_backward_s",
                  lambda: d.critic_backward(batch, 1000, rng, rng, backward))
            timed(f"{pre}generator_iteration_step_s", step)
            timed(f"{pre}ema_s", lambda: update_ema(ema, d.generator_named, dc.ema_decay))
            res[f"{pre}generator_iteration_s"] = round(time.perf_counter() - t0, 3)
            res["generator_forwards"] = m["rollout_forwards"]
            mark(phase)
            phase = f"{pre}critic_iteration"
            t0 = time.perf_counter()
            timed(f"{pre}critic_backward_s", lambda: d.critic_backward(batch, 1001, rng, rng, backward))
            timed(f"{pre}critic_iteration_step_s", step)
            res[f"{pre}critic_iteration_s"] = round(time.perf_counter() - t0, 3)
            mark(phase)
    except torch.OutOfMemoryError:
        res["oom"] = phase
        mark(phase)
    return res


def _release(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        if hasattr(torch._C, "_host_emptyCache"):  # give the pinned blocks back to the system
            torch._C._host_emptyCache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="the tiny model at 64x64 (CPU unless CUDA is there)")
    ap.add_argument("--cap-gib", type=float, default=79.6,
                    help="GPU cap of the capped runs, GiB (default: what an 80 GB H100 reports, 79.6 GiB)")
    ap.add_argument("--only", nargs="+", choices=["official_one_gpu", "official_resident", "r32_resident"])
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not a.smoke and dev.type != "cuda":
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    if a.smoke:
        preset, size, text_len, official, small = "tiny", (64, 64), 16, (8, 128), (4, 64)
    else:
        preset, size, text_len, official, small = "14b", (384, 640), 512, (256, 768), (32, 256)
    configs = [("official_one_gpu", official, True, a.cap_gib), ("official_resident", official, False, None),
               ("r32_resident", small, False, a.cap_gib)]
    results = []
    for name, (rank, head), options, cap in configs:
        if a.only and name not in a.only:
            continue
        r = measure(name, preset, rank, head, *size, text_len, options, cap, dev)
        print(json.dumps(r), flush=True)
        results.append(r)
        _release(dev)
    ref = {r["config"]: r for r in results}
    on, off = ref.get("official_one_gpu", {}), ref.get("official_resident", {})
    summary: dict[str, Any] = {}
    for key in ("generator_iteration_s", "critic_iteration_s"):
        if key in on and key in off:
            summary[f"{key}_ratio"] = round(on[key] / off[key], 3)
    if "critic_iteration_reserved_gib" in on:
        summary["official_one_gpu_peak_reserved_gib"] = max(v for k, v in on.items() if k.endswith("_reserved_gib"))
        summary["official_one_gpu_peak_host_gib"] = max(
            (v for k, v in on.items() if k.endswith("_host_peak_gib") and v is not None), default=None)
    out = {"results": results, "summary": summary}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(a.out.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, a.out)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
