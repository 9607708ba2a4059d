"""What a model folder holds, read from its configs and weight headers (no weights are loaded):
for `helios info` and `helios models`."""

from __future__ import annotations

from pathlib import Path

from helios.model_folder import PARTS, ModelFolderError, read_model_index
from helios.engine.pipeline import read_spec


def parameter_count(part: Path) -> int:
    """Parameters in a part's safetensors files, from their headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(part.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe_model(folder: str | Path) -> list[str]:
    """Lines describing a model folder; raises ModelFolderError when it is not one."""
    folder = Path(folder)
    index = read_model_index(folder)
    spec = read_spec(folder)
    counts = {p: parameter_count(folder / p) for p in PARTS if p in ("transformer", "vae", "text_encoder")}
    sampling = ", ".join(f"{k} {v}" for k, v in spec.default_sampling)
    lines = [
        f"model:           {folder}",
        f"pipeline:        {index['_class_name']}",
        f"presets:         {', '.join(spec.runnable_presets())} (default {spec.default_preset}"
        + (f", with {sampling}" if sampling else "") + ")",
        f"default size:    {spec.default_size[0]}x{spec.default_size[1]} (height x width; sizes in multiples of "
        f"{spec.pixels_per_token})",
        "parameters:      " + ", ".join(f"{p} {_millions(n)}" for p, n in counts.items()),
    ]
    if spec.vocabulary:
        lines.append(f"vocabulary:      {' '.join(spec.vocabulary)} (the words of its training captions; others "
                     "are not understood)")
    else:
        lines.append("vocabulary:      any (no closed vocabulary declared)")
    if spec.example_prompt:
        lines.append(f'example prompt:  "{spec.example_prompt}"')
    return lines


def find_models(roots: list[Path]) -> list[Path]:
    """Each root that is a model folder, and the model folders directly inside the others."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        candidates = [root] if (root / "model_index.json").is_file() else sorted(
            p for p in root.iterdir() if (p / "model_index.json").is_file()) if root.is_dir() else []
        found.extend(c for c in candidates if c not in found)
    return found


def summary_line(folder: Path) -> str:
    """One line: name, presets, default size, transformer parameters (or why the folder does not load)."""
    try:
        spec = read_spec(folder)
        params = _millions(parameter_count(folder / "transformer"))
    except ModelFolderError as e:
        return f"{folder}  (not usable: {e})"
    words = f", {len(spec.vocabulary)}-word vocabulary" if spec.vocabulary else ""
    return (f"{folder}  presets {'/'.join(spec.runnable_presets())}, {spec.default_size[0]}x{spec.default_size[1]}, "
            f"transformer {params}{words}")
