"""DMD few-step sampling matches diffusers' HeliosDMDScheduler step by step."""

import pytest
import torch

from helios.sampling import DMDScheduler, SchedulerConfig
from helios.sampling.dmd import flow_to_x0, renoise

from ._reference import ref_scheduler

SHAPE = (1, 4, 3, 4, 6)


def run_both(cfg, gen, steps, amplify, dtype=torch.float32, model_dtype=None, mus=(1.0, 1.5, 2.2)):
    ours, ref = DMDScheduler(cfg), ref_scheduler(cfg.to_dict())
    worst = 0.0
    for k, n in enumerate(steps):
        stage = k if cfg.stages > 1 else None
        ref.set_timesteps(n, stage, mu=mus[k], is_amplify_first_chunk=amplify)
        ours.set_timesteps(n, stage, mu=mus[k], amplify=amplify)
        assert ours.num_steps == len(ref.timesteps) == (2 * n if amplify else n)
        start = x_ref = x_ours = torch.randn(SHAPE, generator=gen, dtype=dtype)
        for i, t in enumerate(ref.timesteps):
            v = torch.randn(SHAPE, generator=gen, dtype=dtype).to(model_dtype or dtype)
            x_ref = ref.step(v, t, x_ref, return_dict=False, cur_sampling_step=i, dmd_noisy_tensor=start,
                             dmd_sigmas=ref.sigmas, dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps)[0]
            x_ours = ours.step(v, x_ours, start)
            assert x_ours.dtype == x_ref.dtype
            worst = max(worst, (x_ours.double() - x_ref.double()).abs().max().item())
    return worst


@pytest.mark.parametrize("amplify", [False, True])
@pytest.mark.parametrize("dynamic", [None, "linear", "exponential"])
@pytest.mark.parametrize("steps", [(1, 1, 1), (2, 2, 2), (3, 1, 4)])
def test_dmd_pyramid(gen, amplify, dynamic, steps):
    cfg = SchedulerConfig(scheduler_type="dmd", use_dynamic_shifting=dynamic is not None,
                          time_shift_type=dynamic or "linear")
    assert run_both(cfg, gen, steps, amplify) <= 1e-6


@pytest.mark.parametrize("dtype,model_dtype", [(torch.float64, None), (torch.float32, torch.bfloat16)])
def test_dmd_dtypes(gen, dtype, model_dtype):
    cfg = SchedulerConfig(scheduler_type="dmd", use_dynamic_shifting=True, time_shift_type="linear")
    assert run_both(cfg, gen, (2, 2, 2), True, dtype, model_dtype) <= 1e-6


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dmd_single_stage(gen, shift):
    cfg = SchedulerConfig(scheduler_type="dmd", stages=1, shift=shift)
    assert run_both(cfg, gen, (4,), False) <= 1e-6


def test_last_step_returns_x0_and_others_renoise_with_start_point(gen):
    s = DMDScheduler(use_dynamic_shifting=True)
    s.set_timesteps(2, 0, mu=1.9)
    start = torch.randn(SHAPE, generator=gen)
    v = torch.randn(SHAPE, generator=gen)
    x1 = s.step(v, start, start)
    sig = s.sigmas
    x0 = start - sig[0].item() * v
    torch.testing.assert_close(x1, (1 - sig[1].item()) * x0 + sig[1].item() * start, rtol=0, atol=1e-6)
    v2 = torch.randn(SHAPE, generator=gen)
    torch.testing.assert_close(s.step(v2, x1, start), x1 - sig[1].item() * v2, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(v2, x1, start)


def test_helpers_keep_reference_dtypes(gen):
    v = torch.randn(SHAPE, generator=gen).bfloat16()
    x = torch.randn(SHAPE, generator=gen)
    assert flow_to_x0(v, x, 0.5).dtype == torch.bfloat16
    assert renoise(flow_to_x0(v, x, 0.5), x, 0.3).dtype == torch.float32
