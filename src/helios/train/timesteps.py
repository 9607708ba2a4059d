"""Training timestep sampling, dynamic shifting and flow-matching targets (all stages).

Conventions (same as the official code and diffusers' FlowMatchEulerDiscreteScheduler):
``sigma`` in (0, 1] is the noise level, ``x_t = (1 - sigma) * x0 + sigma * eps``, the model
predicts the velocity ``v = eps - x0`` and receives the timestep ``t = 1000 * sigma``.

Stage 1 (:func:`sample_training_sigmas`): ``u ~ density(weighting_scheme)`` (``logit_normal``:
``u = sigmoid(N(logit_mean, logit_std))``, ``none``: ``u ~ U[0, 1)``), index
``i = floor(1000 u)`` into the training table ``sigma_i = 1 - i / 1000`` (1.0 ... 0.001). With
dynamic shifting, the table is warped ``sigma' = m sigma / (1 + (m - 1) sigma)`` with ``m``
from the token count of the noisy latent (SD3 resolution shift). Loss weighting is 1 for
both ``logit_normal`` and ``none``: the logit-normal scheme only changes the sampling density.

Stage 2 (:func:`sample_pyramid_training_inputs`): Pyramid flow matching over K=3 spatial
scales (see :class:`PyramidSchedule`).

Stage 3 (:func:`sample_dmd_timesteps`, :func:`dmd_sigma_table`): uniform or Beta(alpha, beta)
timesteps with cosine-decayed (alpha, beta), warped by the resolution shift, clamped to
[20, 980].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from helios.sampling.pyramid import downsampled_levels, upsample_latents
from helios.sampling.schedulers import (SchedulerConfig, mu_for_tokens, shift_sigmas, stage_tables,
                                        token_count)

__all__ = [
    "TimestepConfig",
    "sample_density",
    "sample_dynamic_unit",
    "flow_sigma_table",
    "dynamic_shift_factor",
    "sample_training_sigmas",
    "sample_training_sigmas_per_sample",
    "per_sample_noise",
    "add_noise",
    "flow_target",
    "loss_weighting",
    "flow_matching_loss",
    "PyramidSchedule",
    "build_pyramid_schedule",
    "PyramidSample",
    "sample_pyramid_training_inputs",
    "sample_pyramid_training_inputs_per_sample",
    "pyramid_training_inputs",
    "beta_schedule_params",
    "sample_dmd_timesteps",
    "dmd_sigma_table",
    "noise_at_timestep",
]


@dataclass
class TimestepConfig:
    num_train_timesteps: int = 1000
    weighting_scheme: str = "logit_normal"  # "logit_normal" | "none" | "mode" | "sigma_sqrt" | "cosmap"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # static shift of the training table (official stages 1-2: 1.0)
    use_dynamic_shifting: bool = False  # official training_config.use_dynamic_shifting (stage 1-2: false)
    time_shift_type: str = "linear"  # "linear" (m = mu) | "exponential" (m = exp(min(mu, ln 7)))
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    exp_max: float = 7.0
    patch_size: tuple[int, int, int] = (1, 2, 2)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TimestepConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise KeyError(f"unknown TimestepConfig keys: {sorted(unknown)}")
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


def _dev(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_density(
    scheme: str,
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``u`` in (0, 1) for the SD3 sampling densities (``logit_normal``, ``mode``; else uniform)."""
    dev = _dev(generator)
    if scheme == "logit_normal":
        z = torch.randn(batch_size, generator=generator, device=dev) * logit_std + logit_mean
        return torch.sigmoid(z)
    u = torch.rand(batch_size, generator=generator, device=dev)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flow_sigma_table(num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """Training sigma table of FlowMatchEulerDiscreteScheduler: ``[1, 1 - 1/N, ..., 1/N]`` (float64),
    optionally statically shifted."""
    N = num_train_timesteps
    s = torch.arange(N, 0, -1, dtype=torch.float64) / N
    return shift_sigmas(s, shift) if shift != 1.0 else s


def dynamic_shift_factor(seq_len: int, cfg: TimestepConfig | None = None, time_shift_type: str | None = None) -> float:
    """Shift factor ``m`` used as ``sigma' = m sigma / (1 + (m-1) sigma)``.

    ``linear`` (what the official training code uses): ``m = mu``;
    ``exponential``: ``m = exp(min(mu, ln exp_max))``. For 9x48x80 latents: mu = 1.919,
    linear m = 1.919, exponential m = 6.81."""
    cfg = cfg or TimestepConfig()
    kind = time_shift_type or cfg.time_shift_type
    mu = mu_for_tokens(seq_len, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)
    if kind == "exponential":
        return math.exp(min(mu, math.log(cfg.exp_max)))
    if kind == "linear":
        return mu
    raise ValueError(f"unknown time_shift_type {kind!r}")


def _unit_draws(cfg: TimestepConfig, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` draws of ``u`` from the config's sampling density."""
    return sample_density(cfg.weighting_scheme, n, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                          mode_scale=cfg.mode_scale, generator=generator)


def _training_sigmas(u: torch.Tensor, cfg: TimestepConfig,
                     latent_shape: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``u (B,)`` -> ``(sigmas, timesteps)`` through the (shifted) training table."""
    N = cfg.num_train_timesteps
    idx = (u * N).long().clamp(0, N - 1).cpu()
    table = flow_sigma_table(N, cfg.shift)
    if cfg.use_dynamic_shifting:
        if latent_shape is None:
            raise ValueError("dynamic shifting needs latent_shape")
        table = shift_sigmas(table, dynamic_shift_factor(token_count(latent_shape, cfg.patch_size), cfg))
    sigmas = table[idx].float()
    return sigmas, sigmas * N


def sample_training_sigmas(
    batch_size: int,
    cfg: TimestepConfig,
    latent_shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 sampling. Returns ``(sigmas (B,) float32, timesteps (B,) float32 = 1000*sigma)``.

    ``latent_shape`` (of the noisy chunk, ``(..., T, H, W)``) is needed only for dynamic shifting.
    """
    return _training_sigmas(_unit_draws(cfg, batch_size, generator), cfg, latent_shape)


def sample_training_sigmas_per_sample(
    cfg: TimestepConfig,
    latent_shape: Sequence[int] | None,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_training_sigmas` of one sample per generator (the same values as calling it with
    ``batch_size=1`` per sample); only the draws are per sample, the table look-up is done once."""
    u = torch.cat([_unit_draws(cfg, 1, g) for g in generators])
    return _training_sigmas(u, cfg, latent_shape)


def per_sample_noise(shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``randn(shape)`` from each generator (one per sample), stacked on the generators' device:
    ``(len(generators), *shape)``; move it to the model's device once."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=_dev(g)) for g in generators])


def _bcast(s: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(s):
        return torch.tensor(s, device=x.device, dtype=x.dtype)
    s = s.to(x.device, x.dtype)
    return s.reshape(s.shape + (1,) * (x.ndim - s.ndim))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor | float) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise`` (``sigmas`` of shape (B,) broadcast over the rest)."""
    s = _bcast(sigmas, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity target of the official code: ``noise - x0`` (computed from the *clean* latent even
    when the noisy input was built from a corrupted one)."""
    return noise - x0


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """SD3 loss weights; 1 for ``logit_normal`` / ``none`` / ``mode`` (the ones Helios uses)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, scheme: str = "none"
) -> torch.Tensor:
    """``mean_b( mean( w(sigma_b) * (pred - target)^2 ) )`` in float32, as the official ``_flow_loss``."""
    w = _bcast(loss_weighting(scheme, sigmas), pred.float())
    per = (w * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(1)
    return per.mean()


# --------------------------------------------------------------------------------------------
# Stage 2: pyramid flow matching


@dataclass
class PyramidSchedule:
    """Per-stage constants of the pyramid scheduler (official HeliosScheduler, version v1).

    Stage ``k`` (0 = lowest resolution) trains on the path ``x = s * start_k + (1 - s) * end_k``
    with a *local* ``s = sigmas_local[i]`` (``linspace(0.999, 0, N+1)[:-1]``) while the model sees
    the *global* timestep ``t = timesteps_k[i]`` (``linspace(t_max_k, t_min_k, N+1)[:-1]``)."""

    num_stages: int
    stage_range: tuple[float, ...]
    gamma: float
    num_train_timesteps: int
    start_sigmas: list[float]  # corrected (for k > 0) start sigma of each stage
    end_sigmas: list[float]
    ori_start_sigmas: list[float]  # uncorrected start sigma (used by the inference renoise)
    t_max: list[float]
    t_min: list[float]
    stage_timesteps: tuple[torch.Tensor, ...]  # (N,) float64 per stage: the sampler's tables

    def sigmas_local(self) -> torch.Tensor:
        N = self.num_train_timesteps
        return torch.linspace(0.999, 0.0, N + 1, dtype=torch.float64)[:-1]

    def timesteps(self, stage: int) -> torch.Tensor:
        return self.stage_timesteps[stage]


def build_pyramid_schedule(
    num_stages: int = 3,
    stage_range: Sequence[float] = (0.0, 1 / 3, 2 / 3, 1.0),
    gamma: float = 1 / 3,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
) -> PyramidSchedule:
    """The training view of the sampler's stage tables (:func:`helios.sampling.schedulers.stage_tables`)."""
    tables = stage_tables(SchedulerConfig(num_train_timesteps=num_train_timesteps, shift=shift, stages=num_stages,
                                          stage_range=tuple(stage_range), gamma=gamma))
    return PyramidSchedule(num_stages, tuple(stage_range), gamma, num_train_timesteps, list(tables.start_sigmas),
                           list(tables.end_sigmas), list(tables.ori_start_sigmas),
                           [b[0] for b in tables.timestep_bounds], [b[1] for b in tables.timestep_bounds],
                           tables.stage_timesteps)


@dataclass
class PyramidSample:
    stage: int
    noisy: torch.Tensor
    sigmas: torch.Tensor  # (B,) local path sigma
    timesteps: torch.Tensor  # (B,) global timestep fed to the model
    target: torch.Tensor  # start - end


def sample_pyramid_training_inputs(
    x0: torch.Tensor,
    schedule: PyramidSchedule,
    sample_ratios: Sequence[int] = (1, 2, 1),
    cfg: TimestepConfig | None = None,
    generator: torch.Generator | None = None,
) -> list[PyramidSample]:
    """Official stage-2 training inputs for one batch of clean latents ``x0 (B, C, T, H, W)``.

    One full-resolution noise draw; for stage ``k``::

        start_0 = noise_0
        start_k = S_k * noise_k + (1 - S_k) * up_nearest(x0_{k-1})      (k > 0, S_k corrected start)
        end_k   = E_k * noise_k + (1 - E_k) * x0_k                       (k < K-1)
        end_K-1 = x0
        x_t     = s * start_k + (1 - s) * end_k,   target = start_k - end_k

    ``sample_ratios[k]`` independent timestep draws per stage (init [1, 2, 1], post [1, 1, 1]);
    the official code packs all of them in one NaViT forward with the same history and averages
    the per-sample losses. Weighting (stage 2: ``none``) -> uniform ``u``.
    """
    cfg = cfg or TimestepConfig(weighting_scheme="none")
    noise, u = _pyramid_draws(x0.shape, sum(sample_ratios), cfg, generator)
    return pyramid_training_inputs(x0, noise, u, schedule, sample_ratios, cfg)


def sample_pyramid_training_inputs_per_sample(
    x0: torch.Tensor,
    schedule: PyramidSchedule,
    sample_ratios: Sequence[int],
    cfg: TimestepConfig | None,
    generators: Sequence[torch.Generator],
) -> list[PyramidSample]:
    """:func:`sample_pyramid_training_inputs` of each row of ``x0`` with its own generator (the same
    values as calling it per sample); only the draws are per sample, the pyramid maths is batched."""
    cfg = cfg or TimestepConfig(weighting_scheme="none")
    if len(generators) != x0.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {x0.shape[0]}")
    draws = [_pyramid_draws((1, *x0.shape[1:]), sum(sample_ratios), cfg, g) for g in generators]
    noise, u = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    return pyramid_training_inputs(x0, noise, u, schedule, sample_ratios, cfg)


def _pyramid_draws(shape: Sequence[int], n_draws: int, cfg: TimestepConfig,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of the pyramid inputs of a batch ``shape = (B, ...)``, in the official order:
    the noise, then ``B`` values of ``u`` per timestep draw. Returns ``(noise, u (B, n_draws))``."""
    noise = torch.randn(tuple(shape), generator=generator, device=_dev(generator))
    u = torch.stack([_unit_draws(cfg, shape[0], generator) for _ in range(n_draws)], dim=1)
    return noise, u


def _pyramid_path(clean: list[torch.Tensor], noises: list[torch.Tensor], schedule: PyramidSchedule,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start_k, end_k)`` of pyramid stage ``k`` (docstring of :func:`sample_pyramid_training_inputs`)."""
    K = schedule.num_stages
    if k == 0:
        start = noises[0]
    else:
        up = upsample_latents(clean[k - 1])
        if up.shape[-2:] != clean[k].shape[-2:]:
            raise ValueError("latent H, W must be divisible by 2**(num_stages-1)")
        start = schedule.start_sigmas[k] * noises[k] + (1 - schedule.start_sigmas[k]) * up
    end = clean[k] if k == K - 1 else schedule.end_sigmas[k] * noises[k] + (1 - schedule.end_sigmas[k]) * clean[k]
    return start, end


def pyramid_training_inputs(
    x0: torch.Tensor,
    noise: torch.Tensor,
    u: torch.Tensor,
    schedule: PyramidSchedule,
    sample_ratios: Sequence[int],
    cfg: TimestepConfig,
) -> list[PyramidSample]:
    """The deterministic part of :func:`sample_pyramid_training_inputs`: ``noise`` (shape of ``x0``)
    and ``u (B, sum(sample_ratios))`` (the draws of every stage, lowest stage first) -> the inputs,
    each computed once for the whole batch."""
    K = schedule.num_stages
    if len(sample_ratios) != K:
        raise ValueError("sample_ratios must have one entry per stage")
    clean = downsampled_levels(x0, K)  # clean latents per level, lowest first
    noises = downsampled_levels(noise.to(x0.device, x0.dtype), K, gain=2.0)
    N = schedule.num_train_timesteps
    local = schedule.sigmas_local()
    idx = (u * N).long().clamp(0, N - 1).cpu()  # (B, draws): table rows, looked up on the host
    out: list[PyramidSample] = []
    for k in range(K):
        start, end = _pyramid_path(clean, noises, schedule, k)
        target = (start - end).to(x0.dtype)  # shared by the stage's draws
        tk = schedule.timesteps(k)
        for _ in range(sample_ratios[k]):
            i = idx[:, len(out)]
            s, t = local[i], tk[i]
            if cfg.use_dynamic_shifting:
                m = dynamic_shift_factor(token_count(start.shape, cfg.patch_size), cfg)
                s = shift_sigmas(s, m)
                t = schedule.t_min[k] + s * (schedule.t_max[k] - schedule.t_min[k])
            sb = _bcast(s.float(), start)
            noisy = sb * start + (1 - sb) * end
            out.append(PyramidSample(k, noisy.to(x0.dtype), s.float(), t.float(), target))
    return out


# --------------------------------------------------------------------------------------------
# Stage 3: DMD / critic timesteps


def beta_schedule_params(alpha: float, beta: float, global_step: int, dynamic_step: int) -> tuple[float, float]:
    """Cosine decay of Beta(alpha, beta) towards Beta(1, 1) (uniform) over ``dynamic_step`` steps."""
    if dynamic_step <= 0:
        return alpha, beta
    p = min(float(global_step) / float(dynamic_step), 1.0)
    c = 0.5 * (1.0 + math.cos(p * math.pi))
    return 1.0 + (alpha - 1.0) * c, 1.0 + (beta - 1.0) * c


def sample_dynamic_unit(n: int, sample_type: str = "uniform", alpha: float = 4.0, beta: float = 1.5,
                        global_step: int = 0, dynamic_step: int = 500,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws in (0, 1]: ``uniform`` (``0.001 + 0.999 u``) or Beta(alpha, beta) decaying to uniform
    over ``dynamic_step`` steps (official ``sample_dynamic_timestep`` / ``sample_dynamic_dmd_num_latent_sections``)."""
    dev = _dev(generator)
    if sample_type == "uniform":
        return torch.rand(n, generator=generator, device=dev) * (1.0 - 0.001) + 0.001
    if sample_type == "beta":
        a, b = beta_schedule_params(alpha, beta, global_step, dynamic_step)
        # Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b), drawn from the generator
        ga = _gamma(a, n, generator)
        gb = _gamma(b, n, generator)
        return ga / (ga + gb)
    raise ValueError(f"unknown sample_type {sample_type!r}")


def sample_dmd_timesteps(
    batch_size: int,
    *,
    shift: float = 1.0,
    sample_type: str = "uniform",
    alpha: float = 4.0,
    beta: float = 1.5,
    global_step: int = 0,
    dynamic_step: int = 500,
    num_train_timesteps: int = 1000,
    min_timestep: float = 0.0,
    max_timestep: float = 1000.0,
    min_step: int = 20,
    max_step: int = 980,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer timesteps for re-noising the generator output before the real/fake scores
    (generator: ``beta`` with (4, 1.5) -> (1, 1) over 500 steps; critic: ``uniform``).
    ``t = min + u (max - min)``, warped by ``shift`` if > 1, clamped to [20, 980], rounded."""
    u = sample_dynamic_unit(batch_size, sample_type, alpha, beta, global_step, dynamic_step, generator)
    t = min_timestep + u.double() * (max_timestep - min_timestep)
    if shift > 1:
        r = t / num_train_timesteps
        t = shift * r / (1 + (shift - 1) * r) * num_train_timesteps
    return t.clamp(min_step, max_step).round().long().cpu()


def _gamma(k: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(k, 1) samples from the generator (Marsaglia-Tsang, vectorised with retries)."""
    dev = _dev(generator)
    boost = k < 1.0
    kk = k + 1.0 if boost else k
    d = kk - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64)
    filled = torch.zeros(n, dtype=torch.bool)
    while not bool(filled.all()):
        m = int((~filled).sum())
        x = torch.randn(m, generator=generator, device=dev).double().cpu()
        u = torch.rand(m, generator=generator, device=dev).double().cpu()
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        idx = (~filled).nonzero().squeeze(1)
        out[idx[ok]] = (d * v)[ok]
        filled[idx[ok]] = True
    if boost:
        u = torch.rand(n, generator=generator, device=dev).double().cpu()
        out = out * u ** (1.0 / k)
    return out


def dmd_sigma_table(
    latent_shape: Sequence[int],
    cfg: TimestepConfig,
    static_shift: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Stage-3 sigma table ``linspace(1, 1/N, N)`` shifted by the dynamic factor of
    ``latent_shape`` (official: ``(1, 16, num_critic_input_frames=9, H, W)``, linear type)
    or by ``static_shift`` when dynamic shifting is off. Returns ``(sigmas, timesteps, shift)``;
    the returned shift is also the one to pass to :func:`sample_dmd_timesteps` (the official
    code overrides ``dmd_timestep_shift`` with it)."""
    N = cfg.num_train_timesteps
    s = torch.linspace(1.0, 1.0 / N, N, dtype=torch.float64)
    if cfg.use_dynamic_shifting:
        shift = dynamic_shift_factor(token_count(latent_shape, cfg.patch_size), cfg)
        s = shift_sigmas(s, shift)
    else:
        shift = static_shift
        if shift > 1:
            s = shift_sigmas(s, shift)
    return s, s * N, shift


def noise_at_timestep(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    sigma_table: torch.Tensor,
    timestep_table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-noise at integer ``timesteps`` (B,) using the nearest entry of the table (official
    ``add_noise``). Returns ``(x_t, sigmas (B,))``."""
    idx = torch.argmin((timestep_table[None, :] - timesteps.double().cpu()[:, None]).abs(), dim=1)
    s = sigma_table[idx].float()
    return add_noise(x0, noise, s), s
