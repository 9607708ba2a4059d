"""Pyramid Unified Predictor-Corrector: the pure functions around the scheduler.

What the reference pyramid pipeline does per chunk (latents are (B, C, T, H, W)):

    x = initial_noise(shape, generator)              # draw #1: randn of the full-res chunk
    x = first_stage_latents(x, num_stages)           # bilinear /2 (num_stages-1) times, *2 each time
    start = x                                        # DMD only: stage start points
    for k in range(num_stages):
        sched.set_timesteps(steps[k], stage_index=k, mu=mus[k], ...)   # mus: pyramid_stage_mus
        if k > 0:
            x = renoise_for_stage(x, k, sched.ori_start_sigmas, sched.config.gamma, generator)
            start = x                                 # nearest x2 up, alpha*x + beta*block_noise (draw #k+1)
        for i in range(sched.num_steps): ... x = sched.step(...)

* mu quirk: the reference computes stage k's token count from the latents *before*
  that stage's upsample, so stages 0 and 1 both use the lowest resolution and stage 2
  uses the middle one. `pyramid_stage_mus` reproduces this.
* Block noise: randn of shape (B*C*T*(H/2)*(W/2), 4) from `generator` (on the generator's
  device), correlated within each 2x2 patch by the Cholesky factor of
  (1+gamma) I - gamma 11^T (factorised in float64, see `block_noise_cholesky`). The
  reference casts it to the transformer dtype before mixing: pass
  `noise_dtype=transformer_dtype` to do the same.
* Renoise: with s = 1 - ori_start_sigmas[k] (signal level at the stage start),
  alpha = 1 / (sqrt(1 + 1/gamma) (1 - s) + s),  beta = alpha (1 - s) / sqrt(gamma);
  x <- alpha * up(x) + beta * block_noise. Its sigma is sched.tables.start_sigmas[k].
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from helios.sampling.schedulers import SchedulerConfig, compute_mu, token_count


def to_device(t: torch.Tensor, device: torch.device | str | None, non_blocking: bool = False) -> torch.Tensor:
    """`t.to(device)`, the same values either way.

    non_blocking: a host tensor bound for a CUDA device goes through pinned memory and an
    asynchronous copy, so the host does not wait for the device (a plain copy from pageable memory
    synchronises the stream). The caching host allocator keeps the pinned block until the copy has run.
    """
    if device is None:
        return t
    if non_blocking and torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 4-D (N, C, H, W) op to every frame of a (B, C, T, H, W) latent."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, c, y.shape[-2], y.shape[-1]).permute(0, 2, 1, 3, 4)


def stage_resolutions(height: int, width: int, num_stages: int) -> list[tuple[int, int]]:
    """Latent (H, W) of each stage, lowest first: halve (floor) num_stages-1 times, then double."""
    h, w = height, width
    for _ in range(num_stages - 1):
        h, w = h // 2, w // 2
    return [(h << k, w << k) for k in range(num_stages)]


def check_pyramid_shape(height: int, width: int, num_stages: int) -> None:
    """The last stage must come back to the full latent size."""
    if stage_resolutions(height, width, num_stages)[-1] != (height, width):
        f = 2 ** (num_stages - 1)
        raise ValueError(f"latent size {height}x{width} must be divisible by {f} for a {num_stages}-stage pyramid")


def first_stage_latents(noise: torch.Tensor, num_stages: int) -> torch.Tensor:
    """Full-res noise -> stage-0 latents: bilinear half-size, times 2 to keep unit variance."""
    check_pyramid_shape(noise.shape[-2], noise.shape[-1], num_stages)
    return downsampled_levels(noise, num_stages, gain=2.0)[0]


def downsampled_levels(x: torch.Tensor, num_stages: int, gain: float = 1.0) -> list[torch.Tensor]:
    """`x` and its num_stages-1 bilinear halvings (floor sizes), each halving times `gain`, lowest first.

    gain 2 keeps noise at unit variance (the sampler's first stage); gain 1 is clean latents (training)."""
    levels = [x]
    for _ in range(num_stages - 1):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        if gain == 1.0:
            x = _per_frame(lambda f: F.interpolate(f, size=(h, w), mode="bilinear"), x)
        else:
            x = _per_frame(lambda f: F.interpolate(f, size=(h, w), mode="bilinear") * gain, x)
        levels.append(x)
    return levels[::-1]


def upsample_latents(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 in H and W (stage boundary)."""
    h, w = x.shape[-2] * 2, x.shape[-1] * 2
    return _per_frame(lambda f: F.interpolate(f, size=(h, w), mode="nearest"), x)


def renoise_coefficients(ori_start_sigma: float, gamma: float) -> tuple[float, float]:
    """(alpha, beta) for x <- alpha * up(x) + beta * block_noise at a stage start."""
    signal = 1 - ori_start_sigma
    alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - signal) + signal)
    beta = alpha * (1 - signal) / math.sqrt(gamma)
    return alpha, beta


@functools.lru_cache(maxsize=16)
def _cholesky_cached(gamma: float, n: int, device: str) -> torch.Tensor:
    eye = torch.eye(n, dtype=torch.float64)
    cov = eye * (1 + gamma) - torch.ones(n, n, dtype=torch.float64) * gamma + eye * 1e-8
    return torch.linalg.cholesky(cov).float().to(device)


def block_noise_cholesky(gamma: float, patch_size: Sequence[int] = (1, 2, 2), device=None) -> torch.Tensor:
    """float32 lower Cholesky factor of the within-patch covariance (1+gamma) I - gamma 11^T + 1e-8 I.

    Factorised in float64: at the default gamma=1/3 the matrix is singular up to the 1e-8
    jitter (each patch's noise sums to ~0), and the reference's float32 factorisation is not
    positive definite on CPU and leaves a device-dependent last pivot on GPU. Exact math
    gives that pivot sqrt(4e-8) = 2e-4; everything else agrees with float32 to ~1e-7.
    Cached per (gamma, patch, device), so only the first call per device syncs.
    """
    n = patch_size[1] * patch_size[2]
    if not 0 < gamma <= 1 / (n - 1) + 1e-12:
        raise ValueError(f"block noise needs 0 < gamma <= 1/{n - 1} (positive semi-definite covariance), got {gamma}")
    return _cholesky_cached(float(gamma), n, str(torch.device(device or "cpu")))


def sample_block_noise(
    shape: Sequence[int],
    gamma: float,
    patch_size: Sequence[int] = (1, 2, 2),
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Gaussian noise of `shape` (B, C, T, H, W), correlated within each ph x pw patch.

    One randn draw of (B*C*T*(H/ph)*(W/pw), ph*pw) on the generator's device. A list of
    generators uses the first; no generator uses a fresh default-seeded one (as the reference).
    non_blocking: see `to_device`.
    """
    if isinstance(generator, list):
        generator = generator[0]
    if generator is None:
        generator = torch.Generator(device=device or "cpu")
    b, c, t, h, w = shape
    _, ph, pw = patch_size
    L = block_noise_cholesky(gamma, patch_size, device)
    z = torch.randn(b * c * t * (h // ph) * (w // pw), ph * pw, generator=generator, device=generator.device)
    noise = to_device(z, device, non_blocking) @ L.T
    noise = noise.view(b, c, t, h // ph, w // pw, ph, pw).permute(0, 1, 2, 3, 5, 4, 6)
    return noise.reshape(b, c, t, h, w)


def renoise_for_stage(
    x: torch.Tensor,
    stage_index: int,
    ori_start_sigmas: Sequence[float],
    gamma: float,
    generator: torch.Generator | list[torch.Generator] | None,
    patch_size: Sequence[int] = (1, 2, 2),
    noise_dtype: torch.dtype | None = None,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Stage boundary: nearest x2 upsample, then alpha * x + beta * block_noise (one draw).

    `ori_start_sigmas` and `gamma` come from the scheduler (`sched.ori_start_sigmas`,
    `sched.config.gamma`). The output is the new stage's start point. non_blocking: see `to_device`.
    """
    if stage_index < 1:
        raise ValueError(f"renoising happens at the start of stages >= 1, got stage_index={stage_index}")
    x = upsample_latents(x)
    alpha, beta = renoise_coefficients(ori_start_sigmas[stage_index], gamma)
    noise = sample_block_noise(x.shape, gamma, patch_size, generator, x.device, non_blocking)
    if noise_dtype is not None:
        noise = noise.to(noise_dtype)
    return alpha * x + beta * noise


def pyramid_stage_mus(
    latent_thw: Sequence[int],
    num_stages: int,
    config: SchedulerConfig,
    patch_size: Sequence[int] = (1, 2, 2),
) -> list[float]:
    """Dynamic-shift mu of each stage for a full-res (T, H, W) chunk, as the reference computes it.

    Stage k uses the token count of the latents present when its timesteps are set, i.e.
    before its own upsample: resolution max(k-1, 0).
    """
    t, h, w = latent_thw[-3:]
    res = stage_resolutions(h, w, num_stages)
    return [compute_mu(token_count((t, *res[max(k - 1, 0)]), patch_size), config) for k in range(num_stages)]


def initial_noise(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    non_blocking: bool = False,
) -> torch.Tensor:
    """The chunk's starting noise, drawn like diffusers' `randn_tensor` (CPU generator -> CPU draw, then moved).

    A list of generators draws one batch element from each, in order. non_blocking: see `to_device`.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        one = (1, *shape[1:])
        return to_device(torch.cat([torch.randn(one, generator=g, device=_draw_device(g, device), dtype=dtype)
                                    for g in generator]), device, non_blocking)
    noise = torch.randn(tuple(shape), generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return to_device(noise, device, non_blocking)


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Float32 Gaussian noise of `x`'s shape drawn on the generator's device, then given `x`'s device and dtype."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32).to(x.device, x.dtype)


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    if generator is not None and generator.device.type == "cpu":
        return torch.device("cpu")
    return device
