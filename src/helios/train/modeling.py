"""The model being trained: init weights, LoRA / trainable parameters, FSDP2 sharding, export.

* :func:`load_init_transformer` reads a Helios transformer (our loader) or a Wan2.1 transformer
  (the official stage-1 init: Wan weights + memory patchifiers made from ``patch_embedding``);
* :func:`build_trainable` adds LoRA with peft (official targets: every ``nn.Linear`` whose name has
  no ``norm``, optionally the Conv3d ``patch_embedding`` / memory patches) or unfreezes everything,
  unfreezes the fully trained extras (stage 1: ``patch_short/mid/long``) and keeps them in float32;
* :func:`shard_model` applies FSDP2 per transformer block + root;
* :func:`plain_transformer` rebuilds an unsharded model with LoRA merged from the trainable state
  (for export and for validation under FSDP), :func:`export_model_folder` writes the official layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from helios.model.config import HeliosConfig
from helios.model.loading import load_transformer, save_transformer, shard_map
from helios.model.transformer import HeliosTransformer, build_transformer, cast_keeping_fp32
from helios.model_folder import COMPONENT_PARTS, ModelFolderError, read_model_index, write_model_folder

from .config import ConfigError

__all__ = [
    "MEMORY_PATCHES",
    "transformer_folder",
    "load_init_transformer",
    "lora_targets",
    "build_trainable",
    "trainable_named_parameters",
    "shard_model",
    "merge_lora_",
    "plain_transformer",
    "export_model_folder",
]

MEMORY_PATCHES = ("patch_short", "patch_mid", "patch_long")
# recipe key -> HeliosConfig field; a Helios checkpoint must agree, a Wan init takes them
_ARCH_FLAGS = {"memory_patches": "has_multi_term_memory_patch", "zero_history_timestep": "zero_history_timestep",
               "guidance_cross_attn": "guidance_cross_attn", "amplify_history": "is_amplify_history",
               "history_scale_mode": "history_scale_mode"}


def transformer_folder(cfg: dict[str, Any], key: str = "init") -> Path:
    """``model.<key>_from/model.<key>_subfolder`` when it exists, else ``model.<key>_from`` itself
    (key "init": the model trained; "real_score": stage 3's frozen real score)."""
    root = Path(cfg["model"][f"{key}_from"])
    sub = cfg["model"].get(f"{key}_subfolder")
    if sub and (root / sub / "config.json").is_file():
        return root / sub
    if (root / "config.json").is_file():
        return root
    raise ConfigError(f"config key 'model.{key}_from' = {str(root)!r}: no transformer config.json in it "
                      f"(nor in its {sub!r} subfolder)")


def load_init_transformer(cfg: dict[str, Any], dtype: torch.dtype | None,
                          device: torch.device | str = "cpu") -> HeliosTransformer:
    """The weights training starts from; ``dtype=None`` keeps the stored dtype."""
    folder = transformer_folder(cfg)
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("_class_name") == "WanTransformer3DModel":
        return _transformer_from_wan(folder, raw, cfg["model"], dtype, device)
    model = load_transformer(folder, dtype=dtype, device=device)
    for key, field in _ARCH_FLAGS.items():
        want, have = cfg["model"].get(key), getattr(model.config, field)
        if want is not None and want != have:
            raise ConfigError(f"config key 'model.{key}' = {want!r} but the checkpoint in {folder} has "
                              f"{field} = {have!r}; set model.{key}: {have!r} (or start from a matching checkpoint)")
    return model


@torch.no_grad()
def _transformer_from_wan(folder: Path, raw: dict[str, Any], mcfg: dict[str, Any], dtype: torch.dtype | None,
                          device: torch.device | str) -> HeliosTransformer:
    """Wan2.1-T2V (diffusers layout) -> Helios: same blocks; the memory patchifiers start from
    ``patch_embedding`` as the official ``initialize_weight_from_another_conv3d`` does (the 1x2x2
    kernel replicated over 2x4x4 / 4x8x8 and divided by the replication count)."""
    head = int(raw.get("attention_head_dim", 128))
    hw = 2 * (head // 6)  # Wan's rope split: (head - 2 hw, hw, hw) = (44, 42, 42) for 128
    fields = {k: raw[k] for k in ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels",
                                  "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm",
                                  "qk_norm", "eps") if k in raw}
    if raw.get("image_dim") or raw.get("added_kv_proj_dim"):
        raise ConfigError(f"config key 'model.init_from': {folder} is a Wan image-to-video transformer; "
                          "Helios starts from Wan2.1-T2V")
    config = HeliosConfig(**fields, rope_dim=(head - 2 * hw, hw, hw), has_multi_term_memory_patch=True,
                          zero_history_timestep=bool(mcfg.get("zero_history_timestep", True)),
                          guidance_cross_attn=bool(mcfg.get("guidance_cross_attn", True)),
                          is_amplify_history=bool(mcfg.get("amplify_history", False)),
                          history_scale_mode=str(mcfg.get("history_scale_mode", "per_head")))
    model = build_transformer(config, device=device, dtype=dtype)  # random init for anything Wan lacks
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for key, file in shard_map(folder).items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in keys:
                name = "norm_out.scale_shift_table" if key == "scale_shift_table" else key
                if name not in params:
                    raise ConfigError(f"config key 'model.init_from': {folder} has weight {key!r}, which a "
                                      "Helios transformer does not have")
                t = f.get_tensor(key)
                if name == "patch_embedding.weight":
                    t = t[:, : config.in_channels]
                _set_param(model, name, t.to(params[name].dtype))
    w, b = model.patch_embedding.weight.float(), model.patch_embedding.bias
    for name, k in (("patch_short", 1), ("patch_mid", 2), ("patch_long", 4)):
        rep = w.repeat_interleave(k, 2).repeat_interleave(k, 3).repeat_interleave(k, 4) / k**3
        _set_param(model, f"{name}.weight", rep.to(b.dtype))
        _set_param(model, f"{name}.bias", b.clone())
    return model.eval()


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent, _, attr = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    if tuple(getattr(module, attr).shape) != tuple(tensor.shape):
        raise ConfigError(f"config key 'model.init_from': weight {name!r} has shape {tuple(tensor.shape)}, "
                          f"the config gives {tuple(getattr(module, attr).shape)}")
    setattr(module, attr, nn.Parameter(tensor.contiguous(), requires_grad=False))


def lora_targets(model: nn.Module, lcfg: dict[str, Any]) -> list[str]:
    """Official ``lora_layers: all-linear``: every nn.Linear (full module names) whose name has no
    ``norm``, plus ``patch_embedding`` / the memory patches when asked."""
    if lcfg["targets"] == "all-linear":
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    else:
        targets = list(lcfg["targets"])
    if lcfg.get("patch_embedding"):
        targets.append("patch_embedding")
    if lcfg.get("memory_patches"):
        targets.extend(MEMORY_PATCHES)
    exclude = set(lcfg.get("exclude") or [])
    out = []
    for t in dict.fromkeys(targets):
        if "norm" in t or t.rsplit(".", 1)[-1] in exclude:
            continue
        out.append(t)
    if not out:
        raise ConfigError("config key 'lora.targets': no module of the transformer matches")
    return out


def build_trainable(model: HeliosTransformer, cfg: dict[str, Any]) -> list[str]:
    """Freeze the model, add LoRA (``finetune: lora``) or unfreeze all (``full``), unfreeze the
    ``train_full`` extras; trainable parameters are made float32. Returns their names.

    LoRA weights are drawn from the global torch RNG: seed it identically on every rank first."""
    model.requires_grad_(False)
    if cfg["finetune"] == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lcfg = cfg["lora"]
        init = "gaussian" if lcfg["init"] == "gaussian" else True
        inject_adapter_in_model(LoraConfig(r=int(lcfg["rank"]), lora_alpha=float(lcfg["alpha"]),
                                           lora_dropout=float(lcfg["dropout"]), init_lora_weights=init,
                                           target_modules=lora_targets(model, lcfg)), model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        model.requires_grad_(True)
    full = cfg["train_full"]
    extras = [*(MEMORY_PATCHES if full.get("memory_patches") else ()),
              *(("patch_embedding",) if full.get("patch_embedding") else ()),
              *(("norm",) if full.get("norm_layers") else ()),
              *(("history_key_scale",) if cfg["model"].get("amplify_history") else ())]
    for n, p in model.named_parameters():
        if any(e in n for e in extras) and "lora_" not in n:
            p.requires_grad_(True)
    names = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # official cast_training_params: trainable weights in float32
            names.append(n)
    if not names:
        raise ConfigError("nothing to train: check finetune, lora.* and train_full.*")
    return names


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def shard_model(model: HeliosTransformer, mesh, mp_policy=None) -> None:
    """FSDP2: one unit per transformer block + the root.

    Every block's text K/V are computed up front (``prepare_text``) outside the block's forward, so
    each block's cross-attention is a unit of its own whose ``key_value`` / ``cross_attention``
    methods gather its weights."""
    import dataclasses

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kw = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    # Only the root casts its inputs. A block's inputs include the float32 RoPE tables; FSDP2 casts
    # them in the forward but not when activation checkpointing recomputes the block in the backward
    # (it skips its pre-forward cast then), and the recompute's dtypes must match (found on 2 H100s).
    inner = kw if mp_policy is None else {**kw, "mp_policy": dataclasses.replace(mp_policy, cast_forward_inputs=False)}
    for blk in model.blocks:
        fully_shard(blk.attn2, **inner)
        register_fsdp_forward_method(blk.attn2, "key_value")
        register_fsdp_forward_method(blk.attn2, "cross_attention")
        fully_shard(blk, **inner)
    fully_shard(model, **kw)


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the base layer back (module names and the
    state dict become the plain transformer's again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


@torch.no_grad()
def plain_transformer(cfg: dict[str, Any], trainable_state: dict[str, torch.Tensor], dtype: torch.dtype | None,
                      device: torch.device | str = "cpu") -> HeliosTransformer:
    """The init weights + the trained ones (LoRA merged), as an ordinary unsharded transformer."""
    with torch.random.fork_rng(devices=[]):  # peft's LoRA init must not move the training RNG
        model = load_init_transformer(cfg, dtype=dtype, device=device)
        dtype = dtype or model.proj_out.weight.dtype  # None: the dtype the init checkpoint is stored in
        build_trainable(model, cfg)
    params = dict(model.named_parameters())
    missing = [k for k in trainable_state if k not in params]
    if missing:
        raise RuntimeError(f"trained weights {missing[:5]} do not match the model built from the config")
    for k, v in trainable_state.items():
        params[k].data.copy_(v.to(params[k].device, params[k].dtype))
    if cfg["finetune"] == "lora":
        merge_lora_(model)
    model.requires_grad_(False)
    cast_keeping_fp32(model, dtype)
    return model.eval()


def export_model_folder(transformer: HeliosTransformer, components_from: str | Path, out_dir: str | Path,
                        default_size: tuple[int, int] | None = None, scheduler_config: dict[str, Any] | None = None,
                        index_updates: dict[str, Any] | None = None) -> Path:
    """Write a model folder in the official layout (:func:`helios.model_folder.write_model_folder`):
    ``transformer/`` from ``transformer``, ``vae/ text_encoder/ tokenizer/ scheduler/`` and
    ``model_index.json`` copied from ``components_from``. ``scheduler_config`` replaces the copied
    scheduler config and ``index_updates`` is merged into model_index.json (stage 3 writes the few-step
    HeliosDMDScheduler and ``is_distilled: true``)."""
    src = Path(components_from)
    index = check_components_folder(src)
    # Sampling defaults were found for the model they came with, not for the one trained from it.
    index.pop("helios_default_sampling", None)
    index.update(index_updates or {})
    if default_size is not None:
        index["helios_default_size"] = [int(default_size[0]), int(default_size[1])]  # our extension
    parts: dict[str, Any] = {p: src / p for p in COMPONENT_PARTS}
    parts["transformer"] = lambda path: save_transformer(transformer, path)
    return write_model_folder(out_dir, index, parts, scheduler_config)


def check_components_folder(folder: str | Path, key: str = "model.components_from") -> dict[str, Any]:
    """The model_index.json of the folder the VAE, text encoder, tokenizer and scheduler come from."""
    try:
        return read_model_index(folder, COMPONENT_PARTS)
    except ModelFolderError as e:
        raise ConfigError(f"config key '{key}' = {str(folder)!r}: not a Helios model folder ({e}); "
                          "the VAE, text encoder, tokenizer and scheduler come from it") from e
