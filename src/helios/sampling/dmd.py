"""Few-step sampler of the distilled Helios model (diffusers HeliosDMDScheduler).

Each step turns the flow prediction into x0 = x_t - sigma_t * v and, unless it is the
stage's last step, re-noises x0 to the next step's sigma using the *stage start point*
(the tensor the stage began from) as the noise: x_next = (1 - s) x0 + s * start_point.
So DMD steps draw no random numbers; the only draws are the chunk's initial noise and
the pyramid's block noise at stage boundaries (see helios.sampling.pyramid).

Engine-facing API
-----------------
    sched = DMDScheduler(config)              # or load_scheduler(...) on a HeliosDMDScheduler config
    start = x                                 # stage 0: the downsampled initial noise;
                                              # stage k>0: the upsampled + renoised latents
    sched.set_timesteps(steps_per_stage[k], stage_index=k, mu=mu_k,
                        amplify=is_amplify_first_chunk and is_first_chunk, device=dev)
    for i in range(sched.num_steps):          # n steps, or 2n when amplify=True
        v = model(x, model_timestep(sched.timesteps[i], B, truncate=True))
        x = sched.step(v, x, start)

Matching the reference exactly: the sigma used at step i is looked up by the timestep
truncated to an integer (nearest schedule entry), and the arithmetic runs in float64;
x0 comes back in `model_output.dtype`, re-noised samples in `start_point.dtype`.
All lookups are done on the host in `set_timesteps`, so `step` never syncs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from helios.sampling.schedulers import ChunkScheduler, SchedulerConfig, build_schedule, flow_to_x0


def _nearest_index(timesteps: torch.Tensor, t: float) -> int:
    """Index of the schedule entry nearest to int(t) (first on ties), as the reference does."""
    return int(torch.argmin((timesteps - math.trunc(t)).abs()))


class DMDScheduler(ChunkScheduler):
    """x0-prediction few-step sampler over the pyramid stages (stateless apart from the step counter)."""

    def __init__(self, config: SchedulerConfig | None = None, **overrides: Any):
        base = config or SchedulerConfig(scheduler_type="dmd", time_shift_type="linear")
        config = dataclasses.replace(base, **overrides)
        if config.scheduler_type != "dmd":
            raise ValueError(f"DMDScheduler needs scheduler_type='dmd', got {config.scheduler_type!r}")
        super().__init__(config)
        self._x0_sigmas: list[float] = []
        self._renoise_sigmas: list[float | None] = []

    def set_timesteps(
        self,
        num_inference_steps: int,
        stage_index: int | None = None,
        mu: float | None = None,
        sigmas=None,
        device: torch.device | str | None = None,
        amplify: bool = False,
        extra_timesteps=None,
    ) -> torch.Tensor:
        """Schedule for one stage: `num_inference_steps` steps, doubled when `amplify`."""
        if extra_timesteps:
            raise ValueError("the DMD sampler visits only its own timesteps (extra_timesteps is for "
                             "multi-step pyramid schedulers)")
        t, s = build_schedule(self.config, self.tables, num_inference_steps, stage_index, mu, sigmas, amplify)
        self._use_schedule(t, s, device)
        ts = t.tolist()
        self._x0_sigmas = [s[_nearest_index(t, ti)].item() for ti in ts]
        self._renoise_sigmas = [s[_nearest_index(t, tn)].item() for tn in ts[1:]] + [None]
        self._i = 0
        return self.timesteps

    def reset(self) -> None:
        self._i = 0

    def step(self, model_output: torch.Tensor, sample: torch.Tensor,
             start_point: torch.Tensor | None = None) -> torch.Tensor:
        """x0 from the flow prediction; re-noised towards the next timestep with `start_point`."""
        self._check_can_step()
        s_next = self._renoise_sigmas[self._i]
        if s_next is not None and start_point is None:
            raise ValueError("a DMD step before the stage's last needs start_point (the stage's start latents)")
        x0 = self.denoised(model_output, sample)
        self._i += 1
        return x0 if s_next is None else renoise(x0, start_point, s_next)

    def denoised(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 at the current step, with the sigma of the entry nearest the truncated timestep (as the reference)."""
        return flow_to_x0(model_output, sample, self._x0_sigmas[self._i])


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1 - sigma) * x0 + sigma * noise in float64, returned in the noise's dtype."""
    return ((1 - sigma) * x0.double() + sigma * noise.double()).to(noise.dtype)
