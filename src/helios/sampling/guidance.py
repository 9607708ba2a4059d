"""Classifier-free guidance and CFG-Zero* as the Helios reference pipelines apply them.

    guided = cfg(cond, uncond, scale)                       # base pipeline, pyramid without zero-star
    guided = cfg_zero_star(cond, uncond, scale,             # pyramid pipeline with is_cfg_zero_star
                           zero_init=is_zero_init_step(stage_index, i, use_zero_init, zero_steps))

* Guidance is on iff scale > 1.0 (`uses_cfg`); otherwise only the conditional pass runs
  and its output goes straight to the scheduler (the distilled preset, scale 1.0).
* CFG-Zero*: per-sample s* = <cond, uncond> / (||uncond||^2 + 1e-8) in float32;
  guided = s* uncond + scale (cond - s* uncond).
* Zero-init: in stage 0 only, steps i <= zero_steps (so zero_steps=1 zeroes steps 0 AND 1)
  output cond * 0. The reference still runs both passes there; an engine may skip them
  and feed zeros (identical unless the model produces inf/NaN).
"""

from __future__ import annotations

import torch


def uses_cfg(guidance_scale: float) -> bool:
    """Whether the unconditional pass runs at all."""
    return guidance_scale > 1.0


def cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classic classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + guidance_scale * (cond - uncond)


def cfg_zero_star_scale(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Per-sample projection s* of cond onto uncond, shape (B, 1, ..., 1), in cond's dtype."""
    b = cond.shape[0]
    p = cond.reshape(b, -1).float()
    n = uncond.reshape(b, -1).float()
    s = (p * n).sum(dim=1, keepdim=True) / ((n**2).sum(dim=1, keepdim=True) + 1e-8)
    return s.view(b, *([1] * (cond.dim() - 1))).to(cond.dtype)


def is_zero_init_step(stage_index: int, step_index: int, use_zero_init: bool = True, zero_steps: int = 1) -> bool:
    """CFG-Zero*'s zero-init: the first zero_steps+1 steps of pyramid stage 0."""
    return use_zero_init and stage_index == 0 and step_index <= zero_steps


def cfg_zero_star(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, zero_init: bool = False
) -> torch.Tensor:
    """CFG-Zero*: guidance around the optimally rescaled unconditional output."""
    if zero_init:
        return cond * 0.0
    s = cfg_zero_star_scale(cond, uncond)
    return uncond * s + guidance_scale * (cond - uncond * s)
