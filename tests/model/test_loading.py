"""Loading checkpoint folders in the official layout, and the errors for folders that are not one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import helios
from helios.model.config import ConfigError, HeliosConfig, named_config
from helios.model.loading import CheckpointError, save_transformer
from helios.model.transformer import build_transformer
from helpers_reference import generator_for, random_inputs, randomized_reference, relative_error


@pytest.fixture
def ref_folder(tmp_path, request):
    gen = generator_for(request.node.name)
    ref = randomized_reference(gen)
    ref.save_pretrained(tmp_path / "transformer")
    return ref, tmp_path / "transformer", gen


def test_sharded_reference_checkpoint_loads(tmp_path, request):
    gen = generator_for(request.node.name)
    ref = randomized_reference(gen)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and list(tmp_path.glob("*.index.json"))
    ours = helios.load_transformer(tmp_path)
    kw = random_inputs(gen)
    with torch.no_grad():
        assert relative_error(ours(**kw).sample, ref(**kw).sample) < 1e-5


def test_model_folder_with_transformer_subfolder_loads(ref_folder):
    ref, folder, gen = ref_folder
    ours = helios.load_transformer(folder.parent)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_bf16_load_keeps_precision_sensitive_parameters_in_float32(ref_folder):
    _, folder, _ = ref_folder
    model = helios.load_transformer(folder, dtype=torch.bfloat16)
    dtypes = {k: p.dtype for k, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["blocks.0.norm2.weight"] == torch.float32
    assert not any(p.is_meta for p in model.parameters())


def test_bf16_model_runs_and_stays_close_to_float32(ref_folder):
    ref, folder, gen = ref_folder
    model = helios.load_transformer(folder, dtype=torch.bfloat16)
    kw = random_inputs(gen)
    with torch.no_grad():
        err = relative_error(model(**kw).sample.float(), ref(**kw).sample)
    assert err < 5e-2


def test_own_save_roundtrip_with_shards(tmp_path, request):
    torch.manual_seed(0)
    model = build_transformer(named_config("tiny"))
    save_transformer(model, tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = helios.load_transformer(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_missing_key_is_named(ref_folder):
    _, folder, _ = ref_folder
    path = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    del sd["blocks.1.attn1.to_k.weight"]
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"missing.*blocks\.1\.attn1\.to_k\.weight"):
        helios.load_transformer(folder)


def test_unexpected_key_is_named(ref_folder):
    _, folder, _ = ref_folder
    path = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["blocks.0.attn1.mystery.weight"] = torch.zeros(3)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"not parameters.*mystery"):
        helios.load_transformer(folder)


def test_shape_mismatch_is_named(ref_folder):
    _, folder, _ = ref_folder
    path = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["proj_out.bias"] = torch.zeros(5)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"'proj_out\.bias' has shape \(5,\)"):
        helios.load_transformer(folder)


def test_config_of_another_model_is_refused(ref_folder):
    _, folder, _ = ref_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKLWan"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="AutoencoderKLWan.*another model"):
        helios.load_transformer(folder)


def test_unknown_config_field_is_named(ref_folder):
    _, folder, _ = ref_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["window_size"] = [-1, -1]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="window_size"):
        helios.load_transformer(folder)


def test_bad_config_value_is_named():
    with pytest.raises(ConfigError, match="rope_dim"):
        HeliosConfig(rope_dim=(44, 42, 40))
    with pytest.raises(ConfigError, match="qk_norm"):
        HeliosConfig(qk_norm="layer_norm")


def test_folder_errors(tmp_path, ref_folder):
    with pytest.raises(CheckpointError, match="does not exist"):
        helios.load_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        helios.load_transformer(tmp_path / "empty")
    _, folder, _ = ref_folder
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*\\.safetensors"):
        helios.load_transformer(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        helios.load_transformer(folder)


def test_missing_shard_is_named(tmp_path, request):
    ref = randomized_reference(generator_for(request.node.name))
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        helios.load_transformer(tmp_path)
