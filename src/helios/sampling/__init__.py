"""Samplers for Helios: flow-matching schedulers (Euler / UniPC), the DMD few-step sampler,
pyramid stage helpers and guidance. See each module's docstring for the step-by-step API."""

from helios.sampling.dmd import DMDScheduler
from helios.sampling.guidance import cfg, cfg_zero_star, cfg_zero_star_scale, is_zero_init_step, uses_cfg
from helios.sampling.pyramid import (
    check_pyramid_shape,
    first_stage_latents,
    initial_noise,
    pyramid_stage_mus,
    renoise_coefficients,
    renoise_for_stage,
    sample_block_noise,
    stage_resolutions,
    upsample_latents,
)
from helios.sampling.loading import load_scheduler
from helios.sampling.schedulers import (
    ChunkScheduler,
    FlowScheduler,
    SchedulerConfig,
    base_sigmas,
    compute_mu,
    config_from_dict,
    model_timestep,
    time_shift,
    token_count,
)

__all__ = [
    "ChunkScheduler", "DMDScheduler", "FlowScheduler", "SchedulerConfig", "base_sigmas", "cfg", "cfg_zero_star",
    "cfg_zero_star_scale", "check_pyramid_shape", "compute_mu", "config_from_dict", "first_stage_latents", "initial_noise",
    "is_zero_init_step", "load_scheduler", "model_timestep", "pyramid_stage_mus", "renoise_coefficients",
    "renoise_for_stage", "sample_block_noise", "stage_resolutions", "time_shift", "token_count",
    "upsample_latents", "uses_cfg",
]
