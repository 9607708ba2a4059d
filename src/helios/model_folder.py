"""The model folder (the official diffusers layout) and the chunk geometry: one reader, checker and writer.

    model_index.json   {"_class_name": "HeliosPyramidPipeline", "is_distilled": ..., "is_cfg_zero_star": ...}
    transformer/       ours (helios.model)
    vae/               diffusers AutoencoderKLWan
    text_encoder/      transformers UMT5EncoderModel (any T5-style encoder loads)
    tokenizer/         transformers tokenizer
    scheduler/         scheduler_config.json

Our own extensions of model_index.json: `helios_default_size` (the frame size a small model was trained
at) and `helios_default_sampling` (steps / guidance it was found to need).

Chunk geometry: Helios writes 33 frames a chunk, 9 latent frames through the VAE's 4x temporal compression
(the first frame on its own, then 4 frames per latent frame).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

LATENT_CHUNK_FRAMES = 9  # latent frames the transformer denoises per chunk
TEMPORAL_COMPRESSION = 4  # Wan VAE: frames per latent frame (after the first)
SPATIAL_COMPRESSION = 8  # Wan VAE: pixels per latent pixel, each side
CHUNK_FRAMES = (LATENT_CHUNK_FRAMES - 1) * TEMPORAL_COMPRESSION + 1  # 33 frames per chunk

PIPELINE_CLASSES = ("HeliosPipeline", "HeliosPyramidPipeline")
COMPONENT_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")  # all but the transformer
PARTS = ("transformer", *COMPONENT_PARTS)
SAMPLING_DEFAULTS = ("steps", "guidance_scale")

__all__ = ["CHUNK_FRAMES", "COMPONENT_PARTS", "LATENT_CHUNK_FRAMES", "ModelFolderError", "PARTS",
           "PIPELINE_CLASSES", "SPATIAL_COMPRESSION", "TEMPORAL_COMPRESSION", "bundled_model", "check_default_sampling",
           "frames_for_latents", "read_model_index", "read_part_json", "read_scheduler_config",
           "vae_scale_factors", "write_model_folder"]


class ModelFolderError(ValueError):
    """A model folder that is missing parts or holds another model."""


def frames_for_latents(latent_frames: int, temporal: int = TEMPORAL_COMPRESSION) -> int:
    """RGB frames that encode to `latent_frames` (first frame alone, then `temporal` per latent frame)."""
    return (latent_frames - 1) * temporal + 1


def read_model_index(folder: str | Path, parts: Sequence[str] = PARTS) -> dict[str, Any]:
    """model_index.json of a Helios folder that has every one of `parts`; a clear error otherwise."""
    folder = Path(folder)
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
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise ModelFolderError(f"{folder} is missing part(s) {missing}: a Helios model folder needs "
                               f"{', '.join(p + '/' for p in parts)}")
    return index


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


def read_part_json(folder: str | Path, part: str, name: str = "config.json") -> dict[str, Any]:
    """`folder/part/name` as a dict, with an error that names the part."""
    path = Path(folder) / part / name
    if not path.is_file():
        raise ModelFolderError(f"the {part}/ part has no {path.name} ({path})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from e


def read_scheduler_config(folder: str | Path) -> dict[str, Any]:
    return read_part_json(folder, "scheduler", "scheduler_config.json")


def vae_scale_factors(folder: str | Path) -> tuple[int, int]:
    """(temporal, spatial) compression of the folder's VAE, from vae/config.json (Wan defaults: 4, 8)."""
    cfg = read_part_json(folder, "vae")
    return (int(cfg.get("scale_factor_temporal") or TEMPORAL_COMPRESSION),
            int(cfg.get("scale_factor_spatial") or SPATIAL_COMPRESSION))


def write_model_folder(out: str | Path, index: Mapping[str, Any], parts: Mapping[str, Path | Callable[[Path], None]],
                       scheduler_config: Mapping[str, Any] | None = None,
                       check: Callable[[Path], None] | None = None) -> Path:
    """Write a model folder atomically: built beside `out`, checked, then renamed into place.

    parts: for each of PARTS, a folder to copy or a function that writes the part into the path it is
    given. scheduler_config, when given, replaces scheduler/scheduler_config.json after the parts are written.
    check(folder), when given, may refuse the written folder (by raising) before it takes `out`'s place.
    """
    out = Path(out)
    missing = [p for p in PARTS if p not in parts]
    if missing:
        raise ValueError(f"a model folder needs every part; missing {missing}")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in PARTS:
        source = parts[name]
        if callable(source):
            source(tmp / name)
        else:
            shutil.copytree(Path(source), tmp / name)
    if scheduler_config is not None:
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(scheduler_config), indent=2) + "\n")
    (tmp / "model_index.json").write_text(json.dumps(dict(index), indent=2) + "\n")
    read_model_index(tmp)
    if check is not None:
        check(tmp)
    _replace_folder(tmp, out)
    return out


def _replace_folder(new: Path, out: Path) -> None:
    """Move `new` to `out`, keeping the previous `out` aside until the rename is done."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    new.rename(out)
    if old.exists():
        shutil.rmtree(old)


def bundled_model() -> Path:
    """The folder of the small model shipped inside the package (64x64, runs on a CPU; its
    model_index.json lists the words it knows and an example prompt)."""
    return Path(__file__).parent / "assets" / "helios-tiny"
