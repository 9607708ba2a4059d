"""Measure GPU memory and time of one stage-3 generator and critic update (not a test).

    python benchmarks/measure_distill_memory.py --preset 14b --rank 32 --head-dim 256

Random weights (the numbers do not depend on them): a bf16 generator transformer with LoRA, a bf16
critic base with the critic LoRA and the GAN heads, one 384x640 chunk (9 x 48 x 80 latents), a
512-token prompt, a full random history. Gradient checkpointing and bf16 autocast, everything resident
on the GPU (no offloading). The generator step runs with every stage exiting at its first step (the
most graded forwards); the critic step includes the GAN and R1 terms. Prints one JSON line per config:
parameter counts and peak allocated / reserved memory after building, after the generator update,
after the critic update; "oom" names the phase that ran out of memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch


def measure(preset: str, rank: int, head_dim: int, height: int, width: int, text_len: int) -> dict:
    from helios.engine.history import HistoryLayout, split_history
    from helios.model.config import named_config
    from helios.model.transformer import build_transformer
    from helios.sampling.dmd import DMDScheduler
    from helios.train.stage3 import (DistillBatch, DistillConfig, Distiller, GANConfig, ScoreCritic,
                                     build_generator, scaled_head_blocks)
    from helios.train.timesteps import TimestepConfig

    dev = torch.device("cuda")
    cfg = named_config(preset)
    res: dict = {"preset": preset, "rank": rank, "head_dim": head_dim, "latent": [9, height // 8, width // 8]}
    gb = 2**30

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        res[f"{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / gb, 2)
        res[f"{name}_reserved_gib"] = round(torch.cuda.max_memory_reserved() / gb, 2)
        res[f"{name}_now_gib"] = round(torch.cuda.memory_allocated() / gb, 2)
        torch.cuda.reset_peak_memory_stats()

    phase = "build"
    try:
        torch.manual_seed(0)
        gen_base = build_transformer(cfg, device=dev, dtype=torch.bfloat16)
        critic_base = build_transformer(cfg, device=dev, dtype=torch.bfloat16)
        for m in (gen_base, critic_base):
            m.enable_gradient_checkpointing(True)
        gen, params = build_generator(gen_base, lora_rank=rank, copy_model=False)
        gan = GANConfig(head_blocks=scaled_head_blocks(cfg.num_layers), head_dim=head_dim, start_step=0)
        critic = ScoreCritic(critic_base, rank=rank, gan=gan)
        d = Distiller(gen, critic, DistillConfig(gan=gan), DMDScheduler(use_dynamic_shifting=True),
                      TimestepConfig(use_dynamic_shifting=True),
                      autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16), generator_params=params)
        # the trainer's optimisers (AdamW, official settings) and an EMA copy of the generator's weights
        dc = d.cfg
        generator_opt = torch.optim.AdamW(d.generator_params, lr=dc.generator_lr, betas=tuple(dc.betas), eps=dc.eps,
                                          weight_decay=dc.weight_decay)
        critic_opt = torch.optim.AdamW(d.critic_params, lr=dc.critic_lr, betas=tuple(dc.betas), eps=dc.eps,
                                       weight_decay=dc.weight_decay)
        ema = {n: p.detach().float().clone() for n, p in d.generator_named}
        res["base_params_b"] = round(sum(p.numel() for p in gen_base.parameters() if not p.requires_grad) / 1e9, 3)
        res["generator_lora_b"] = round(sum(p.numel() for p in params) / 1e9, 3)
        res["critic_lora_b"] = round(sum(p.numel() for p in critic.lora_parameters) / 1e9, 3)
        res["heads_b"] = round(sum(p.numel() for p in critic.heads.parameters()) / 1e9, 3)
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

        rng = torch.Generator().manual_seed(1)
        phase = "generator"
        t0 = time.perf_counter()
        generator_opt.zero_grad(set_to_none=True)
        m = d.generator_backward(batch, 1000, rng, rng, lambda loss: loss.backward(), exits=[0, 0, 0])
        generator_opt.step()
        generator_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in d.generator_named:
                ema[n].lerp_(p.float(), 1 - dc.ema_decay)
        torch.cuda.synchronize()
        res["generator_step_s"] = round(time.perf_counter() - t0, 2)
        res["generator_forwards"] = m["rollout_forwards"]
        mark("generator")

        phase = "critic"
        t0 = time.perf_counter()
        critic_opt.zero_grad(set_to_none=True)
        d.critic_backward(batch, 1000, rng, rng, lambda loss: loss.backward())
        critic_opt.step()
        critic_opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        res["critic_step_s"] = round(time.perf_counter() - t0, 2)
        mark("critic")
    except torch.OutOfMemoryError:
        res["oom"] = phase
        mark(phase)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="14b")
    ap.add_argument("--rank", type=int, nargs="+", default=[32])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[256])
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--text-len", type=int, default=512)
    a = ap.parse_args()
    for rank, head in zip(a.rank, a.head_dim):
        print(json.dumps(measure(a.preset, rank, head, a.height, a.width, a.text_len)), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
