"""Shared helpers for comparing our transformer with the diffusers reference."""

from __future__ import annotations

import zlib

import torch

TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=48, text_dim=24, freq_dim=16,
            rope_dim=(8, 4, 4))


def generator_for(name: str) -> torch.Generator:
    """A generator seeded from the test's name: fresh inputs per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def randomized_reference(gen: torch.Generator, **config):
    """A reference HeliosTransformer3DModel with every parameter random (zero-initialised ones included)."""
    from diffusers import HeliosTransformer3DModel

    model = HeliosTransformer3DModel(**{**TINY, **config}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def random_inputs(gen: torch.Generator, batch: int = 1, frames: int = 9, height: int = 8, width: int = 8,
                  terms: tuple[str, ...] = ("short", "mid", "long"), text_dim: int = 24, in_channels: int = 16):
    """Reference-style keyword arguments: a noisy chunk and the history terms named in `terms`."""
    def r(*shape):
        return torch.randn(*shape, generator=gen)

    kw = dict(
        hidden_states=r(batch, in_channels, frames, height, width),
        timestep=torch.rand(batch, generator=gen) * 1000,
        encoder_hidden_states=r(batch, 7, text_dim),
        indices_hidden_states=torch.arange(20, 20 + frames)[None].expand(batch, -1),
    )
    sizes = {"short": 2, "mid": 2, "long": 16}
    first = {"short": None, "mid": 17, "long": 1}
    for term in terms:
        n = sizes[term]
        kw[f"latents_history_{term}"] = r(batch, in_channels, n, height, width)
        idx = torch.tensor([0, 19]) if term == "short" else torch.arange(first[term], first[term] + n)
        kw[f"indices_latents_history_{term}"] = idx[None].expand(batch, -1)
    return kw


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_transformer(seed: int, varied_norms: bool = False, **config):
    """The "tiny" transformer (text width 24) in eval mode; varied_norms: norm weights and history gains
    drawn around 1 instead of all ones, so that each of them is exercised."""
    from helios.model.config import named_config
    from helios.model.transformer import build_transformer

    torch.manual_seed(seed)
    model = build_transformer(named_config("tiny", text_dim=24, **config)).eval()
    if varied_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or "history_key_scale" in name:
                    p.copy_(torch.randn(p.shape) * 0.5 + 1.0)
    return model
