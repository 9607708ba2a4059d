"""Euler and UniPC steps match diffusers' HeliosScheduler step by step on random model outputs."""

import numpy as np
import pytest
import torch

from helios.sampling import FlowScheduler, SchedulerConfig, base_sigmas

from ._reference import ref_scheduler

SHAPE = (1, 4, 3, 4, 6)  # (B, C, T, H, W)


def run_both(cfg: SchedulerConfig, gen, dtype, stage_args, model_dtype=None):
    """Drive ours and the reference over the same stages with the same random model outputs.

    Each stage restarts from fresh noise; returns the max abs difference over all steps.
    """
    ours, ref = FlowScheduler(cfg), ref_scheduler(cfg.to_dict())
    worst = 0.0
    for args in stage_args:
        ref_kw = dict(args)
        if "stage_index" in ref_kw:
            ref_kw["stage_index"] = ref_kw.pop("stage_index")
        ref.set_timesteps(**ref_kw)
        ours.set_timesteps(**args)
        assert ours.num_steps == len(ref.timesteps)
        x_ours = x_ref = torch.randn(SHAPE, generator=gen, dtype=dtype)
        for i, t in enumerate(ref.timesteps):
            v = torch.randn(SHAPE, generator=gen, dtype=dtype).to(model_dtype or dtype)
            x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
            x_ours = ours.step(v, x_ours)
            assert x_ours.dtype == x_ref.dtype
            assert torch.isfinite(x_ref).all()
            worst = max(worst, (x_ours.double() - x_ref.double()).abs().max().item())
    return worst


def pyramid_stages(gen, n_max=12, mu=True):
    out = []
    for k in range(3):
        n = int(torch.randint(1, n_max, (), generator=gen))
        out.append(dict(num_inference_steps=n, stage_index=k, mu=0.5 + k if mu else None))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dynamic", [None, "exponential", "linear"])
def test_euler_pyramid(gen, dtype, dynamic):
    cfg = SchedulerConfig(scheduler_type="euler", use_dynamic_shifting=dynamic is not None,
                          time_shift_type=dynamic or "exponential")
    assert run_both(cfg, gen, dtype, pyramid_stages(gen)) <= 1e-6


def test_euler_bf16_model_output(gen):
    cfg = SchedulerConfig(scheduler_type="euler", use_dynamic_shifting=True, time_shift_type="linear")
    assert run_both(cfg, gen, torch.float32, pyramid_stages(gen), model_dtype=torch.bfloat16) <= 1e-6


def test_unipc_bf16_model_output(gen):
    cfg = SchedulerConfig(scheduler_type="unipc", use_dynamic_shifting=True, time_shift_type="exponential")
    assert run_both(cfg, gen, torch.float32, pyramid_stages(gen), model_dtype=torch.bfloat16) <= 1e-6


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_euler_single_stage(gen, shift):
    cfg = SchedulerConfig(scheduler_type="euler", stages=1, shift=shift)
    assert run_both(cfg, gen, torch.float32, [dict(num_inference_steps=20)]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dynamic", [None, "exponential", "linear"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_pyramid(gen, dtype, dynamic, order):
    cfg = SchedulerConfig(scheduler_type="unipc", solver_order=order, use_dynamic_shifting=dynamic is not None,
                          time_shift_type=dynamic or "exponential")
    assert run_both(cfg, gen, dtype, pyramid_stages(gen)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dynamic", [None, "exponential", "linear"])
def test_unipc_base_preset(gen, dtype, dynamic):
    """Single stage, 50 steps, the base pipeline's sigmas (and mu for dynamic shifting)."""
    cfg = SchedulerConfig(stages=1, use_dynamic_shifting=dynamic is not None, time_shift_type=dynamic or "exponential")
    args = [dict(num_inference_steps=50, sigmas=base_sigmas(50), mu=1.9)]
    assert run_both(cfg, gen, dtype, args) <= 1e-6


@pytest.mark.parametrize(
    "variant",
    [
        dict(solver_type="bh1"),
        dict(solver_type="bh1", solver_order=3),
        dict(lower_order_final=False),
        dict(lower_order_final=False, solver_order=3),
        dict(disable_corrector=[0, 2, 3]),
        dict(solver_order=4),
        dict(prediction_type="epsilon"),
        dict(prediction_type="v_prediction"),
        dict(prediction_type="sample"),
        dict(predict_x0=False, prediction_type="epsilon"),
        dict(predict_x0=False, prediction_type="v_prediction"),
        dict(predict_x0=False, prediction_type="sample"),
        dict(use_flow_sigmas=False),
        dict(use_flow_sigmas=False, prediction_type="epsilon"),
    ],
)
def test_unipc_variants(gen, variant):
    cfg = SchedulerConfig(scheduler_type="unipc", **variant)
    assert run_both(cfg, gen, torch.float64, pyramid_stages(gen, n_max=10)) <= 1e-6


@pytest.mark.parametrize("solver_type", ["bh2", "midpoint"])
def test_unipc_single_stage_default_sigmas(gen, solver_type):
    """Default stage-1 grid starts at sigma=1 exactly (float32 sigmas)."""
    cfg = SchedulerConfig(stages=1, shift=3.0, solver_type=solver_type)
    assert run_both(cfg, gen, torch.float32, [dict(num_inference_steps=12), dict(num_inference_steps=3)]) <= 1e-6


def test_unipc_restarts_per_stage(gen):
    """set_timesteps drops the history: stage k's result does not depend on earlier stages."""
    s = FlowScheduler(stages=3)
    x0 = torch.randn(SHAPE, generator=gen)
    vs = [torch.randn(SHAPE, generator=gen) for _ in range(4)]

    def run():
        s.set_timesteps(4, 1)
        x = x0
        for v in vs:
            x = s.step(v, x)
        return x

    a = run()
    s.set_timesteps(3, 0)
    s.step(torch.randn(SHAPE, generator=gen), x0)
    assert torch.equal(run(), a)


def test_custom_sigmas_accept_tensor_and_list(gen):
    s = FlowScheduler(stages=1)
    sig = base_sigmas(6)
    s.set_timesteps(6, sigmas=sig)
    t_np = s.timesteps.clone()
    s.set_timesteps(6, sigmas=list(sig))
    assert torch.equal(s.timesteps, t_np)
    s.set_timesteps(6, sigmas=torch.from_numpy(np.array(sig)))
    assert torch.equal(s.timesteps, t_np)
