"""The preview decoder: a TAEHV-architecture tiny decoder in place of the Wan VAE's decoder.

It takes the engine's normalised latents, as `LatentCodec.decode` does, and gives frames in [-1, 1]
with the same frame count (1 + 4(T - 1) per chunk): the engine hands chunks through either. It is
about a hundred times cheaper than the full decoder, for some fidelity (docs/preview-decoder.md).

    --decoder full          the model's VAE (default)
    --decoder tiny          the model folder's own preview decoder, preview_decoder/taehv.safetensors
    --decoder tiny:PATH     a weight file: taew2_1.pth / lighttaew2_1.safetensors (Wan2.1 latents) or one
                            distilled with `helios train-decoder`
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from helios.model.taehv import TAEHV, DecodeStream, TAEHVLoadError, load_taehv

PREVIEW_FOLDER = "preview_decoder"
PREVIEW_FILE = "taehv.safetensors"


class DecoderChoiceError(ValueError):
    """A --decoder value that names no decoder this model can use."""


def parse_decoder_choice(choice: str | None) -> tuple[str, Path | None]:
    """'full' | 'tiny' | 'tiny:PATH' -> (kind, path or None)."""
    choice = (choice or "full").strip()
    if choice == "full":
        return "full", None
    if choice == "tiny":
        return "tiny", None
    if choice.startswith("tiny:") and choice[5:]:
        return "tiny", Path(choice[5:]).expanduser()
    raise DecoderChoiceError(f"--decoder must be full, tiny or tiny:PATH (a TAEHV weight file), got {choice!r}")


def preview_decoder_path(model_folder: str | Path, path: str | Path | None = None) -> Path:
    """The weight file of a tiny decoder: `path`, else the model folder's own."""
    if path is not None:
        return Path(path)
    own = Path(model_folder) / PREVIEW_FOLDER / PREVIEW_FILE
    if not own.is_file():
        raise DecoderChoiceError(f"the model folder {model_folder} has no preview decoder ({PREVIEW_FOLDER}/"
                                 f"{PREVIEW_FILE}); pass a weight file as tiny:PATH (taew2_1.pth for Wan2.1 "
                                 "latents) or make one with `helios train-decoder`")
    return own


class TinyDecoder:
    """TAEHV on the engine's latents: normalised (B, C, T, h, w) -> frames (B, 3, 1 + 4(T - 1), H, W) in [-1, 1].

    latents_mean / latents_std: the VAE's latent normalisation (TAEHV takes the VAE's raw latents).
    """

    def __init__(self, taehv: TAEHV, latents_mean, latents_std, source: str = ""):
        self.taehv = taehv.eval().requires_grad_(False)
        self.source = source
        c = taehv.cfg.latent_channels
        self._mean = torch.as_tensor(latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
        self._std = torch.as_tensor(latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_file(cls, path: str | Path, vae_config) -> "TinyDecoder":
        """Load a weight file for the latent space of a VAE config (AutoencoderKLWan's), refusing another."""
        try:
            taehv = load_taehv(path, latent_channels=vae_config.z_dim, spatial_factor=vae_config.scale_factor_spatial,
                               temporal_factor=vae_config.scale_factor_temporal)
        except TAEHVLoadError as e:
            raise DecoderChoiceError(str(e)) from e
        return cls(taehv, vae_config.latents_mean, vae_config.latents_std, source=str(path))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TinyDecoder":
        self.taehv.to(device=device, dtype=dtype)
        self._stats = None
        return self

    def channels_last_(self) -> "TinyDecoder":
        """NHWC weights (the cuDNN kernels on recent GPUs are NHWC); the frames stay the same up to rounding."""
        self.taehv.to(memory_format=torch.channels_last)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.taehv.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.taehv.parameters()).dtype

    def _raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised (B, C, T, h, w) -> the VAE's raw latents as TAEHV takes them, (B, T, C, h, w)."""
        if self._stats is None or self._stats[0].device != self.device or self._stats[0].dtype != self.dtype:
            self._stats = (self._mean.to(self.device, self.dtype), self._std.to(self.device, self.dtype))
        mean, std = self._stats
        return (latents.to(self.device, self.dtype) * std + mean).transpose(1, 2)

    @staticmethod
    def _frames(x: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) in [0, 1] -> (B, 3, T, H, W) in [-1, 1], the full decoder's layout."""
        return (x * 2 - 1).transpose(1, 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One chunk's frames, decoded from a fresh state (as the full decoder decodes each chunk)."""
        return self._frames(self.taehv.decode_video(self._raw(latents)))

    @torch.no_grad()
    def decode_parts(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """The same frames in two parts, frame 0 (from latent frame 0 alone) and then the others."""
        raw, stream = self._raw(latents), DecodeStream()
        first = self._frames(self.taehv.decode_video(raw[:, :1], stream))
        yield first
        yield self._frames(self.taehv.decode_video(raw[:, 1:], stream)) if raw.shape[1] > 1 else first[:, :, :0]
