"""Reference-side helpers: diffusers schedulers and pipelines with stub components.

The stubs make the real `HeliosPipeline` / `HeliosPyramidPipeline.__call__` run on tiny CPU
tensors, so our sampler loops can be compared with the reference sequence end to end.
"""

import contextlib
import types

import torch
from diffusers import HeliosDMDScheduler, HeliosScheduler


def ref_scheduler(cfg: dict):
    """diffusers scheduler for one of our `to_dict()` / diffusers-style config dicts."""
    cls = {"HeliosScheduler": HeliosScheduler, "HeliosDMDScheduler": HeliosDMDScheduler}[cfg["_class_name"]]
    return cls.from_config(cfg)


class StubTransformer(torch.nn.Module):
    """Cheap deterministic stand-in for the Helios DiT: depends on the latents, t and the prompt."""

    def __init__(self, channels: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(channels, channels, generator=g) / channels**0.5)
        self.config = types.SimpleNamespace(in_channels=channels, patch_size=(1, 2, 2))
        self._dtype = dtype
        self.calls = []  # (timestep, input shape) of every call, for checking the schedule

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return torch.device("cpu")

    @contextlib.contextmanager
    def cache_context(self, name):
        yield

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False, **unused):
        self.calls.append((timestep.clone(), tuple(hidden_states.shape)))
        h = hidden_states.float()
        b = h.shape[0]
        out = torch.tanh(torch.einsum("oc,bcthw->bothw", self.w, h))
        out = out + timestep.float().view(b, 1, 1, 1, 1) / 1000
        out = out + encoder_hidden_states.float().mean(dim=(1, 2)).view(b, 1, 1, 1, 1)
        return (out.to(self._dtype),)


class StubVAE(torch.nn.Module):
    """Identity 'VAE' with the Wan config fields the pipelines read."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.config = types.SimpleNamespace(
            latents_mean=[0.0] * channels, latents_std=[1.0] * channels, z_dim=channels,
            scale_factor_temporal=4, scale_factor_spatial=8,
        )

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def decode(self, z, return_dict=False):
        return (z,)


def base_pipeline(scheduler, transformer):
    from diffusers import HeliosPipeline

    pipe = HeliosPipeline(tokenizer=None, text_encoder=None, vae=StubVAE(transformer.config.in_channels),
                          scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pyramid_pipeline(scheduler, transformer, is_cfg_zero_star=False, is_distilled=False):
    from diffusers import HeliosPyramidPipeline

    pipe = HeliosPyramidPipeline(tokenizer=None, text_encoder=None, vae=StubVAE(transformer.config.in_channels),
                                 scheduler=scheduler, transformer=transformer,
                                 is_cfg_zero_star=is_cfg_zero_star, is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe
