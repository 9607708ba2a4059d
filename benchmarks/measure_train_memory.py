"""Measure GPU memory and step time of `helios.train` on a random-weight transformer (not a test).

    python benchmarks/measure_train_memory.py --preset 14b --finetune lora --batch 1 --steps 4

Writes a random transformer folder of the preset (bf16) and a random latent cache at 384x640
(sections of 9 x 48 x 80 latents, 512-token prompt embeddings) into --work, then trains with the
stage-1 (or --stage 2) recipe: gradient checkpointing, bf16 autocast, LoRA (rank from the recipe)
or full fine-tuning. Prints one JSON line per step with the peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--finetune", default="lora")
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--work", default="/tmp/helios-train-measure")
    args = ap.parse_args()

    from helios.model.config import named_config
    from helios.model.loading import save_transformer
    from helios.model.transformer import build_transformer
    from helios.train.config import load_config
    from helios.train.trainer import train
    from helios.train.video_data import CACHE_FORMAT

    work = Path(args.work)
    model_dir = work / f"model-{args.preset}"
    if not (model_dir / "config.json").is_file():
        t0 = time.perf_counter()
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        model = build_transformer(named_config(args.preset), device=dev, dtype=torch.bfloat16)
        save_transformer(model, model_dir)
        del model
        torch.cuda.empty_cache()
        print(json.dumps({"wrote_model_s": round(time.perf_counter() - t0, 1)}), flush=True)
    text_dim = named_config(args.preset).text_dim
    cache = work / "cache"
    if not cache.is_dir():
        cache.mkdir(parents=True)
        g = torch.Generator().manual_seed(0)
        for i in range(max(4, args.batch)):
            save_file({"latents": torch.randn(3, 16, 9, 48, 80, generator=g),
                       "prompt_embeds": torch.randn(512, text_dim, generator=g).bfloat16()},
                      str(cache / f"v{i}.safetensors"), metadata={"format": CACHE_FORMAT, "num_frames": "99"})
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    over = {"recipe": f"stage{args.stage}", "output_dir": str(out), "finetune": args.finetune,
            "max_steps": args.steps, "model": {"init_from": str(model_dir), "components_from": str(model_dir),
                                               "gradient_checkpointing": not args.no_checkpointing},
            "data": {"source": "cache", "cache_dir": str(cache), "min_video_frames": 0},
            "batch": {"per_gpu": args.batch}, "validation": {"enabled": False}, "export": {"enabled": False},
            "logging": {"progress": False, "tensorboard": False}, "checkpointing": {"every_steps": 0}}
    if args.lora_rank:
        over["lora"] = {"rank": args.lora_rank, "alpha": float(args.lora_rank)}
    cfg = load_config(over)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def on_step(step: int, m: dict) -> None:
        print(json.dumps({"preset": args.preset, "finetune": args.finetune, "stage": args.stage, "batch": args.batch,
                          "step": step, "loss": round(m["loss"], 4), "step_s": round(m["step_seconds"], 2),
                          "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                          "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None}),
              flush=True)

    t0 = time.perf_counter()
    train(cfg, on_step=on_step)
    print(json.dumps({"total_s_incl_load_and_final_checkpoint": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
