"""Loading diffusers scheduler configs, and clear errors for bad configs / misuse."""

import json

import pytest
import torch
from diffusers import HeliosDMDScheduler, HeliosScheduler

from helios.sampling import DMDScheduler, FlowScheduler, SchedulerConfig, config_from_dict, load_scheduler


def same_schedule(ours, ref, **kw):
    ref.set_timesteps(**kw)
    if isinstance(ours, DMDScheduler):
        kw["amplify"] = kw.pop("is_amplify_first_chunk", False)
    ours.set_timesteps(**kw)
    return torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


@pytest.mark.parametrize("layout", ["folder", "parent", "file"])
def test_load_saved_diffusers_folder(tmp_path, layout):
    ref = HeliosScheduler(stages=3, scheduler_type="euler", use_dynamic_shifting=True, gamma=0.25)
    folder = tmp_path / "scheduler" if layout != "folder" else tmp_path
    ref.save_config(folder)
    src = {"folder": tmp_path, "parent": tmp_path, "file": folder / "scheduler_config.json"}[layout]
    ours = load_scheduler(src)
    assert isinstance(ours, FlowScheduler) and ours.config.scheduler_type == "euler"
    assert ours.config.gamma == 0.25 and ours.config.use_dynamic_shifting
    assert same_schedule(ours, ref, num_inference_steps=9, stage_index=1, mu=1.2)


def test_load_saved_dmd_folder(tmp_path):
    ref = HeliosDMDScheduler(use_dynamic_shifting=True)
    ref.save_config(tmp_path)
    ours = load_scheduler(tmp_path)
    assert isinstance(ours, DMDScheduler) and ours.config.time_shift_type == "linear"
    assert same_schedule(ours, ref, num_inference_steps=2, stage_index=2, mu=1.9, is_amplify_first_chunk=True)


def test_tiny_base_config_loads():
    """The stages=1 config of hf-internal-testing/tiny-helios-modular-pipe (as published)."""
    d = {"_class_name": "HeliosScheduler", "_diffusers_version": "0.37.0.dev0", "disable_corrector": [],
         "gamma": 0.3333333333333333, "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
         "prediction_type": "flow_prediction", "scheduler_type": "unipc", "shift": 1.0, "solver_order": 2,
         "solver_p": None, "solver_type": "bh2", "stage_range": [0, 0.3333333333333333, 0.6666666666666666, 1],
         "stages": 1, "thresholding": False, "time_shift_type": "exponential", "use_dynamic_shifting": False,
         "use_flow_sigmas": True}
    ours = load_scheduler(d)
    assert same_schedule(ours, HeliosScheduler.from_config(d), num_inference_steps=50)


def test_roundtrip_through_diffusers():
    for cfg in (SchedulerConfig(solver_order=3, disable_corrector=(1,)),
                SchedulerConfig(scheduler_type="dmd", stages=1, shift=2.0)):
        d = cfg.to_dict()
        assert config_from_dict(json.loads(json.dumps(d))) == cfg
        cls = HeliosDMDScheduler if cfg.scheduler_type == "dmd" else HeliosScheduler
        assert same_schedule(load_scheduler(d), cls.from_config(d), num_inference_steps=5,
                             stage_index=0 if cfg.stages > 1 else None)


def test_mu_keys_are_kept():
    d = {"_class_name": "HeliosScheduler", "base_shift": 0.7, "max_shift": 2.0, "base_image_seq_len": 128,
         "max_image_seq_len": 8192}
    c = load_scheduler(d).config
    assert (c.base_shift, c.max_shift, c.base_image_seq_len, c.max_image_seq_len) == (0.7, 2.0, 128, 8192)


def test_unknown_class_name():
    with pytest.raises(ValueError, match=r"'FlowMatchEulerDiscreteScheduler'.*HeliosScheduler, HeliosDMDScheduler"):
        load_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(ValueError, match="None.*supported"):
        load_scheduler({"stages": 3})


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_scheduler(tmp_path)


def test_unknown_keys_warn():
    with pytest.warns(UserWarning, match="foo"):
        load_scheduler({"_class_name": "HeliosScheduler", "foo": 1})
    with pytest.warns(UserWarning, match="solver_order"):  # not a HeliosDMDScheduler key
        load_scheduler({"_class_name": "HeliosDMDScheduler", "solver_order": 2})


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"time_shift_type": "cosine"}, "time_shift_type"),
        ({"scheduler_type": "heun"}, "scheduler_type"),
        ({"solver_type": "bogus"}, "solver_type"),
        ({"solver_order": 0}, "solver_order"),
        ({"stages": 0}, "stages"),
        ({"stages": 4}, "stage_range"),
        ({"stage_range": [0, 0.6, 0.3, 1]}, "non-decreasing"),
        ({"stage_range": [0, 0.5, 1.0, 1.5]}, r"\[0, 1\]"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 0.5}, "1/3"),
        ({"thresholding": True}, "thresholding"),
        ({"solver_p": {"_class_name": "X"}}, "solver_p"),
        ({"use_dynamic_shifting": True, "shift": 3.0}, "shift"),
        ({"predict_x0": False}, "predict_x0"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"stage_range": 3}, "invalid scheduler config"),
    ],
)
def test_bad_configs_raise(bad, msg):
    with pytest.raises(ValueError, match=msg):
        load_scheduler({"_class_name": "HeliosScheduler", **bad})


def test_solver_type_aliases_map_to_bh2():
    assert load_scheduler({"_class_name": "HeliosScheduler", "solver_type": "midpoint"}).config.solver_type == "bh2"


def test_scheduler_class_guards():
    with pytest.raises(ValueError, match="DMDScheduler"):
        FlowScheduler(scheduler_type="dmd")
    with pytest.raises(ValueError, match="dmd"):
        DMDScheduler(SchedulerConfig())


@pytest.mark.parametrize("make", [FlowScheduler, DMDScheduler])
def test_misuse_raises(make):
    s = make(use_dynamic_shifting=True)
    x = torch.zeros(1, 4, 1, 2, 2)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(x, x, x) if make is DMDScheduler else s.step(x, x)
    with pytest.raises(ValueError, match="mu"):
        s.set_timesteps(3, 0)
    with pytest.raises(ValueError, match="stage_index"):
        s.set_timesteps(3, mu=1.0)
    with pytest.raises(ValueError, match="stage_index"):
        s.set_timesteps(3, 3, mu=1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0, 0, mu=1.0)
    with pytest.raises(ValueError, match="single-stage"):
        s.set_timesteps(3, 0, mu=1.0, sigmas=[0.9, 0.5])
    s.set_timesteps(1, 0, mu=1.0)
    (s.step(x, x, x) if make is DMDScheduler else s.step(x, x))
    with pytest.raises(RuntimeError, match="1-step schedule"):
        s.step(x, x, x) if make is DMDScheduler else s.step(x, x)
