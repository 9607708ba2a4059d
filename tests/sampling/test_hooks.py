"""The sampler's hooks (ChunkHooks) and the one scheduler interface (ChunkScheduler) that training uses."""

import pytest
import torch

from helios.sampling import DMDScheduler, FlowScheduler, SchedulerConfig
from helios.sampling.sampler import ChunkHooks, SamplerSettings, denoise_chunk, stage_timesteps
from helios.sampling.schedulers import ChunkScheduler, flow_to_x0

SHAPE = (1, 4, 2, 8, 8)
DISTILLED = SamplerSettings(pyramid_steps=(2, 2, 2), guidance_scale=1.0)


def linear_predict(x, t, with_uncond):
    """A velocity that depends on the sample and the timestep, so every step changes the result."""
    return 0.3 * x + t.float().view(-1, 1, 1, 1, 1) / 1000, None


def run(hooks=None, seed=0, scheduler=None, settings=DISTILLED):
    sched = scheduler or DMDScheduler(use_dynamic_shifting=True)
    calls = []

    def predict(x, t, with_uncond):
        calls.append(int(t[0]))
        return linear_predict(x, t, with_uncond)

    out = denoise_chunk(predict, SHAPE, sched, settings, torch.Generator().manual_seed(seed), torch.device("cpu"),
                        hooks=hooks)
    return out, calls


def test_exiting_at_the_last_steps_is_the_plain_sampler():
    plain, plain_calls = run()
    hooked, calls = run(ChunkHooks(exit_step=lambda stage, n: n - 1))
    assert torch.equal(plain, hooked) and calls == plain_calls


def test_an_early_exit_skips_the_rest_of_the_stage_and_hands_on_its_x0():
    plain, plain_calls = run()
    early, calls = run(ChunkHooks(exit_step=lambda stage, n: 0))
    assert len(plain_calls) == 6 and len(calls) == 3  # one model call per stage
    assert calls[0] == plain_calls[0]  # same first stage schedule
    assert not torch.equal(plain, early)


def test_model_context_wraps_every_model_call_and_says_which_exits():
    seen = []

    class Record:
        def __init__(self, key):
            self.key = key

        def __enter__(self):
            seen.append(self.key)

        def __exit__(self, *exc):
            return False

    run(ChunkHooks(exit_step=lambda stage, n: 1, model_context=lambda k, i, exiting: Record((k, i, exiting))))
    assert seen == [(k, i, i == 1) for k in range(3) for i in range(2)]


def test_bad_exits_and_single_stage_hooks_are_refused():
    with pytest.raises(ValueError, match="exit step 2 outside the 2 steps of stage 0"):
        run(ChunkHooks(exit_step=lambda stage, n: n))
    with pytest.raises(ValueError, match="single stage"):
        run(ChunkHooks(exit_step=lambda stage, n: 0), scheduler=FlowScheduler(SchedulerConfig(stages=1)),
            settings=SamplerSettings(steps=3, guidance_scale=1.0))


def test_stage_timesteps_are_the_ones_the_sampler_feeds():
    sched = DMDScheduler(use_dynamic_shifting=True)
    _, calls = run(scheduler=sched)
    expected = [int(t) for stage in stage_timesteps(sched, SHAPE, DISTILLED) for t in stage]
    assert calls == expected


def test_both_schedulers_share_the_interface_and_denoise_at_the_step_sigma():
    flow, dmd = FlowScheduler(SchedulerConfig()), DMDScheduler()
    assert isinstance(flow, ChunkScheduler) and isinstance(dmd, ChunkScheduler)
    g = torch.Generator().manual_seed(3)
    v, x = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    flow.set_timesteps(4, stage_index=0, amplify=True)  # amplify is the DMD sampler's: no effect here
    assert flow.num_steps == 4
    flow.step(v, x, x)
    torch.testing.assert_close(flow.denoised(v, x), x - flow.sigmas[1].item() * v, rtol=0, atol=1e-6)
    dmd.set_timesteps(2, stage_index=0)
    with pytest.raises(ValueError, match="needs start_point"):
        dmd.step(v, x)
    assert torch.equal(dmd.denoised(v, x), flow_to_x0(v, x, dmd._x0_sigmas[0]))
    with pytest.raises(ValueError, match="visits only its own timesteps"):
        dmd.set_timesteps(2, stage_index=0, extra_timesteps=[500.0])
