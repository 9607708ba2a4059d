"""Turning a user's image or video into history latents (I2V, V2V), and latents back into frames.

The random draws (VAE posterior samples, then the noise that softens the conditioning latents)
happen in the reference pipelines' order, so a seed reproduces a reference video.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseRange:
    low: float = 0.111
    high: float = 0.135

    def draw(self, count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        return torch.rand(count, generator=generator, device=_gen_device(generator, device)).to(device) \
            * (self.high - self.low) + self.low


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 normal noise drawn on the generator's device (as the reference does), moved to `device`."""
    return torch.randn(shape, generator=generator, device=_gen_device(generator, device)).to(device)


class LatentCodec:
    """The Wan VAE with the latent normalisation of the released models: z' = (z - mean) / std."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.temporal = cfg.scale_factor_temporal
        self.spatial = cfg.scale_factor_spatial
        self.channels = cfg.z_dim
        self._mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        if callable(getattr(vae, "clear_cache", None)):
            vae.clear_cache()  # creates the causal-convolution caches the batched decode drives
        self.frames_per_decode = 4
        self._device_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stats()  # made now, on the default stream, rather than first inside an engine loop

    def channels_last_(self) -> "LatentCodec":
        """Keep the VAE's 3-D convolution weights channels-last, so its activations follow: cuDNN's fastest
        Hopper kernels are NHWC, and with NCHW tensors it converts layouts around every convolution.
        One 14B chunk's decode on the H200: 0.426 -> 0.401 s (benchmarks/probe_vae_decode.py); the frames
        change at bf16 rounding level (another convolution algorithm), so it is for the fast path only."""
        for p in self.vae.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) on the VAE's device and dtype, kept: a copy from the host would make every
        decode wait for the work queued before it (the engine decodes while it queues the next chunk)."""
        cached = self._device_stats
        if cached is None or cached[0].device != self.device or cached[0].dtype != self.dtype:
            cached = self._device_stats = (self._mean.to(self.device, self.dtype),
                                           self._inv_std.to(self.device, self.dtype))
        return cached

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, 1 + (T-1)/4, H/8, W/8), a posterior sample."""
        mean, inv_std = self._stats()
        z = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.sample(generator=generator)
        return (z - mean) * inv_std

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the VAE's own, in its dtype."""
        mean, inv_std = self._stats()
        return latents.to(self.dtype) / inv_std + mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> frames (B, 3, T, H, W) in [-1, 1]."""
        z = self._vae_latents(latents)
        if self.batched_decode_supported():
            return torch.cat(list(self._decode_pieces(z)), dim=2).clamp(-1.0, 1.0)
        return self.vae.decode(z, return_dict=False)[0]

    @torch.no_grad()
    def decode_parts(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """The same frames in two parts: frame 0, then the others. The causal decoder makes frame 0 first
        and from latent frame 0 alone, so it can be handed over before the rest is decoded."""
        z = self._vae_latents(latents)
        if not self.batched_decode_supported():
            frames = self.vae.decode(z, return_dict=False)[0]
            yield frames[:, :, :1]
            yield frames[:, :, 1:]
            return
        pieces = self._decode_pieces(z)
        first = next(pieces).clamp(-1.0, 1.0)
        yield first
        rest = list(pieces)
        yield torch.cat(rest, dim=2).clamp(-1.0, 1.0) if rest else first[:, :, :0]

    def batched_decode_supported(self) -> bool:
        vae = self.vae
        return (hasattr(vae, "_feat_map") and hasattr(vae, "clear_cache") and hasattr(vae, "post_quant_conv")
                and getattr(vae.config, "patch_size", None) is None and not getattr(vae, "use_tiling", False)
                and not getattr(vae.config, "is_residual", False))

    def _decode_pieces(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """The VAE's own decoder, driven with every latent frame after the first in one call.

        diffusers' decode walks the latent frames one at a time through causal convolutions that
        cache their last two input frames; feeding frames 1..T-1 together gives each convolution the
        same causal context (the cache holds frame 0's), so the result is the same while each
        convolution runs over 8 frames at once instead of 8 times over one.
        """
        vae = self.vae
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(z)
            vae._conv_idx = [0]
            yield vae.decoder(x[:, :, :1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=True)
            # Groups of latent frames: 4 at a time keeps most of the speed-up at half the activation memory.
            for start in range(1, x.shape[2], self.frames_per_decode):
                vae._conv_idx = [0]
                yield vae.decoder(x[:, :, start:start + self.frames_per_decode], feat_cache=vae._feat_map,
                                  feat_idx=vae._conv_idx)
        finally:
            vae.clear_cache()

    @torch.no_grad()
    def decode_reference(self, latents: torch.Tensor) -> torch.Tensor:
        """diffusers' frame-by-frame decode (for tests and benchmarks of the batched one)."""
        return self.vae.decode(self._vae_latents(latents), return_dict=False)[0]


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8, rounding like the reference's postprocessing."""
    x = (video.float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def soften(latents: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """sigma * noise + (1 - sigma) * latents: conditioning that the model may still correct."""
    return sigma * randn(latents.shape, generator, latents.device) + (1 - sigma) * latents


@dataclass
class Condition:
    """History to start from: the anchor (first frame) and the latents that fill the history buffer."""

    anchor: torch.Tensor | None = None  # (B, C, 1, h, w)
    history: torch.Tensor | None = None  # (B, C, T, h, w), newest last
    frames_seen: int = 0


def image_condition(codec: LatentCodec, image: torch.Tensor, chunk_frames: int, generator: torch.Generator | None,
                    image_noise: NoiseRange | None = NoiseRange(), video_noise: NoiseRange = NoiseRange()) -> Condition:
    """I2V: image (B, 3, H, W) in [-1, 1] becomes the anchor, and a still clip of it the newest history frame."""
    device = codec.device
    image = image[:, :, None].to(device, codec.dtype)
    anchor = codec.encode(image, generator).float()
    still = image.repeat(1, 1, (chunk_frames - 1) * codec.temporal + 1, 1, 1)
    newest = codec.encode(still, generator)[:, :, -1:].float()
    if image_noise is not None:
        anchor = soften(anchor, image_noise.draw(1, generator, device), generator)
        newest = soften(newest, video_noise.draw(1, generator, device), generator)
    return Condition(anchor=anchor, history=newest, frames_seen=1)


def video_condition(codec: LatentCodec, video: torch.Tensor, chunk_frames: int, generator: torch.Generator | None,
                    noise: NoiseRange | None = NoiseRange(), image_noise: NoiseRange = NoiseRange()) -> Condition:
    """V2V: the input video (B, 3, T, H, W) in [-1, 1] becomes the history; its first frame the anchor.

    Whole 33-frame windows are encoded, aligned to the end of the video (the oldest frames that do
    not fill a window are dropped), each window separately, as the model was trained.
    """
    device = codec.device
    window = (chunk_frames - 1) * codec.temporal + 1
    count = video.shape[2] // window
    if count == 0:
        raise ValueError(f"the input video has {video.shape[2]} frames; video-to-video needs at least {window} "
                         f"(one {chunk_frames}-latent-frame chunk)")
    video = video.to(device, codec.dtype)
    start = video.shape[2] - count * window
    anchor = codec.encode(video[:, :, :1], generator).float()
    pieces = [codec.encode(video[:, :, start + i * window: start + (i + 1) * window], generator) for i in range(count)]
    history = torch.cat(pieces, dim=2).float()
    if noise is not None:
        anchor = soften(anchor, image_noise.draw(1, generator, device), generator)
        softened = []
        for piece in history.split(chunk_frames, dim=2):
            sigma = noise.draw(piece.shape[2], generator, device).view(1, 1, -1, 1, 1)
            softened.append(soften(piece, sigma, generator))
        history = torch.cat(softened, dim=2)
    return Condition(anchor=anchor, history=history, frames_seen=history.shape[2])
