"""Denoise one chunk: the schedule, the pyramid stages, guidance, and the solver, around a model callable.

The engine hands in `predict(x, timestep, with_uncond) -> (cond, uncond | None)`; everything about
*how* the chunk is sampled lives here, so the base, mid and distilled presets are settings, not code.
Random draws, in order: the chunk's initial noise, then one block-noise draw per pyramid stage > 0.

Training runs this same loop: its few-step rollout stops each pyramid stage early through `ChunkHooks`,
and the timesteps a student visits come from `stage_timesteps`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Sequence

import torch

from helios.sampling.guidance import cfg, cfg_zero_star, is_zero_init_step, uses_cfg
from helios.sampling.pyramid import (check_pyramid_shape, first_stage_latents, initial_noise, pyramid_stage_mus,
                                     renoise_for_stage, to_device)
from helios.sampling.schedulers import ChunkScheduler, base_sigmas, compute_mu, model_timestep, token_count

Predict = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class SamplerSettings:
    """How a chunk is sampled. `pyramid_steps=None` is the single-resolution (base) sampler."""

    steps: int = 50
    pyramid_steps: tuple[int, ...] | None = None
    guidance_scale: float = 5.0
    cfg_zero_star: bool = False
    use_zero_init: bool = True
    zero_steps: int = 1
    amplify_first_chunk: bool = False

    def __post_init__(self) -> None:
        if self.pyramid_steps is not None:
            if not self.pyramid_steps or min(self.pyramid_steps) < 1:
                raise ValueError(f"pyramid steps must be positive integers, got {self.pyramid_steps}")
        elif self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance_scale}")

    @property
    def total_steps(self) -> int:
        return sum(self.pyramid_steps) if self.pyramid_steps else self.steps

    def with_(self, **changes) -> "SamplerSettings":
        return replace(self, **changes)


# The official defaults of the three released checkpoints.
PRESETS: dict[str, SamplerSettings] = {
    "base": SamplerSettings(steps=50, guidance_scale=5.0),
    "mid": SamplerSettings(pyramid_steps=(20, 20, 20), guidance_scale=5.0, cfg_zero_star=True),
    "distilled": SamplerSettings(pyramid_steps=(2, 2, 2), guidance_scale=1.0, amplify_first_chunk=True),
}


def preset(name: str) -> SamplerSettings:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class ChunkHooks:
    """How a caller changes the pyramid loop without a second copy of it (training's rollout).

    exit_step(stage, num_steps) -> e: the stage stops at its step e, whose x0 (`scheduler.denoised`)
    starts the next stage (or is the result); asked after the stage's schedule and block noise.
    model_context(stage, step, exiting) -> a context manager around that step's model call
    (e.g. no gradients before the exit step).
    """

    exit_step: Callable[[int, int], int] | None = None
    model_context: Callable[[int, int, bool], ContextManager] | None = None

    def context(self, stage: int, step: int, exiting: bool) -> ContextManager:
        return self.model_context(stage, step, exiting) if self.model_context else contextlib.nullcontext()


def guided(settings: SamplerSettings, cond: torch.Tensor, uncond: torch.Tensor | None, stage: int,
           step: int) -> torch.Tensor:
    if uncond is None:
        return cond
    if settings.cfg_zero_star:
        zero = is_zero_init_step(stage, step, settings.use_zero_init, settings.zero_steps)
        return cfg_zero_star(cond, uncond, settings.guidance_scale, zero_init=zero)
    return cfg(cond, uncond, settings.guidance_scale)


def denoise_chunk(predict: Predict, shape: tuple[int, ...], scheduler, settings: SamplerSettings,
                  generator: torch.Generator | None, device: torch.device, first_chunk: bool = False,
                  noise_dtype: torch.dtype | None = None,
                  on_step: Callable[[int, int], None] | None = None, non_blocking: bool = False,
                  hooks: ChunkHooks | None = None) -> torch.Tensor:
    """Sample one chunk of latents of `shape` (B, C, T, H, W), float32, starting from fresh noise.

    on_step(stage, step) is called after every solver step is queued (progress reporting).
    non_blocking: the host-made tensors (noise from a CPU generator, timesteps) reach a CUDA device
    without the host waiting for it, so the whole chunk is queued at once (see pyramid.to_device);
    otherwise each copy waits for the work queued before it, as diffusers does.
    hooks: see `ChunkHooks` (pyramid sampling only).
    """
    with_uncond = uses_cfg(settings.guidance_scale)
    x = initial_noise(shape, generator, device, non_blocking=non_blocking)
    if settings.pyramid_steps is None:
        if hooks is not None:
            raise ValueError("chunk hooks act on pyramid stages; these settings sample a single stage")
        return _single_stage(predict, x, scheduler, settings, with_uncond, on_step, non_blocking)
    return _pyramid(predict, x, scheduler, settings, with_uncond, generator, first_chunk, noise_dtype, on_step,
                    non_blocking, hooks or ChunkHooks())


def _single_stage(predict, x, scheduler, settings, with_uncond, on_step, non_blocking):
    b = x.shape[0]
    mu = compute_mu(token_count(x.shape[2:]), scheduler.config) if scheduler.config.use_dynamic_shifting else None
    # Built on the host and moved here, so that the move can be non-blocking.
    timesteps = to_device(scheduler.set_timesteps(settings.steps, mu=mu, sigmas=base_sigmas(settings.steps)),
                          x.device, non_blocking)
    for i in range(scheduler.num_steps):
        t = timesteps[i]
        cond, uncond = predict(x, model_timestep(t, b, truncate=False), with_uncond)
        x = scheduler.step(guided(settings, cond, uncond, 0, i), x)
        if on_step:
            on_step(0, i)
    return x


def _stage_mus(scheduler: ChunkScheduler, latent_thw: Sequence[int], stages: int) -> list[float | None]:
    if not scheduler.config.use_dynamic_shifting:
        return [None] * stages
    return pyramid_stage_mus(latent_thw, stages, scheduler.config)


def stage_timesteps(scheduler: ChunkScheduler, shape: Sequence[int], settings: SamplerSettings,
                    first_chunk: bool = False) -> list[list[float]]:
    """The timesteps each pyramid stage of `denoise_chunk` visits for a chunk of `shape` (no model runs)."""
    steps = settings.pyramid_steps
    mus = _stage_mus(scheduler, shape[2:], len(steps))
    amplify = settings.amplify_first_chunk and first_chunk
    out = []
    for k, n in enumerate(steps):
        scheduler.set_timesteps(n, stage_index=k, mu=mus[k], amplify=amplify)
        out.append([float(t) for t in scheduler.timesteps_cpu])
    return out


def _pyramid(predict, x, scheduler, settings, with_uncond, generator, first_chunk, noise_dtype, on_step, non_blocking,
             hooks):
    b = x.shape[0]
    stages = len(settings.pyramid_steps)
    check_pyramid_shape(x.shape[-2], x.shape[-1], stages)
    mus = _stage_mus(scheduler, x.shape[2:], stages)
    amplify = settings.amplify_first_chunk and first_chunk
    x = first_stage_latents(x, stages)
    for k, steps in enumerate(settings.pyramid_steps):
        timesteps = to_device(scheduler.set_timesteps(steps, stage_index=k, mu=mus[k], amplify=amplify), x.device,
                              non_blocking)
        if k > 0:
            x = renoise_for_stage(x, k, scheduler.ori_start_sigmas, scheduler.config.gamma, generator,
                                  noise_dtype=noise_dtype, non_blocking=non_blocking)
        start = x
        last = scheduler.num_steps - 1
        exit_at = last if hooks.exit_step is None else hooks.exit_step(k, scheduler.num_steps)
        if not 0 <= exit_at <= last:
            raise ValueError(f"exit step {exit_at} outside the {scheduler.num_steps} steps of stage {k}")
        for i in range(exit_at + 1):
            t = timesteps[i]
            exiting = hooks.exit_step is not None and i == exit_at
            with hooks.context(k, i, exiting):
                cond, uncond = predict(x, model_timestep(t, b, truncate=True), with_uncond)
                v = guided(settings, cond, uncond, k, i)
                x = scheduler.denoised(v, x) if exiting else scheduler.step(v, x, start)
            if on_step:
                on_step(k, i)
    return x
