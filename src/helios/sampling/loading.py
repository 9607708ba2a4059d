"""The one place a diffusers scheduler config becomes one of our schedulers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helios.sampling.dmd import DMDScheduler
from helios.sampling.schedulers import ChunkScheduler, FlowScheduler, config_from_dict

__all__ = ["load_scheduler", "read_scheduler_config"]


def load_scheduler(path_or_config: str | Path | dict[str, Any]) -> ChunkScheduler:
    """Return our scheduler for a diffusers scheduler folder, `scheduler_config.json` or config dict.

    HeliosScheduler -> FlowScheduler (euler / unipc); HeliosDMDScheduler, or HeliosScheduler
    with scheduler_type="dmd" (same timestep logic) -> DMDScheduler.
    """
    d = path_or_config if isinstance(path_or_config, dict) else read_scheduler_config(Path(path_or_config))
    config = config_from_dict(d)
    if config.scheduler_type == "dmd":
        return DMDScheduler(config)
    return FlowScheduler(config)


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """The JSON of `path` itself, `path/scheduler_config.json` or `path/scheduler/scheduler_config.json`."""
    candidates = [path] if path.is_file() else [path / "scheduler_config.json",
                                                path / "scheduler" / "scheduler_config.json"]
    for p in candidates:
        if p.is_file():
            with open(p) as f:
                return json.load(f)
    raise FileNotFoundError(f"no scheduler config found at {path} (looked for {[str(p) for p in candidates]})")
