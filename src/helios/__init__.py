"""helios: real-time long video generation with autoregressive diffusion."""

from pathlib import Path

from helios.model.loading import load_transformer

__version__ = "0.1.0"


def bundled_model() -> Path:
    """The folder of the small model shipped inside the package (64x64, runs on a CPU; its
    model_index.json lists the words it knows and an example prompt)."""
    return Path(__file__).parent / "assets" / "helios-tiny"


def load_pipeline(path=None, dtype=None, device="cpu", vae_dtype=None, optimize=None, fp8=False):
    """Load a model folder in the official layout (default: the bundled small model); see
    helios.engine.pipeline.load_pipeline."""
    import torch

    from helios.engine.pipeline import load_pipeline as _load

    return _load(bundled_model() if path is None else path, dtype=dtype or torch.float32, device=device,
                 vae_dtype=vae_dtype, optimize=optimize, fp8=fp8)


__all__ = ["load_transformer", "load_pipeline", "bundled_model", "__version__"]
