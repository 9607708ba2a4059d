"""Config loading: recipe defaults, overrides, and clear errors naming the key; data errors; the CLI;
starting stage 1 from a Wan2.1 transformer."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helios.train.config import ConfigError, load_config, parse_set
from helios.train.data import DataError
from helios.train.trainer import train


def test_recipe_defaults_and_overrides(tmp_path, tiny_model):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"recipe": "stage2", "phase": "post", "output_dir": str(tmp_path / "o"),
                                    "model": {"init_from": str(tiny_model)}, "data": {"source": "synthetic"},
                                    "synthetic": {"height": 384, "width": 640}}))
    cfg = load_config(path, ["optim.lr=2e-5", "lora.rank=8", "batch.grad_accum=2.0"])
    assert cfg["stage"] == 2 and cfg["phase"] == "post" and cfg["seed"] == 46  # the recipe's post phase
    assert cfg["optim"]["lr"] == 2e-5 and cfg["lora"]["rank"] == 8 and cfg["batch"]["grad_accum"] == 2
    assert cfg["optim"]["warmup_steps"] == 500 and cfg["pyramid"]["sample_ratios"] == [1, 1, 1]
    assert cfg["model"]["components_from"] == str(tiny_model)  # defaults to init_from
    assert cfg["checkpointing"]["keep_last"] == 3  # one of our run keys
    assert parse_set(["a.b=[1, 2]", "c=no"]) == {"a": {"b": [1, 2]}, "c": False}


@pytest.mark.parametrize("sets, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["optim.lr=fast"], "config key 'optim.lr' = 'fast' has the wrong type"),
    (["optim.lr=-1.0"], "config key 'optim.lr' = -1.0: must be > 0"),
    (["optim=3"], "config key 'optim' must be a mapping"),
    (["finetune=half"], "config key 'finetune' = 'half': must be lora or full"),
    (["stage=3"], "config key 'recipe' = 'tiny': stage 3 needs a recipe with a 'distill' section"),
    (["stage=2", "pyramid.enabled=false"], "config key 'pyramid.enabled' = False"),
    (["batch.per_gpu=0"], "config key 'batch.per_gpu' = 0: must be >= 1"),
    (["optim.lr_schedule=linear"], "config key 'optim.lr_schedule' = 'linear'"),
    (["data.history_sizes=[16, 2]"], "config key 'data.history_sizes'"),
    (["recipe=stage9"], "config key 'recipe': no recipe 'stage9'"),
    (["phase=final"], "config key 'phase': recipe has no phase 'final'"),
    (["model.restrict_self_attn=true"], "config key 'model.restrict_self_attn'"),
    (["output_dir=null"], "config key 'output_dir' = None: required"),
    (["optim.lr"], "--set 'optim.lr': expected KEY=VALUE"),
])
def test_bad_config_names_the_key(make_config, sets, message):
    base = {k: v for k, v in make_config().items() if k in ("recipe", "output_dir", "model", "data")}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config({**base, "model": {"init_from": base["model"]["init_from"]}}, sets)


def test_missing_folders(tmp_path, tiny_model, latent_cache):
    base = {"recipe": "tiny", "output_dir": str(tmp_path / "o"), "data": {"source": "cache",
                                                                         "cache_dir": str(latent_cache)}}
    with pytest.raises(ConfigError, match=r"'model.init_from' = '.*/nowhere': folder not found"):
        load_config({**base, "model": {"init_from": str(tmp_path / "nowhere")}})
    with pytest.raises(ConfigError, match="looks like a Hugging Face repo id"):
        load_config({**base, "recipe": "stage1"})  # the recipe's init_from is Wan-AI/Wan2.1-T2V-14B-Diffusers
    # A relative path of several parts (configs/tiny's runs/tiny/init before train.sh made it) is not a repo id.
    with pytest.raises(ConfigError, match=r"folder not found \(relative paths are read from the current folder"):
        load_config({**base, "model": {"init_from": "runs/tiny/nowhere"}})
    with pytest.raises(ConfigError, match=r"'data.cache_dir' = '.*/nocache': folder not found"):
        load_config({**base, "model": {"init_from": str(tiny_model)},
                     "data": {"source": "cache", "cache_dir": str(tmp_path / "nocache")}})
    with pytest.raises(ConfigError, match="'data.cache_dir' = None: required with data.source: cache"):
        load_config({**base, "model": {"init_from": str(tiny_model)}, "data": {"source": "cache"}})


def test_bad_data_is_reported(make_config, tmp_path, latent_cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no cache entries"):
        train(make_config(**{"data.cache_dir": str(empty)}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match=r"cache entry .*a.safetensors is unreadable"):
        train(make_config(**{"data.cache_dir": str(broken)}))
    with pytest.raises(DataError, match=r"data.preload: cache entry .*a.safetensors is unreadable"):
        train(make_config(**{"data.cache_dir": str(broken), "data.preload": True, "data.min_video_frames": 0}))
    with pytest.raises(DataError, match="fewer than one global batch"):
        train(make_config(**{"batch.per_gpu": 4}))  # 3 videos in the cache
    with pytest.raises(DataError, match="shorter than data.min_video_frames=200"):
        train(make_config(**{"data.min_video_frames": 200}))
    with pytest.raises(DataError, match="latents are 8x8, data.height x data.width = 128x128"):
        train(make_config(**{"data.height": 128, "data.width": 128}))


def test_latent_size_check_uses_the_folders_vae_scale(make_config, tmp_path, tiny_model):
    import json
    import shutil

    folder = tmp_path / "scale16"
    shutil.copytree(tiny_model, folder)
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    vae_cfg["scale_factor_spatial"] = 16  # the cache was made by the 8x VAE: 64x64 -> 8x8
    (folder / "vae" / "config.json").write_text(json.dumps(vae_cfg))
    with pytest.raises(DataError, match="latents are 8x8, data.height x data.width = 64x64 gives 4x4"):
        train(make_config(**{"model.init_from": str(folder)}))


def test_transformer_folder_errors_name_the_key(tmp_path):
    from helios.train.modeling import transformer_folder
    from helios.train.stage3 import real_score_folder

    cfg = {"model": {"init_from": str(tmp_path), "init_subfolder": "transformer",
                     "real_score_from": str(tmp_path), "real_score_subfolder": None}}
    with pytest.raises(ConfigError, match=r"'model.init_from' = .*: no transformer config.json in it "
                                          r"\(nor in its 'transformer' subfolder\)"):
        transformer_folder(cfg)
    with pytest.raises(ConfigError, match=r"'model.real_score_from' = .*: no transformer config.json"):
        real_score_folder(cfg)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    assert transformer_folder(cfg) == tmp_path / "transformer"


def test_cli_train_and_errors(make_config, tmp_path, tiny_model, latent_cache):
    from helios.cli import app

    runner = CliRunner()
    cfg = {"recipe": "tiny", "output_dir": str(tmp_path / "cli"), "device": "cpu", "max_steps": 2,
           "model": {"init_from": str(tiny_model)},
           "data": {"source": "cache", "cache_dir": str(latent_cache), "text_max_length": 16},
           "validation": {"enabled": False}, "export": {"enabled": False}, "logging": {"progress": False}}
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["train", str(path), "--set", "checkpointing.every_steps=1"])
    assert r.exit_code == 0, r.output
    assert "trained to step 2" in r.output
    assert [json.loads(x)["step"] for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    r = runner.invoke(app, ["train", str(path), "--resume", "--set", "max_steps=3"])
    assert r.exit_code == 0 and "resumed from" in r.output and "trained to step 3" in r.output, r.output
    r = runner.invoke(app, ["train", str(path), "--set", "optim.bogus=1"])
    assert r.exit_code == 2 and "unknown config key 'optim.bogus'" in r.output
    r = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_stage1_init_from_wan(tmp_path, make_config):
    """The official stage-1 init: Wan2.1 blocks + memory patchifiers built from patch_embedding."""
    from diffusers import WanTransformer3DModel

    from helios.train.modeling import load_init_transformer

    torch.manual_seed(0)
    wan = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                                text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    wan.save_pretrained(tmp_path / "wan" / "transformer")
    cfg = make_config(**{"model.init_from": str(tmp_path / "wan")})
    model = load_init_transformer(cfg, dtype=None)
    ref = wan.state_dict()
    ours = model.state_dict()
    assert torch.equal(ours["norm_out.scale_shift_table"], ref["scale_shift_table"])
    assert torch.equal(ours["blocks.1.ffn.net.2.weight"], ref["blocks.1.ffn.net.2.weight"])
    w = ref["patch_embedding.weight"]
    assert ours["patch_long.weight"].shape == (24, 16, 4, 8, 8)
    torch.testing.assert_close(ours["patch_long.weight"][:, :, 3, 7, 7], w[:, :, 0, 1, 1] / 64)
    torch.testing.assert_close(ours["patch_mid.weight"].sum((2, 3, 4)), w.sum((2, 3, 4)))
    assert model.config.rope_dim == (4, 4, 4) and model.config.has_multi_term_memory_patch
    # the Wan weights give the same output on a chunk without history
    x, t, text = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text).sample, wan(x, t, text).sample, rtol=1e-4, atol=1e-5)
