"""Timestep / sigma schedules and stage tables match diffusers' HeliosScheduler / HeliosDMDScheduler."""

import numpy as np
import pytest
import torch
from diffusers import HeliosDMDScheduler, HeliosScheduler
from diffusers.pipelines.helios.pipeline_helios_pyramid import calculate_shift

from helios.sampling import DMDScheduler, FlowScheduler, SchedulerConfig, base_sigmas, compute_mu, load_scheduler

from ._reference import ref_scheduler


def assert_same(ours: torch.Tensor, ref: torch.Tensor, atol: float = 0.0):
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    torch.testing.assert_close(ours, ref.cpu(), rtol=0, atol=atol)


def random_mu(gen) -> float:
    return 0.3 + 2.5 * torch.rand((), generator=gen, dtype=torch.float64).item()


@pytest.mark.parametrize("cls", ["HeliosScheduler", "HeliosDMDScheduler"])
@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("stage_range", [None, [0, 0.25, 0.5, 1.0], [0, 0.5, 1.0]])
def test_stage_tables_match(cls, shift_type, stage_range):
    d = {"_class_name": cls, "time_shift_type": shift_type, "gamma": 0.25 if stage_range else 1 / 3}
    if stage_range:
        d.update(stage_range=stage_range, stages=len(stage_range) - 1)
    ours, ref = load_scheduler(d), ref_scheduler(d)
    t = ours.tables
    for k in range(ref.config.stages):
        assert t.ori_start_sigmas[k] == ref.ori_start_sigmas[k]
        assert t.start_sigmas[k] == ref.start_sigmas[k]
        assert t.end_sigmas[k] == ref.end_sigmas[k]
        assert t.timestep_ratios[k] == ref.timestep_ratios[k]
        assert_same(t.stage_timesteps[k], ref.timesteps_per_stage[k])


@pytest.mark.parametrize("solver,amplify", [("unipc", False), ("euler", False), ("dmd", False), ("dmd", True)])
@pytest.mark.parametrize("dynamic", [None, "exponential", "linear"])
def test_pyramid_schedules_match(gen, solver, dynamic, amplify):
    d = {"_class_name": "HeliosDMDScheduler" if solver == "dmd" else "HeliosScheduler", "stages": 3}
    if solver != "dmd":
        d["scheduler_type"] = solver
    if dynamic:
        d.update(use_dynamic_shifting=True, time_shift_type=dynamic)
    ours, ref = load_scheduler(d), ref_scheduler(d)
    for k in range(3):
        n = int(torch.randint(1, 25, (), generator=gen))
        mu = random_mu(gen)
        ref.set_timesteps(n, k, mu=mu, is_amplify_first_chunk=amplify)
        if solver == "dmd":
            ours.set_timesteps(n, k, mu=mu, amplify=amplify)
            assert ours.num_steps == (2 * n if amplify else n)
        else:
            ours.set_timesteps(n, k, mu=mu)
            assert ours.num_steps == n
        assert_same(ours.timesteps, ref.timesteps)
        assert_same(ours.sigmas, ref.sigmas)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("cls", ["HeliosScheduler", "HeliosDMDScheduler"])
def test_single_stage_default_sigmas_match(gen, shift, shift_type, cls):
    d = {"_class_name": cls, "stages": 1, "shift": shift, "time_shift_type": shift_type}
    ours, ref = load_scheduler(d), ref_scheduler(d)
    n = int(torch.randint(1, 60, (), generator=gen))
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert_same(ours.timesteps, ref.timesteps)
    assert_same(ours.sigmas, ref.sigmas)


@pytest.mark.parametrize("dynamic", [None, "exponential", "linear"])
@pytest.mark.parametrize("n", [1, 7, 50])
def test_base_pipeline_sigmas_match(gen, dynamic, n):
    """The base pipeline passes sigmas=linspace(0.999, 0, n+1)[:-1] and mu."""
    d = {"_class_name": "HeliosScheduler", "stages": 1}
    if dynamic:
        d.update(use_dynamic_shifting=True, time_shift_type=dynamic)
    ours, ref = load_scheduler(d), ref_scheduler(d)
    mu = random_mu(gen)
    ref.set_timesteps(n, sigmas=np.linspace(0.999, 0.0, n + 1)[:-1], mu=mu)
    ours.set_timesteps(n, sigmas=base_sigmas(n), mu=mu)
    assert_same(ours.timesteps, ref.timesteps)
    assert_same(ours.sigmas, ref.sigmas)


def test_helios_scheduler_with_dmd_type_loads_as_dmd(gen):
    d = {"_class_name": "HeliosScheduler", "scheduler_type": "dmd", "use_dynamic_shifting": True,
         "time_shift_type": "linear"}
    ours, ref = load_scheduler(d), HeliosScheduler.from_config(d)
    assert isinstance(ours, DMDScheduler)
    for amplify in (False, True):
        for k in range(3):
            mu = random_mu(gen)
            ref.set_timesteps(2, k, mu=mu, is_amplify_first_chunk=amplify)
            ours.set_timesteps(2, k, mu=mu, amplify=amplify)
            assert_same(ours.timesteps, ref.timesteps)
            assert_same(ours.sigmas, ref.sigmas)


def test_dmd_default_is_linear_shift():
    assert load_scheduler({"_class_name": "HeliosDMDScheduler"}).config.time_shift_type == "linear"
    assert DMDScheduler().config.time_shift_type == HeliosDMDScheduler().config.time_shift_type
    assert FlowScheduler().config.time_shift_type == HeliosScheduler().config.time_shift_type


def test_timesteps_go_to_device():
    s = FlowScheduler(stages=3)
    t = s.set_timesteps(5, 0, device="cpu")
    assert t.device.type == "cpu" and s.sigmas.device.type == "cpu"


@pytest.mark.parametrize("seq", [1, 256, 540, 2160, 8640, 4096])
def test_compute_mu_matches_calculate_shift(gen, seq):
    assert compute_mu(seq) == calculate_shift(seq)
    cfg = SchedulerConfig(base_image_seq_len=128, max_image_seq_len=8192, base_shift=0.3, max_shift=2.0)
    assert compute_mu(seq, cfg) == calculate_shift(seq, 128, 8192, 0.3, 2.0)
