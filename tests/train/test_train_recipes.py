"""Recipe YAMLs parse, phases merge, build our config objects, and every official value is sourced."""

from __future__ import annotations

import re

import pytest
import yaml

from helios.train.corrupt import HistoryCorruptionConfig, TaskDropoutConfig
from helios.train.history import HistoryLayout
from helios.train.recipes import (
    RECIPE_DIR,
    available_recipes,
    corruption_config,
    history_layout,
    load_recipe,
    model_input_corruption_config,
    task_dropout_config,
    timestep_config,
)


def test_all_recipes_parse_and_build():
    assert {"stage1", "stage2", "stage3", "tiny"} <= set(available_recipes())
    for name in available_recipes():
        base = load_recipe(name)
        assert base["phases"], name
        for phase in base["phases"]:
            r = load_recipe(name, phase)
            assert r["phase"] == phase and "phases" not in r
            assert isinstance(corruption_config(r), HistoryCorruptionConfig)
            assert isinstance(task_dropout_config(r), TaskDropoutConfig)
            assert history_layout(r) == HistoryLayout() or name == "tiny"
            timestep_config(r)
            model_input_corruption_config(r)
            assert r["max_steps"] > 0 and r["optim"]["lr"] > 0
    with pytest.raises(KeyError):
        load_recipe("stage1", "nope")


def test_official_values():
    s1i, s1p = load_recipe("stage1", "init"), load_recipe("stage1", "post")
    assert (s1i["optim"]["lr"], s1p["optim"]["lr"]) == (5e-5, 3e-5)
    assert s1i["lora"]["rank"] == 128 and s1i["batch"]["per_gpu"] * s1i["batch"]["num_gpus"] == s1i["batch"]["global"]
    assert s1i["timesteps"]["weighting_scheme"] == "logit_normal" and not s1i["timesteps"]["use_dynamic_shifting"]
    assert s1i["task_dropout"] == {"enabled": True, "t2v_ratio": 0.4, "v2v_ratio": 0.4, "i2v_ratio": 0.1, "per_sample": False}
    s2i, s2p = load_recipe("stage2", "init"), load_recipe("stage2", "post")
    assert (s2i["optim"]["lr"], s2p["optim"]["lr"]) == (1e-4, 3e-5) and s2i["lora"]["rank"] == 256
    assert s2i["pyramid"]["sample_ratios"] == [1, 2, 1] and s2p["pyramid"]["sample_ratios"] == [1, 1, 1]
    assert s2i["timesteps"]["weighting_scheme"] == "none" and s2p["lora"]["memory_patches"] is True
    s3 = load_recipe("stage3", "dmd")
    d = s3["distill"]
    assert (s3["optim"]["lr"], d["critic_lr"], s3["optim"]["betas"][0]) == (2e-6, 4e-7, 0.0)
    assert d["critic_updates_per_generator_update"] == 5 and d["real_guidance_scale"] == 3.0
    assert d["gan"]["head_blocks"] == [5, 15, 25, 35] and d["gan"]["enabled"]
    assert (d["gan"]["g_weight"], d["gan"]["d_weight"], d["gan"]["r1"]["weight"]) == (5e-2, 1e-2, 100.0)
    assert s3["ema"] == {"enabled": True, "decay": 0.99, "start_step": 750}
    assert corruption_config(s3).saturation_enabled and timestep_config(s3).use_dynamic_shifting
    ode = load_recipe("stage3", "ode")
    assert ode["distill"]["ode"]["enabled"] and not ode["distill"]["train_dmd"] and ode["ema"]["start_step"] == 250


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3"])
def test_every_official_key_has_a_source_comment(name):
    """Leaf keys carry a comment on the same line, or on the comment line right after."""
    lines = (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()
    yaml.safe_load("\n".join(lines))
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*([A-Za-z_0-9]+):\s*(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        value = m.group(2).split("#")[0].strip()
        if not value:  # section header
            continue
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if "#" not in line and not nxt.startswith("#"):
            missing.append(line)
    assert not missing, missing
