"""helios: real-time long video generation with autoregressive diffusion."""

from helios.model.loading import load_transformer

__version__ = "0.1.0"


def load_pipeline(path, dtype=None, device="cpu", vae_dtype=None, optimize=None, fp8=False):
    """Load a model folder in the official layout; see helios.engine.pipeline.load_pipeline."""
    import torch

    from helios.engine.pipeline import load_pipeline as _load

    return _load(path, dtype=dtype or torch.float32, device=device, vae_dtype=vae_dtype, optimize=optimize, fp8=fp8)


__all__ = ["load_transformer", "load_pipeline"]
