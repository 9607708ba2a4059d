"""Load a transformer checkpoint folder in the official layout, straight onto the target device.

Layout: `config.json` + either one `*.safetensors` file or shards with a `*.safetensors.index.json`
(`{"weight_map": {key: shard}}`). The model is built on the meta device (no memory), given its final
dtypes (and, for FP8, its fused and quantised layout) there, allocated once, and each tensor is read
from its memory-mapped shard onto the device, cast (and quantised) and copied in: at most one tensor
beyond the model is alive at a time, so a 14B model loads in bf16, or straight into FP8, at disk speed
without a float32 or bf16 copy of the whole model on the host or the GPU (docs/memory.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from helios.model.config import HeliosConfig
from helios.model.transformer import FP32_PARAMETERS, HeliosTransformer, build_transformer

# Keys the official checkpoints may carry that no Helios module uses.
IGNORED_KEY_PARTS = ("norm_added_q",)

log = logging.getLogger("helios")


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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{key: (dtype, shape)} from a safetensors file's header alone (no tensor data is read)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size <= 0 or size > 100 * 2**20:
            raise CheckpointError(f"{file} is not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if v["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {k!r} in {file.name} has dtype {v['dtype']}, which Helios does not load")
        out[k] = (_SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"]))
    return out


@dataclass(frozen=True)
class _Target:
    """Where one checkpoint tensor goes in the (possibly fused and quantised) model."""

    module: str  # the receiving module's name
    leaf: str  # "weight" / "bias" / ...
    rows: slice | None = None  # its rows in a fused q/k/v projection
    quantize: bool = False  # a Linear weight stored as FP8 values + per-row scales


_FUSED = {"to_q": 0, "to_k": 1, "to_v": 2}


def _target_of(model: torch.nn.Module, key: str, shape: tuple[int, ...]) -> _Target:
    from helios.model.fp8 import Fp8Linear

    module_name, _, leaf = key.rpartition(".")
    parent, _, child = module_name.rpartition(".")
    rows = None
    if child in _FUSED and hasattr(model.get_submodule(parent), "to_qkv"):
        module_name = f"{parent}.to_qkv"
        n = shape[0]
        rows = slice(_FUSED[child] * n, (_FUSED[child] + 1) * n)
    quantize = isinstance(model.get_submodule(module_name), Fp8Linear) and leaf == "weight"
    return _Target(module_name, leaf, rows, quantize)


def load_transformer(path: str | Path, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None, fp8: bool = False,
                     blocks_on_host: bool = False) -> HeliosTransformer:
    """Load a Helios transformer from a checkpoint folder, one tensor at a time, shard by shard.

    dtype: parameter dtype (float32 is kept for the few precision-sensitive parameters);
    None keeps the dtype stored in the files. device: where the weights go (default CPU).
    fp8: every block's self-attention q/k/v fused and every block Linear stored in FP8 (helios.model.fp8)
    as it is read: each weight is cast to `dtype` and quantised on `device`, so neither the whole model in
    `dtype` nor a second copy of anything exists (the numbers are those of loading in `dtype`, then
    `fuse_projections_()` and `quantize_blocks_()`). blocks_on_host: the blocks go to host memory instead,
    each packed in one flat buffer (page-locked when `device` is CUDA) for helios.model.offload to stream,
    with their q/k/v fused; the rest goes to `device`.

    Shards are memory-mapped (safetensors' `safe_open`) and one is open at a time: host memory holds the
    pages of the tensor being read, not the checkpoint.
    """
    from helios.model.fp8 import quantize_blocks_, quantize_rows
    from helios.model.offload import PinnedArena, flat_layout, materialize_flat_

    folder = resolve_transformer_folder(path)
    config = HeliosConfig.from_file(folder / "config.json")
    device = torch.device(device or "cpu")
    plain = build_transformer(config, device="meta")
    expected = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}

    keys = shard_map(folder)
    unexpected = sorted(k for k in keys if k not in expected and not any(p in k for p in IGNORED_KEY_PARTS))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} key(s) in {folder} are not parameters of a Helios transformer "
                              f"with this config, e.g. {unexpected[:5]}")
    missing = sorted(k for k in expected if k not in keys)
    if missing:
        raise CheckpointError(f"{len(missing)} parameter(s) missing from {folder}, e.g. {missing[:5]}")
    headers: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for file in sorted(set(keys.values())):
        headers.update({k: v for k, v in read_header(file).items() if k in expected})
    for name, (_, shape) in headers.items():
        if shape != tuple(expected[name].shape):
            raise CheckpointError(f"parameter {name!r} has shape {shape} in {keys[name].name}, "
                                  f"but the config gives {tuple(expected[name].shape)}")

    # Choose every dtype while the model is still on the meta device, then give it memory once.
    model = plain
    for name, param in model.named_parameters():
        param.data = param.data.to(_target_dtype(name, dtype, headers[name][0]))
    if fp8 or blocks_on_host:  # (a streamed block is packed once: fused here, not by optimize() later)
        model.fuse_projections_()
    if fp8:  # (still on the meta device: the attention's backend is chosen for where it will run)
        quantize_blocks_(model, device=device)
    targets = {k: _target_of(model, k, headers[k][1]) for k in headers}
    if blocks_on_host:
        arena = PinnedArena(expected_bytes=sum(flat_layout(blk)[1] for blk in model.blocks),
                            pin=device.type == "cuda")
        for blk in model.blocks:
            materialize_flat_(blk, "cpu", arena)
        rest = [m for n, m in model.named_children() if n != "blocks"]
        for m in rest:
            m.to_empty(device=device)
    else:
        model.to_empty(device=device)
    model.requires_grad_(False)

    by_file: dict[Path, list[str]] = {}
    for k in headers:
        by_file.setdefault(keys[k], []).append(k)
    with torch.no_grad():
        for n, (file, names) in enumerate(sorted(by_file.items())):
            log.debug("loading %s (%d/%d)", file.name, n + 1, len(by_file))
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in names:
                    target = targets[name]
                    module = model.get_submodule(target.module)
                    tensor = f.get_tensor(name).to(_target_dtype(name, dtype, headers[name][0]))
                    rows = target.rows or slice(None)
                    if target.quantize:
                        values, scale = quantize_rows(tensor)
                        module.weight_fp8[rows].copy_(values)
                        module.weight_scale[:, rows].copy_(scale.t())
                    elif target.rows is not None:
                        getattr(module, target.leaf)[rows].copy_(tensor)
                    else:
                        getattr(module, target.leaf).copy_(tensor)
                    del tensor
    model.eval()
    return model


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
