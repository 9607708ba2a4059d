"""Load the parts of a model folder in the official layout.

    model_index.json   {"_class_name": "HeliosPyramidPipeline", "is_distilled": ..., "is_cfg_zero_star": ...}
    transformer/       ours (helios.model)
    vae/               diffusers AutoencoderKLWan
    text_encoder/      transformers UMT5EncoderModel (any T5-style encoder loads)
    tokenizer/         transformers tokenizer
    scheduler/         scheduler_config.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from helios.model.loading import load_transformer
from helios.model.transformer import HeliosTransformer

PIPELINE_CLASSES = ("HeliosPipeline", "HeliosPyramidPipeline")
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelFolderError(ValueError):
    """A model folder that is missing parts or holds another model."""


@dataclass
class Components:
    transformer: HeliosTransformer
    vae: Any  # diffusers.AutoencoderKLWan
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    pipeline_class: str = "HeliosPyramidPipeline"
    flags: dict[str, Any] = field(default_factory=dict)  # is_distilled, is_cfg_zero_star
    folder: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.transformer.device


def read_model_index(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise ModelFolderError(f"model folder {folder} does not exist")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelFolderError(f"{folder} has no model_index.json: point --model at a Helios model folder "
                               f"(model_index.json with {', '.join(p + '/' for p in PARTS)})")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{index_path} is not valid JSON: {e}") from e
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ModelFolderError(f"{folder} holds a {name!r} model, not a Helios pipeline "
                               f"(model_index.json _class_name must be one of {PIPELINE_CLASSES})")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise ModelFolderError(f"{folder} is missing part(s) {missing}: a Helios model folder needs "
                               f"{', '.join(p + '/' for p in PARTS)}")
    return index


def load_components(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    vae_dtype: torch.dtype | None = None, text_dtype: torch.dtype | None = None) -> Components:
    """Load every part of a model folder. dtype is the transformer's; the VAE and text encoder default to it."""
    folder = Path(path)
    index = read_model_index(folder)
    device = torch.device(device)
    transformer = load_transformer(folder / "transformer", dtype=dtype, device=device)
    vae, text_encoder, tokenizer, scheduler_config = load_parts(folder, device, vae_dtype or dtype,
                                                                 text_dtype or dtype)
    return Components(transformer, vae, text_encoder, tokenizer, scheduler_config, index["_class_name"],
                      model_flags(index, folder), folder)


def model_flags(index: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What model_index.json says about how to run the model (no weights needed)."""
    flags = {k: index.get(k, False) for k in ("is_distilled", "is_cfg_zero_star")}
    # Our own extension of model_index.json: the frame size a small model was trained at.
    flags["default_size"] = tuple(index.get("helios_default_size", (384, 640)))
    # And the sampling it was found to need, where the official preset does not suit it (steps, guidance).
    flags["default_sampling"] = check_default_sampling(index.get("helios_default_sampling", {}), folder)
    # A small model trained on a closed set of captions: the words it saw and a prompt it knows.
    flags["vocabulary"] = _string_list(index.get("helios_vocabulary", []), folder, "helios_vocabulary")
    example = index.get("helios_example_prompt", "")
    if not isinstance(example, str):
        raise ModelFolderError(f"{folder / 'model_index.json'}: helios_example_prompt must be text, got {example!r}")
    flags["example_prompt"] = example
    return flags


def _string_list(value: object, folder: Path, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ModelFolderError(f"{folder / 'model_index.json'}: {key} must be a list of words, got {value!r}")
    return tuple(v.lower() for v in value)


SAMPLING_DEFAULTS = ("steps", "guidance_scale")


def check_default_sampling(value: object, folder: Path) -> dict[str, float]:
    """model_index.json's `helios_default_sampling`: {"steps": int, "guidance_scale": number}, either optional."""
    where = f"{folder / 'model_index.json'}: helios_default_sampling"
    if not isinstance(value, dict) or set(value) - set(SAMPLING_DEFAULTS):
        raise ModelFolderError(f"{where} must be an object with keys among {list(SAMPLING_DEFAULTS)}, got {value!r}")
    steps, guidance = value.get("steps", 1), value.get("guidance_scale", 0.0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ModelFolderError(f"{where}: steps must be a positive whole number, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
        raise ModelFolderError(f"{where}: guidance_scale must be a number >= 0, got {guidance!r}")
    return dict(value)


def load_parts(folder: Path, device: torch.device | str, vae_dtype: torch.dtype, text_dtype: torch.dtype):
    """The parts around the transformer: (VAE, text encoder, tokenizer, scheduler config), frozen, on `device`."""
    import transformers
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    vae = _load_part("vae", lambda p: AutoencoderKLWan.from_pretrained(p, torch_dtype=vae_dtype), folder)
    vae.to(device).eval().requires_grad_(False)
    enc_cfg = _read_json(folder / "text_encoder" / "config.json", "text_encoder")
    arch = (enc_cfg.get("architectures") or ["UMT5EncoderModel"])[0]
    if not hasattr(transformers, arch) or "Encoder" not in arch:
        raise ModelFolderError(f"{folder / 'text_encoder'} holds a {arch!r}; expected a T5/umT5 encoder "
                               "(architectures: UMT5EncoderModel)")
    enc_cls = getattr(transformers, arch)
    text_encoder = _load_part("text_encoder", lambda p: enc_cls.from_pretrained(p, torch_dtype=text_dtype), folder)
    text_encoder.to(device).eval().requires_grad_(False)
    tokenizer = _load_part("tokenizer", lambda p: transformers.AutoTokenizer.from_pretrained(p), folder)
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler")
    return vae, text_encoder, tokenizer, scheduler_config


def vae_scale_factors(folder: str | Path) -> tuple[int, int]:
    """(temporal, spatial) compression of the folder's VAE, from vae/config.json (Wan defaults: 4, 8)."""
    cfg = _read_json(Path(folder) / "vae" / "config.json", "vae")
    return int(cfg.get("scale_factor_temporal") or 4), int(cfg.get("scale_factor_spatial") or 8)


def _read_json(path: Path, part: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"the {part}/ part has no {path.name} ({path})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from e


def _load_part(name: str, load, folder: Path):
    try:
        return load(str(folder / name))
    except ModelFolderError:
        raise
    except Exception as e:  # the libraries raise many kinds; say which part failed
        raise ModelFolderError(f"could not load the {name}/ part of {folder}: {type(e).__name__}: {e}") from e
