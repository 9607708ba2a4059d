"""Training runs of the tests: a simulated crash, a checkpoint flattened for comparison, the tiny stage-3 run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from helios.train.checkpoint import list_checkpoints


class Crash(RuntimeError):
    pass


def crash_after(k: int):
    def hook(step: int, metrics: dict) -> None:
        if step == k:
            raise Crash(f"simulated crash after step {step}")

    return hook


def checkpoint_tensors(run_dir: Path, tmp_path: Path, step: int) -> dict:
    """Everything the DCP part of a checkpoint holds (model, optimiser, EMA), as one flat dict."""
    ck = dict(list_checkpoints(run_dir / "checkpoints"))[step]
    out = tmp_path / f"{run_dir.name}-{step}.pt"
    dcp_to_torch_save(ck / "dcp", out)
    flat: dict = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = x

    walk("", torch.load(out, weights_only=False))
    return flat


def stage3_user(tmp_path, tiny_model, latent_cache, out: str) -> dict:
    """The official stage-3 DMD+GAN recipe on the tiny "mid" model folder (8x8 latents) and cache."""
    return {
        "recipe": "stage3", "phase": "dmd", "output_dir": str(tmp_path / out), "device": "cpu", "max_steps": 6,
        "model": {"init_from": str(tiny_model), "init_subfolder": "transformer", "gradient_checkpointing": True,
                  "mixed_precision": "no"},
        "data": {"source": "cache", "cache_dir": str(latent_cache), "height": 64, "width": 64,
                 "text_max_length": 16},
        "batch": {"per_gpu": 1}, "lora": {"rank": 4, "alpha": 4.0}, "optim": {"lr": 1e-4},
        "distill": {"critic_lora": {"rank": 4, "alpha": 4.0}, "critic_lr": 1e-4,
                    "gan": {"head_blocks": [0, 1], "head_dim": 64, "start_step": 2}},
        "ema": {"start_step": 2},
        "logging": {"progress": False, "tensorboard": False}, "validation": {"enabled": False},
        "checkpointing": {"every_steps": 2, "keep_last": 5},
    }
