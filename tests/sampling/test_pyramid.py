"""Pyramid helpers: stage resolutions, block noise, renoising, per-stage mu."""

import types

import pytest
import torch
from diffusers import HeliosPyramidPipeline
from diffusers.pipelines.helios.pipeline_helios_pyramid import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from helios.sampling import (
    FlowScheduler,
    SchedulerConfig,
    first_stage_latents,
    initial_noise,
    pyramid_stage_mus,
    renoise_coefficients,
    renoise_for_stage,
    sample_block_noise,
    stage_resolutions,
    upsample_latents,
)
from helios.sampling.pyramid import block_noise_cholesky

from ._reference import ref_scheduler


def ref_block_noise(shape, gamma, gen, patch=(1, 2, 2)):
    fake_pipe = types.SimpleNamespace(scheduler=types.SimpleNamespace(config=types.SimpleNamespace(gamma=gamma)))
    return HeliosPyramidPipeline.sample_block_noise(fake_pipe, *shape, patch, torch.device("cpu"), gen)


def use_our_cholesky(monkeypatch, gamma):
    """The reference factorises its float32 covariance, which is not positive definite on CPU at
    gamma=1/3 (it raises); give it our float64 factor so the rest of its sequence can be compared."""
    L = block_noise_cholesky(gamma)
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a: L.to(a.dtype))


@pytest.mark.parametrize("gamma", [0.25, 0.1])
def test_block_noise_matches_reference(gen, gamma):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    shape = (2, 3, 2, 4, 6)
    g_ref, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    torch.testing.assert_close(sample_block_noise(shape, gamma, generator=g_ours),
                               ref_block_noise(shape, gamma, g_ref), rtol=0, atol=1e-6)
    assert torch.equal(torch.rand(3, generator=g_ours), torch.rand(3, generator=g_ref))  # same draw size


def test_block_noise_default_gamma(gen, monkeypatch):
    use_our_cholesky(monkeypatch, 1 / 3)
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    shape = (1, 4, 3, 8, 12)
    ours = sample_block_noise(shape, 1 / 3, generator=torch.Generator().manual_seed(seed))
    ref = ref_block_noise(shape, 1 / 3, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # at gamma=1/3 each 2x2 patch sums to ~0 and every entry has unit variance
    patches = ours.reshape(1, 4, 3, 4, 2, 6, 2).sum(dim=(4, 6))
    assert patches.abs().max() < 1e-2
    L = block_noise_cholesky(1 / 3)
    torch.testing.assert_close((L @ L.T).diagonal(), torch.ones(4), rtol=0, atol=1e-6)
    assert abs(L[3, 3].item() - 2e-4) < 1e-6  # exact pivot sqrt(4e-8)


def test_stage_resolutions_and_sampling_shapes(gen):
    assert stage_resolutions(48, 80, 3) == [(12, 20), (24, 40), (48, 80)]
    assert stage_resolutions(48, 80, 1) == [(48, 80)]
    x = torch.randn(1, 4, 3, 8, 12, generator=gen)
    x0 = first_stage_latents(x, 3)
    assert x0.shape == (1, 4, 3, 2, 3)
    up = upsample_latents(x0)
    assert up.shape == (1, 4, 3, 4, 6)
    assert torch.equal(up[..., ::2, ::2], x0) and torch.equal(up[..., 1::2, 1::2], x0)
    # one 2x bilinear downsample of a 2x2-constant field returns it, times 2
    assert torch.allclose(first_stage_latents(up, 2), 2 * x0)
    with pytest.raises(ValueError, match="divisible by 4"):
        first_stage_latents(torch.randn(1, 4, 3, 6, 12, generator=gen), 3)


@pytest.mark.parametrize("gamma", [1 / 3, 0.25])
def test_renoise_coefficients_match_scheduler_start_sigmas(gamma):
    ref = ref_scheduler({"_class_name": "HeliosScheduler", "gamma": gamma})
    for k in (1, 2):
        alpha, beta = renoise_coefficients(ref.ori_start_sigmas[k], gamma)
        signal = 1 - ref.ori_start_sigmas[k]
        assert abs((1 - alpha * signal) - ref.start_sigmas[k]) < 1e-12
        assert abs(beta - alpha * (1 - signal) / gamma**0.5) < 1e-12


@pytest.mark.parametrize("noise_dtype", [None, torch.bfloat16])
def test_renoise_for_stage(gen, noise_dtype):
    s = FlowScheduler(SchedulerConfig(gamma=0.25))
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    x = torch.randn(1, 4, 3, 2, 3, generator=gen)
    g = torch.Generator().manual_seed(seed)
    out = renoise_for_stage(x, 2, s.ori_start_sigmas, 0.25, g, noise_dtype=noise_dtype)
    alpha, beta = renoise_coefficients(s.ori_start_sigmas[2], 0.25)
    noise = ref_block_noise((1, 4, 3, 4, 6), 0.25, torch.Generator().manual_seed(seed))
    if noise_dtype is not None:
        noise = noise.to(noise_dtype)
    torch.testing.assert_close(out, alpha * upsample_latents(x) + beta * noise, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        renoise_for_stage(x, 0, s.ori_start_sigmas, 0.25, None)


def test_pyramid_stage_mus_reproduce_pre_upsample_token_counts():
    cfg = SchedulerConfig()
    mus = pyramid_stage_mus((9, 48, 80), 3, cfg)
    # stage 0 and 1 use the 12x20 latents (540 tokens), stage 2 the 24x40 ones (2160)
    assert mus == [calculate_shift(540), calculate_shift(540), calculate_shift(2160)]


def test_initial_noise_matches_randn_tensor(gen):
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    shape = (2, 4, 3, 4, 6)
    ours = initial_noise(shape, torch.Generator().manual_seed(seed))
    assert torch.equal(ours, randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32))
    gens = lambda: [torch.Generator().manual_seed(seed + i) for i in range(2)]  # noqa: E731
    assert torch.equal(initial_noise(shape, gens()), randn_tensor(shape, generator=gens(), dtype=torch.float32))
    with pytest.raises(ValueError, match="generators"):
        initial_noise(shape, gens()[:1] * 3)
