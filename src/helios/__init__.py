"""helios: real-time long video generation with autoregressive diffusion."""

from helios.model.loading import load_transformer
from helios.model_folder import bundled_model

__version__ = "0.1.0"


def load_pipeline(path=None, dtype=None, device="cpu", **options):
    """Load a model folder in the official layout (default: the bundled small model); the options are
    helios.engine.pipeline.load_pipeline's (optimize, fp8, memory_budget, preview_decoder, ...)."""
    import torch

    from helios.engine.pipeline import load_pipeline as _load

    return _load(bundled_model() if path is None else path, dtype=dtype or torch.float32, device=device, **options)


__all__ = ["load_transformer", "load_pipeline", "bundled_model", "__version__"]
