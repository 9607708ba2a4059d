"""Timestep sampling, dynamic shifting, flow-matching targets, pyramid and DMD timesteps."""

from __future__ import annotations

import math

import torch

from helios.sampling.schedulers import flow_to_x0
from helios.sampling.schedulers import shift_sigmas as apply_shift
from helios.sampling.schedulers import token_count as image_seq_len
from helios.train.timesteps import (
    TimestepConfig,
    add_noise,
    beta_schedule_params,
    build_pyramid_schedule,
    dmd_sigma_table,
    dynamic_shift_factor,
    flow_matching_loss,
    flow_sigma_table,
    flow_target,
    noise_at_timestep,
    sample_dmd_timesteps,
    sample_pyramid_training_inputs,
    sample_training_sigmas,
)

N = 20000


def test_stage1_logit_normal_vs_uniform():
    g = torch.Generator().manual_seed(0)
    s_ln, t_ln = sample_training_sigmas(N, TimestepConfig(weighting_scheme="logit_normal"), generator=g)
    s_u, _ = sample_training_sigmas(N, TimestepConfig(weighting_scheme="none"), generator=g)
    for s in (s_ln, s_u):
        assert s.min() >= 0.001 - 1e-7 and s.max() <= 1.0
        assert abs(s.mean().item() - 0.5) < 0.01
    torch.testing.assert_close(t_ln, s_ln * 1000)
    mid = lambda s: ((s > 0.25) & (s < 0.75)).float().mean().item()  # noqa: E731
    p = math.erf(math.log(3) / math.sqrt(2))  # P(|N(0,1)| < logit(0.75))
    assert abs(mid(s_ln) - p) < 0.015 and abs(mid(s_u) - 0.5) < 0.015
    # the sigma grid is the flow-matching training table 1, 0.999, ..., 0.001
    table = flow_sigma_table()
    assert table[0] == 1 and abs(table[-1].item() - 0.001) < 1e-12 and len(table) == 1000
    assert torch.isin(s_u.double(), table.float().double()).all()


def test_shift_monotonicity():
    sig = torch.linspace(0.001, 1, 500, dtype=torch.float64)
    prev = None
    for m in (0.5, 1.0, 1.919, 3.0, 6.8):
        y = apply_shift(sig, m)
        assert (torch.diff(y) > 0).all()  # monotone in sigma
        assert abs(y[-1].item() - 1) < 1e-12
        if prev is not None:
            assert (y[:-1] > prev[:-1]).all()  # larger shift -> noisier
        prev = y
    lens = [image_seq_len((9, h, w)) for h, w in ((12, 20), (24, 40), (48, 80), (60, 104))]
    assert lens[2] == 8640
    for kind in ("linear", "exponential"):
        f = [dynamic_shift_factor(n, time_shift_type=kind) for n in lens]
        assert all(b > a for a, b in zip(f, f[1:]))
    assert abs(dynamic_shift_factor(8640) - 1.91917) < 1e-4
    assert abs(dynamic_shift_factor(8640, time_shift_type="exponential") - 6.8153) < 1e-3
    assert abs(dynamic_shift_factor(10**6, time_shift_type="exponential") - 7.0) < 1e-9  # capped at exp_max
    # dynamically shifted sampling: more tokens -> higher mean sigma
    g = torch.Generator().manual_seed(1)
    cfg = TimestepConfig(use_dynamic_shifting=True)
    means = [sample_training_sigmas(4000, cfg, (9, h, w), generator=g)[0].mean().item() for h, w in ((12, 20), (48, 80))]
    assert means[1] > means[0] + 0.05


def test_flow_matching_target_and_loss():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 16, 9, 4, 4, generator=g), torch.randn(3, 16, 9, 4, 4, generator=g)
    s = torch.tensor([0.0, 0.3, 1.0])
    xt = add_noise(x0, eps, s)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], eps[2])
    v = flow_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(flow_to_x0(v, xt, s), x0, atol=1e-5, rtol=0)
    pred = v + 0.1
    loss = flow_matching_loss(pred, v, s, "logit_normal")
    torch.testing.assert_close(loss, torch.tensor(0.01), atol=1e-6, rtol=0)


def test_pyramid_schedule_and_inputs():
    sch = build_pyramid_schedule()
    assert sch.t_max[0] == 999.0 and abs(sch.t_min[2] - 0.999) < 1e-9
    for k in range(2):
        assert abs(sch.t_min[k] - sch.t_max[k + 1]) < 1e-9  # contiguous global timestep ranges
    assert all(a > b for a, b in zip(sch.t_max, sch.t_min))
    assert abs(sch.end_sigmas[0] - 0.666333) < 1e-5 and sch.end_sigmas[2] == 0.0
    assert all(s > e for s, e in zip(sch.start_sigmas, sch.end_sigmas))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 16, 9, 8, 12, generator=g)
    out = sample_pyramid_training_inputs(x0, sch, (1, 2, 1), generator=g)
    assert [o.stage for o in out] == [0, 1, 1, 2]
    assert [tuple(o.noisy.shape[-2:]) for o in out] == [(2, 3), (4, 6), (4, 6), (8, 12)]
    for o in out:
        k = o.stage
        assert ((o.timesteps <= sch.t_max[k] + 1e-4) & (o.timesteps >= sch.t_min[k] - 1e-4)).all()
        assert ((o.sigmas >= 0) & (o.sigmas <= 0.999)).all()
    # last stage ends at the clean latent: x_t + sigma * target is the start, x_t - (1-sigma) * target the end
    last = out[-1]
    s = last.sigmas.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(last.noisy - (s * last.target), x0, atol=1e-5, rtol=0)
    assert len(sample_pyramid_training_inputs(x0, sch, (1, 1, 1), generator=g)) == 3


def test_dmd_timesteps():
    g = torch.Generator().manual_seed(4)
    t = sample_dmd_timesteps(N, sample_type="uniform", generator=g)
    assert t.dtype == torch.long and t.min() >= 20 and t.max() <= 980
    assert abs(t.float().mean().item() - 500) < 10
    b0 = sample_dmd_timesteps(N, sample_type="beta", alpha=4.0, beta=1.5, global_step=0, generator=g)
    b_late = sample_dmd_timesteps(N, sample_type="beta", alpha=4.0, beta=1.5, global_step=500, generator=g)
    assert abs(b0.float().mean().item() / 1000 - 4 / 5.5) < 0.01  # Beta(4, 1.5): high noise first
    assert abs(b_late.float().mean().item() - 500) < 10  # decayed to uniform
    assert beta_schedule_params(4.0, 1.5, 250, 500) == (2.5, 1.25)
    shifted = sample_dmd_timesteps(N, shift=1.919, generator=g)
    assert shifted.float().mean() > t.float().mean() + 50
    sig, ts, shift = dmd_sigma_table((1, 16, 9, 48, 80), TimestepConfig(use_dynamic_shifting=True))
    assert abs(shift - 1.91917) < 1e-4 and len(sig) == 1000 and abs(sig[0].item() - 1) < 1e-12
    x0 = torch.zeros(2, 1, 1, 1, 1)
    xt, s = noise_at_timestep(x0, torch.ones_like(x0), torch.tensor([980, 20]), sig, ts)
    assert abs(s[0].item() - 0.98) < 2e-3 and abs(s[1].item() - 0.02) < 2e-3
    torch.testing.assert_close(xt.flatten(), s)
