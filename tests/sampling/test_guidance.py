"""CFG and CFG-Zero* match the reference pipelines' arithmetic."""

import pytest
import torch
from diffusers.pipelines.helios.pipeline_helios_pyramid import optimized_scale

from helios.sampling import cfg, cfg_zero_star, cfg_zero_star_scale, is_zero_init_step, uses_cfg

SHAPE = (2, 4, 3, 4, 6)


def test_uses_cfg():
    assert uses_cfg(5.0) and uses_cfg(1.01)
    assert not uses_cfg(1.0) and not uses_cfg(0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cfg(gen, dtype):
    c, u = (torch.randn(SHAPE, generator=gen).to(dtype) for _ in range(2))
    scale = 1 + 6 * torch.rand((), generator=gen).item()
    assert torch.equal(cfg(c, u, scale), u + scale * (c - u))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cfg_zero_star_scale_matches_optimized_scale(gen, dtype):
    c, u = (torch.randn(SHAPE, generator=gen).to(dtype) for _ in range(2))
    c = c + 0.5 * u  # correlated, so s* is not ~0
    ref = optimized_scale(c.view(2, -1), u.view(2, -1)).view(2, 1, 1, 1, 1).to(dtype)
    ours = cfg_zero_star_scale(c, u)
    assert ours.shape == (2, 1, 1, 1, 1) and ours.dtype == dtype
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_zero_star(gen, dtype):
    c, u = (torch.randn(SHAPE, generator=gen).to(dtype) for _ in range(2))
    scale = 5.0
    alpha = optimized_scale(c.view(2, -1), u.view(2, -1)).view(2, 1, 1, 1, 1).to(dtype)
    assert torch.equal(cfg_zero_star(c, u, scale), u * alpha + scale * (c - u * alpha))
    zero = cfg_zero_star(c, u, scale, zero_init=True)
    assert torch.equal(zero, c * 0.0) and zero.dtype == dtype


def test_zero_init_steps():
    # reference: stage 0 only, step i <= zero_steps (inclusive), and only when use_zero_init
    assert [is_zero_init_step(0, i) for i in range(4)] == [True, True, False, False]
    assert [is_zero_init_step(0, i, zero_steps=0) for i in range(3)] == [True, False, False]
    assert not any(is_zero_init_step(k, 0) for k in (1, 2))
    assert not is_zero_init_step(0, 0, use_zero_init=False)
