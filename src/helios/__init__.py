"""helios: real-time long video generation with autoregressive diffusion."""

from helios.model.loading import load_transformer

__all__ = ["load_transformer"]
__version__ = "0.1.0"
