"""The transformer's configuration: the fields of the official `config.json`, checked."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The class name the official releases (and diffusers) write into config.json.
CLASS_NAME = "HeliosTransformer3DModel"


class ConfigError(ValueError):
    """A config.json that does not describe a Helios transformer."""


@dataclass
class HeliosConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    added_kv_proj_dim: int | None = None
    rope_dim: tuple[int, int, int] = (44, 42, 42)
    rope_theta: float = 10000.0
    guidance_cross_attn: bool = True
    zero_history_timestep: bool = True
    has_multi_term_memory_patch: bool = True
    is_amplify_history: bool = False
    history_scale_mode: str = "per_head"
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        self.rope_dim = tuple(int(p) for p in self.rope_dim)  # type: ignore[assignment]
        self.out_channels = self.out_channels or self.in_channels
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise bad("patch_size", "expected three positive integers (t, h, w)")
        if len(self.rope_dim) != 3 or any(d % 2 for d in self.rope_dim):
            raise bad("rope_dim", "expected three even integers (t, h, w)")
        if sum(self.rope_dim) != self.attention_head_dim:
            raise bad("rope_dim", f"must sum to attention_head_dim={self.attention_head_dim}")
        if self.qk_norm != "rms_norm_across_heads":
            raise bad("qk_norm", "only 'rms_norm_across_heads' is used by Helios checkpoints")
        if self.added_kv_proj_dim is not None:
            raise bad("added_kv_proj_dim", "image K/V projections are not part of Helios; set it to null")
        if self.history_scale_mode not in ("per_head", "scalar"):
            raise bad("history_scale_mode", "expected 'per_head' or 'scalar'")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim",
                     "ffn_dim", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be a positive integer")

    # ---- (de)serialisation in the official config.json format ----
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "HeliosConfig":
        name = raw.get("_class_name")
        if name is not None and name != CLASS_NAME:
            raise ConfigError(f"config '_class_name' is {name!r}, not {CLASS_NAME!r}: this folder holds another model")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
        if unknown:
            raise ConfigError(f"config field(s) {unknown} are not fields of a Helios transformer; "
                              f"expected a subset of {sorted(known)}")
        if name is None and not any(k in raw for k in ("num_attention_heads", "num_layers")):
            raise ConfigError("config has neither '_class_name' nor any transformer field: not a Helios transformer config")
        values = {k: v for k, v in raw.items() if k in known}
        return cls(**values, extra={k: v for k, v in raw.items() if k.startswith("_")})

    @classmethod
    def from_file(cls, path: str | Path) -> "HeliosConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["patch_size"] = list(self.patch_size)
        d["rope_dim"] = list(self.rope_dim)
        return {"_class_name": CLASS_NAME, **d}


# Named configurations. "14b" is the released model; the small ones are for tests and small trained models.
PRESETS: dict[str, dict[str, Any]] = {
    "14b": {},
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "small": dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=384, num_layers=4, text_dim=64,
                  freq_dim=64, rope_dim=(12, 10, 10)),
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32,
                 freq_dim=32, rope_dim=(8, 4, 4)),
}


def named_config(name: str, **overrides: Any) -> HeliosConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown configuration {name!r}; choose one of {sorted(PRESETS)}")
    return HeliosConfig(**{**PRESETS[name], **overrides})
