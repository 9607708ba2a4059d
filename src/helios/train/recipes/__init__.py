"""Training recipes (YAML) under our key names, with phase overrides.

``stage1.yaml`` / ``stage2.yaml`` / ``stage3.yaml`` carry the official 14B hyper-parameters
(every key is commented with the official config key it comes from); ``tiny.yaml`` is a CPU
smoke-test recipe with the same keys.

A recipe has shared top-level sections and a ``phases`` mapping; ``load_recipe(name, phase)``
deep-merges ``phases[phase]`` over the shared sections (``phase=None`` returns the file as is,
``phase="first"`` picks the first phase).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from ..corrupt import HistoryCorruptionConfig, ModelInputCorruptionConfig, TaskDropoutConfig
from ..history import HistoryLayout
from ..timesteps import TimestepConfig

__all__ = [
    "RECIPE_DIR",
    "available_recipes",
    "recipe_path",
    "load_recipe",
    "deep_merge",
    "history_layout",
    "corruption_config",
    "model_input_corruption_config",
    "task_dropout_config",
    "timestep_config",
]

RECIPE_DIR = Path(__file__).resolve().parent


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    q = RECIPE_DIR / f"{name_or_path}.yaml"
    if q.exists():
        return q
    raise FileNotFoundError(f"no recipe {name_or_path!r} (known: {available_recipes()})")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe(name_or_path: str | os.PathLike, phase: str | None = None) -> dict[str, Any]:
    with open(recipe_path(name_or_path), encoding="utf-8") as f:
        recipe = yaml.safe_load(f)
    if phase is None:
        return recipe
    phases = recipe.get("phases") or {}
    if phase == "first":
        if not phases:
            return {k: v for k, v in recipe.items() if k != "phases"}
        phase = next(iter(phases))
    if phase not in phases:
        raise KeyError(f"recipe has no phase {phase!r} (phases: {list(phases)})")
    merged = deep_merge({k: v for k, v in recipe.items() if k != "phases"}, phases[phase])
    merged["phase"] = phase
    return merged


def history_layout(recipe: dict[str, Any]) -> HistoryLayout:
    """The engine's layout from ``data.history_sizes`` (any order; sorted long, mid, short),
    ``data.latent_window`` and ``data.keep_anchor``."""
    d = recipe["data"]
    sizes = tuple(sorted((int(x) for x in d["history_sizes"]), reverse=True))
    return HistoryLayout(sizes, chunk_frames=int(d["latent_window"]), keep_first_frame=bool(d.get("keep_anchor", True)))


def corruption_config(recipe: dict[str, Any]) -> HistoryCorruptionConfig:
    return HistoryCorruptionConfig.from_dict(recipe.get("corruption"))


def model_input_corruption_config(recipe: dict[str, Any]) -> ModelInputCorruptionConfig:
    return ModelInputCorruptionConfig.from_dict(recipe.get("model_input_corruption"))


def task_dropout_config(recipe: dict[str, Any]) -> TaskDropoutConfig:
    return TaskDropoutConfig.from_dict(recipe.get("task_dropout"))


def timestep_config(recipe: dict[str, Any]) -> TimestepConfig:
    return TimestepConfig.from_dict(recipe.get("timesteps"))
