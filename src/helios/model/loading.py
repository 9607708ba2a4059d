"""Load a transformer checkpoint folder in the official layout, straight onto the target device.

Layout: `config.json` + either one `*.safetensors` file or shards with a `*.safetensors.index.json`
(`{"weight_map": {key: shard}}`). The model is built on the meta device (no memory), and each tensor
is read from its shard directly onto the device, cast, and assigned: at most one tensor beyond the
model is alive at a time, so a 14B model loads in bf16 at disk speed without a float32 copy on the host.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from helios.model.config import HeliosConfig
from helios.model.transformer import FP32_PARAMETERS, HeliosTransformer, build_transformer

# Keys the official checkpoints may carry that no Helios module uses.
IGNORED_KEY_PARTS = ("norm_added_q",)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as a Helios transformer."""


def resolve_transformer_folder(path: str | Path) -> Path:
    """Accept the transformer folder itself or a whole model folder holding `transformer/`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "config.json").is_file():
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    raise CheckpointError(f"{path} has no config.json (nor transformer/config.json): "
                          "point at the folder that holds the transformer's config.json and *.safetensors")


def shard_map(folder: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file that holds it."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} has several index files {[p.name for p in indexes]}: keep one")
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{indexes[0]} has no 'weight_map'")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"shard file(s) {missing} named in {indexes[0].name} are missing from {folder}")
        return {k: folder / f for k, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors weights")
    if len(files) > 1:
        raise CheckpointError(f"{folder} holds several .safetensors files {[p.name for p in files]} but no "
                              "*.safetensors.index.json saying which key is where")
    with safe_open(str(files[0]), framework="pt") as f:
        return {k: files[0] for k in f.keys()}


def _target_dtype(name: str, dtype: torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    if dtype is None:
        return stored
    return torch.float32 if any(k in name for k in FP32_PARAMETERS) else dtype


def load_transformer(path: str | Path, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> HeliosTransformer:
    """Load a Helios transformer from a checkpoint folder.

    dtype: parameter dtype (float32 is kept for the few precision-sensitive parameters);
    None keeps the dtype stored in the files. device: where the weights go (default CPU).
    """
    folder = resolve_transformer_folder(path)
    config = HeliosConfig.from_file(folder / "config.json")
    device = torch.device(device or "cpu")
    model = build_transformer(config, device="meta")
    expected = dict(model.named_parameters())

    keys = shard_map(folder)
    unexpected = sorted(k for k in keys if k not in expected and not any(p in k for p in IGNORED_KEY_PARTS))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} key(s) in {folder} are not parameters of a Helios transformer "
                              f"with this config, e.g. {unexpected[:5]}")
    missing = sorted(k for k in expected if k not in keys)
    if missing:
        raise CheckpointError(f"{len(missing)} parameter(s) missing from {folder}, e.g. {missing[:5]}")

    by_file: dict[Path, list[str]] = {}
    for k, f in keys.items():
        if k in expected:
            by_file.setdefault(f, []).append(k)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in names:
                tensor = f.get_tensor(name)
                param = expected[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(f"parameter {name!r} has shape {tuple(tensor.shape)} in {file.name}, "
                                          f"but the config gives {tuple(param.shape)}")
                _assign(model, name, tensor.to(_target_dtype(name, dtype, tensor.dtype)))
    model.eval()
    return model


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


def save_transformer(model: HeliosTransformer, folder: str | Path, max_shard_bytes: int = 5 * 2**30,
                     dtype: torch.dtype | None = None) -> None:
    """Write config.json + sharded safetensors with an index, in the official layout, atomically per file.

    dtype: cast floating-point tensors on the way out (e.g. bf16 to halve the files).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    stem = "diffusion_pytorch_model"
    names = [f"{stem}.safetensors"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = folder / f".{name}.tmp"
        save_file(shard, str(tmp))
        tmp.replace(folder / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        write_text_atomic(folder / f"{stem}.safetensors.index.json", json.dumps(index, indent=2))
    write_text_atomic(folder / "config.json", json.dumps(model.config.to_dict(), indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
