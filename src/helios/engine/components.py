"""Load the parts of a model folder (the layout: helios.model_folder, which reads and checks it)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from helios.model.loading import load_transformer
from helios.model.transformer import HeliosTransformer
from helios.model_folder import (ModelFolderError, check_default_sampling, read_model_index, read_part_json,
                                 read_scheduler_config)

__all__ = ["Components", "ModelFolderError", "load_components", "load_parts", "stream_text_encoder_"]


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


def load_components(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    vae_dtype: torch.dtype | None = None, text_dtype: torch.dtype | None = None,
                    fp8: bool = False, blocks_on_host: bool = False,
                    text_device: str | torch.device | None = None,
                    stream_text_to: str | torch.device | None = None) -> Components:
    """Load every part of a model folder. dtype is the transformer's; the VAE and text encoder default to it.

    fp8 / blocks_on_host: see `load_transformer` (straight into FP8; blocks in host memory for streaming).
    text_device: where the text encoder is loaded (default `device`; a memory plan keeps it on the host).
    stream_text_to: the text encoder's layers go to page-locked host memory and move to this device only
    while a prompt is encoded (`stream_text_encoder_`). The parts are read before the transformer, so this
    happens before the transformer's weights arrive: the encoder's loaded copy is gone by then, and host
    memory never holds it beside both the pinned encoder and the transformer's pinned blocks.
    """
    folder = Path(path)
    index = read_model_index(folder)
    device = torch.device(device)
    vae, text_encoder, tokenizer, scheduler_config = load_parts(folder, device, vae_dtype or dtype,
                                                                 text_dtype or dtype, text_device)
    if stream_text_to is not None and text_encoder is not None:
        stream_text_encoder_(text_encoder, torch.device(stream_text_to))
        gc.collect()  # the loaded copy's tensors (and the files they map) go now, before the transformer
    transformer = load_transformer(folder / "transformer", dtype=dtype, device=device, fp8=fp8,
                                   blocks_on_host=blocks_on_host)
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


def load_parts(folder: Path, device: torch.device | str, vae_dtype: torch.dtype, text_dtype: torch.dtype,
               text_device: torch.device | str | None = None):
    """The parts around the transformer: (VAE, text encoder, tokenizer, scheduler config), frozen, on `device`
    (the text encoder on `text_device` if given)."""
    import transformers
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    vae = _load_part("vae", lambda p: AutoencoderKLWan.from_pretrained(p, torch_dtype=vae_dtype), folder)
    vae.to(device).eval().requires_grad_(False)
    enc_cfg = read_part_json(folder, "text_encoder")
    arch = (enc_cfg.get("architectures") or ["UMT5EncoderModel"])[0]
    if not hasattr(transformers, arch) or "Encoder" not in arch:
        raise ModelFolderError(f"{folder / 'text_encoder'} holds a {arch!r}; expected a T5/umT5 encoder "
                               "(architectures: UMT5EncoderModel)")
    enc_cls = getattr(transformers, arch)
    text_encoder = _load_part("text_encoder", lambda p: enc_cls.from_pretrained(p, torch_dtype=text_dtype), folder)
    text_encoder.to(text_device or device).eval().requires_grad_(False)
    tokenizer = _load_part("tokenizer", lambda p: transformers.AutoTokenizer.from_pretrained(p), folder)
    scheduler_config = read_scheduler_config(folder)
    return vae, text_encoder, tokenizer, scheduler_config


def _load_part(name: str, load, folder: Path):
    try:
        return load(str(folder / name))
    except ModelFolderError:
        raise
    except Exception as e:  # the libraries raise many kinds; say which part failed
        raise ModelFolderError(f"could not load the {name}/ part of {folder}: {type(e).__name__}: {e}") from e


def stream_text_encoder_(text_encoder, device: torch.device) -> None:
    """Keep a T5/umT5 encoder's blocks and final norm in page-locked host memory, each moved to `device` only
    for its own forward (helios.model.offload.stream_layers_): the GPU holds one block while a prompt is
    encoded. Its embedding table stays on the host. Done once; a second call does nothing."""
    from helios.model.offload import stream_layers_

    if getattr(text_encoder, "_helios_streamed", False):
        return
    encoder = getattr(text_encoder, "encoder", None)
    layers = list(getattr(encoder, "block", []))
    if not layers:
        raise ModelFolderError(f"the text encoder {type(text_encoder).__name__} has no encoder.block layers to "
                               "stream; use a larger --memory budget")
    stream_layers_(layers + [encoder.final_layer_norm], device)
    text_encoder._helios_streamed = True

