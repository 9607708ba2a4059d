"""Turning a user's image or video into history latents (I2V, V2V), and latents back into frames.

The random draws (VAE posterior samples, then the noise that softens the conditioning latents)
happen in the reference pipelines' order, so a seed reproduces a reference video.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from helios.model.graphs import GraphedDecode
from helios.model.wan_vae import DecodeState, WanVAEDecoder, autotune_convs, use_static_impls_

log = logging.getLogger("helios")


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


SLICE_BESIDE_GRAPH = 2  # latent frames per eager decoder call while a captured whole-chunk decode holds its pool


class LatentCodec:
    """The Wan VAE with the latent normalisation of the released models: z' = (z - mean) / std.

    Encoding runs diffusers' `AutoencoderKLWan`; decoding runs our own decoder (helios.model.wan_vae) on
    the same weights, a whole chunk at a time. A VAE of another layout (Wan2.2's, say) decodes with diffusers.
    """

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.temporal = cfg.scale_factor_temporal
        self.spatial = cfg.scale_factor_spatial
        self.channels = cfg.z_dim
        self._mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        self.decoder = own_decoder(vae)
        self.graphed: GraphedDecode | None = None  # fast_decode_(): the decode replayed as CUDA graphs
        # Latent frames per decoder call after frame 0 (a memory plan's VAE slices); None: all at once.
        self.decode_slice: int | None = None
        self._device_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stats()  # made now, on the default stream, rather than first inside an engine loop

    def fast_decode_(self, latent_shape: tuple[int, ...] | None = None, graphs: bool = True,
                     deterministic: bool = False) -> dict:
        """The GPU fast path of the decode: channels-last weights and activations (cuDNN's Hopper kernels are
        NHWC), each convolution's implementation chosen by timing at `latent_shape` (B, C, T, h, w) (done here,
        while nothing else runs, so the timings are clean), and each latent shape's decode replayed as a CUDA
        graph. The frames change at bf16 rounding level (other algorithms), so it is for the fast path only.
        deterministic: each implementation fixed by its module's shape instead (`wan_vae.static_impl`), so that
        every run decodes with the same ones whatever the timings say; their weights are still prepared at
        `latent_shape`. Returns the convolution timings (for a static choice, the choices only)."""
        for p in self.vae.encoder.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        if self.decoder is None or self.device.type != "cuda":
            return {}
        self.decoder.channels_last_()
        timings = {}
        z = None if latent_shape is None else torch.randn(latent_shape, device=self.device, dtype=self.dtype)
        if deterministic:
            timings = use_static_impls_(self.decoder, z)
        elif z is not None:
            timings = autotune_convs(self.decoder, z)
        if graphs:
            self.graphed = GraphedDecode(self.decoder)
        return timings

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
        if self.decoder is None:
            return self.vae.decode(z, return_dict=False)[0]
        if self.graphed is not None and self.decode_slice is None:
            return self.graphed(z)
        # frame 0, then the rest, as decode_parts: so a fast start's early frame is bit for bit this decode's
        return torch.cat(list(self._own_parts(z)), dim=2)

    @torch.no_grad()
    def decode_parts(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """The same frames in two parts: frame 0, then the others. The causal decoder makes frame 0 first
        and from latent frame 0 alone, so it can be handed over before the rest is decoded."""
        z = self._vae_latents(latents)
        if self.decoder is None:
            frames = self.vae.decode(z, return_dict=False)[0]
            yield frames[:, :, :1]
            yield frames[:, :, 1:]
            return
        yield from self._own_parts(z)

    def _own_parts(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        state = DecodeState()
        first = self.decoder.decode(z[:, :, :1], state)
        yield first
        rest = z[:, :, 1:]
        n = self.eager_slice()
        if rest.shape[2] == 0:
            yield first[:, :, :0]
        elif n is None:
            yield self.decoder.decode(rest, state)
        else:  # the causal decoder carries its history across calls: the working set is one slice's
            yield torch.cat([self.decoder.decode(rest[:, :, i:i + n], state) for i in range(0, rest.shape[2], n)],
                            dim=2)

    def eager_slice(self) -> int | None:
        """Latent frames per decoder call outside a graph: the memory plan's slice; or, once a whole-chunk
        decode is captured, SLICE_BESIDE_GRAPH: that graph's pool keeps a whole chunk's working set (about
        20 GB at 384x640), and a second one beside it (a fast start's first chunk) would not fit next to the
        14B model on an 80 GB card."""
        if self.decode_slice is not None:
            return self.decode_slice
        return SLICE_BESIDE_GRAPH if self.graphed is not None and self.graphed.graphs else None

    @torch.no_grad()
    def decode_reference(self, latents: torch.Tensor) -> torch.Tensor:
        """diffusers' frame-by-frame decode (for tests and benchmarks of ours)."""
        return self.vae.decode(self._vae_latents(latents), return_dict=False)[0]


def own_decoder(vae) -> WanVAEDecoder | None:
    """Our decoder on the VAE's weights, or None for a VAE it does not implement (decoded by diffusers)."""
    try:
        return WanVAEDecoder.from_vae(vae)
    except (ValueError, RuntimeError, AttributeError) as e:
        log.info("VAE decoded by diffusers (%s)", str(e)[:120])
        return None


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
