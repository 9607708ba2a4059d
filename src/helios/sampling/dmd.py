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

from helios.sampling.schedulers import SchedulerConfig, build_schedule, stage_tables


def _nearest_index(timesteps: torch.Tensor, t: float) -> int:
    """Index of the schedule entry nearest to int(t) (first on ties), as the reference does."""
    return int(torch.argmin((timesteps - math.trunc(t)).abs()))


class DMDScheduler:
    """x0-prediction few-step sampler over the pyramid stages (stateless apart from the step counter)."""

    def __init__(self, config: SchedulerConfig | None = None, **overrides: Any):
        base = config or SchedulerConfig(scheduler_type="dmd", time_shift_type="linear")
        config = dataclasses.replace(base, **overrides)
        if config.scheduler_type != "dmd":
            raise ValueError(f"DMDScheduler needs scheduler_type='dmd', got {config.scheduler_type!r}")
        self.config = config
        self.tables = stage_tables(config)
        self.timesteps: torch.Tensor | None = None
        self.timesteps_cpu: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self._x0_sigmas: list[float] = []
        self._renoise_sigmas: list[float | None] = []
        self._i = 0

    @property
    def ori_start_sigmas(self) -> tuple[float, ...]:
        return self.tables.ori_start_sigmas

    @property
    def num_steps(self) -> int:
        return 0 if self.timesteps_cpu is None else len(self.timesteps_cpu)

    @property
    def step_index(self) -> int:
        return self._i

    def set_timesteps(
        self,
        num_inference_steps: int,
        stage_index: int | None = None,
        mu: float | None = None,
        amplify: bool = False,
        device: torch.device | str | None = None,
        sigmas=None,
    ) -> torch.Tensor:
        """Schedule for one stage: `num_inference_steps` steps, doubled when `amplify`."""
        t, s = build_schedule(self.config, self.tables, num_inference_steps, stage_index, mu, sigmas, amplify)
        self.timesteps_cpu, self.sigmas = t, s
        self.timesteps = t.to(device) if device is not None else t
        ts = t.tolist()
        self._x0_sigmas = [s[_nearest_index(t, ti)].item() for ti in ts]
        self._renoise_sigmas = [s[_nearest_index(t, tn)].item() for tn in ts[1:]] + [None]
        self._i = 0
        return self.timesteps

    def reset(self) -> None:
        self._i = 0

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, start_point: torch.Tensor) -> torch.Tensor:
        """x0 from the flow prediction; re-noised towards the next timestep with `start_point`."""
        if self.timesteps_cpu is None:
            raise RuntimeError("call set_timesteps() before step()")
        if self._i >= self.num_steps:
            raise RuntimeError(f"step() called {self._i + 1} times for a {self.num_steps}-step schedule; "
                               "call set_timesteps() for the next stage")
        x0 = flow_to_x0(model_output, sample, self._x0_sigmas[self._i])
        s_next = self._renoise_sigmas[self._i]
        self._i += 1
        return x0 if s_next is None else renoise(x0, start_point, s_next)


def flow_to_x0(flow: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x_t - sigma * v, computed in float64, returned in the flow's dtype."""
    return (sample.double() - sigma * flow.double()).to(flow.dtype)


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1 - sigma) * x0 + sigma * noise in float64, returned in the noise's dtype."""
    return ((1 - sigma) * x0.double() + sigma * noise.double()).to(noise.dtype)
