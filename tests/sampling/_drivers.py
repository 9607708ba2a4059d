"""Minimal sampling loops built only from helios.sampling: what an engine does per chunk.

They reproduce the reference pipelines' sampler-side sequence (noise draws, schedules,
guidance, pyramid transitions) for a model that ignores the history latents.
"""

import torch

from helios.sampling import (
    DMDScheduler,
    base_sigmas,
    cfg,
    cfg_zero_star,
    compute_mu,
    first_stage_latents,
    initial_noise,
    is_zero_init_step,
    model_timestep,
    pyramid_stage_mus,
    renoise_for_stage,
    token_count,
    uses_cfg,
)


def guided(model, x, t, prompt, negative, scale, zero_star=False, zero_init=False):
    cond = model(x, t, prompt)[0]
    if not uses_cfg(scale):
        return cond
    uncond = model(x, t, negative)[0]
    return cfg_zero_star(cond, uncond, scale, zero_init) if zero_star else cfg(cond, uncond, scale)


def base_chunk(sched, model, shape, generator, prompt, negative, scale, num_steps):
    """Helios-Base: one stage, sigmas linspace(0.999, 0, n+1)[:-1], mu from the full chunk."""
    patch = model.config.patch_size
    x = initial_noise(shape, generator)
    mu = compute_mu(token_count(shape[2:], patch), sched.config)
    sched.set_timesteps(num_steps, sigmas=base_sigmas(num_steps), mu=mu)
    for i in range(sched.num_steps):
        t = model_timestep(sched.timesteps[i], shape[0])  # float timesteps
        v = guided(model, x.to(model.dtype), t, prompt, negative, scale)
        x = sched.step(v, x)
    return x


def pyramid_chunk(sched, model, shape, generator, prompt, negative, scale, steps,
                  zero_star=False, use_zero_init=True, zero_steps=1, amplify=False):
    """Helios-Mid / Distilled: pyramid stages, renoise at boundaries, DMD start points."""
    patch, dtype, stages = model.config.patch_size, model.dtype, len(steps)
    dmd = isinstance(sched, DMDScheduler)
    x = first_stage_latents(initial_noise(shape, generator), stages)
    mus = pyramid_stage_mus(shape[2:], stages, sched.config, patch)
    start = x
    for k in range(stages):
        if dmd:
            sched.set_timesteps(steps[k], k, mu=mus[k], amplify=amplify)
        else:
            sched.set_timesteps(steps[k], k, mu=mus[k])
        if k > 0:
            x = renoise_for_stage(x, k, sched.ori_start_sigmas, sched.config.gamma, generator, patch, noise_dtype=dtype)
            start = x
        for i in range(sched.num_steps):
            t = model_timestep(sched.timesteps[i], shape[0], truncate=True)
            v = guided(model, x.to(dtype), t, prompt, negative, scale, zero_star,
                       is_zero_init_step(k, i, use_zero_init, zero_steps))
            x = sched.step(v, x, start) if dmd else sched.step(v, x)
    return x


def run_chunks(chunk_fn, num_chunks, **kw):
    """Chunks share one generator; the reference returns the generated frames in float32."""
    amplify = kw.pop("amplify_first_chunk", None)
    outs = []
    for c in range(num_chunks):
        extra = {} if amplify is None else {"amplify": amplify and c == 0}
        outs.append(chunk_fn(**kw, **extra).float())
    return torch.cat(outs, dim=2)
