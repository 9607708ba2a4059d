"""The history buffer: what the next chunk is conditioned on.

The model sees a fixed window whatever the video length (relative RoPE: positions never grow):

    index 0          first-frame anchor      -> short term (with the newest frame)
    1 .. 16          long history (16 frames) -> long term, patchified 4x8x8
    17 .. 18         mid history (2 frames)   -> mid term, patchified 2x4x4
    19               newest frame             -> short term, patchified 1x2x2
    20 .. 28         the noisy chunk (9 frames)

Only the newest sum(sizes) latent frames are kept, so memory stays flat for any length.
Training builds the same terms from real latents with `split_history`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helios.model_folder import LATENT_CHUNK_FRAMES


@dataclass(frozen=True)
class HistoryLayout:
    sizes: tuple[int, int, int] = (16, 2, 1)  # long, mid, short
    chunk_frames: int = LATENT_CHUNK_FRAMES  # latent frames generated per chunk
    keep_first_frame: bool = True

    def __post_init__(self) -> None:
        if len(self.sizes) != 3 or min(self.sizes) < 1:
            raise ValueError(f"history sizes must be three positive integers (long, mid, short), got {self.sizes}")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be positive, got {self.chunk_frames}")

    @property
    def window(self) -> int:
        """Latent frames kept: 19 with the anchor; without it the short term takes one more (20)."""
        return sum(self.term_sizes)

    @property
    def term_sizes(self) -> tuple[int, int, int]:
        """Frames taken from the buffer for (long, mid, short); without the anchor the short term grows by one."""
        long, mid, short = self.sizes
        return (long, mid, short) if self.keep_first_frame else (long, mid, short + 1)

    def indices(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """Frame indices of each term and of the noisy chunk, as the model's keyword arguments."""
        long, mid, short = self.term_sizes
        if self.keep_first_frame:
            anchor, lo, mi, sh, noisy = torch.arange(1 + long + mid + short + self.chunk_frames).split(
                [1, long, mid, short, self.chunk_frames])
            sh = torch.cat([anchor, sh])
        else:
            lo, mi, sh, noisy = torch.arange(long + mid + short + self.chunk_frames).split(
                [long, mid, short, self.chunk_frames])
        out = {"indices_hidden_states": noisy, "indices_latents_history_short": sh,
               "indices_latents_history_mid": mi, "indices_latents_history_long": lo}
        return {k: v[None].expand(batch, -1) for k, v in out.items()}


def split_history(window: torch.Tensor, layout: HistoryLayout, anchor: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Split the newest frames (B, C, >=window, H, W) into the model's history keyword arguments.

    anchor: (B, C, 1, H, W) first-frame latent, or None for zeros (T2V before the first chunk exists).
    """
    long, mid, short = layout.term_sizes
    frames = window[:, :, -(long + mid + short):]
    lat_long, lat_mid, lat_short = frames.split([long, mid, short], dim=2)
    if layout.keep_first_frame:
        if anchor is None:
            anchor = torch.zeros_like(lat_short[:, :, :1])
        lat_short = torch.cat([anchor.to(lat_short.dtype), lat_short], dim=2)
    return {"latents_history_long": lat_long, "latents_history_mid": lat_mid, "latents_history_short": lat_short}


class HistoryBuffer:
    """The newest `layout.window` latent frames (zeros where nothing exists yet) and the anchor."""

    def __init__(self, batch: int, channels: int, height: int, width: int, layout: HistoryLayout,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.layout = layout
        self.latents = torch.zeros(batch, channels, layout.window, height, width, device=device, dtype=dtype)
        self.anchor: torch.Tensor | None = None
        self.frames_seen = 0  # real (non-padding) latent frames pushed so far

    def push(self, latents: torch.Tensor) -> None:
        """Append frames (B, C, T, H, W), keeping the newest `window`."""
        self.latents = torch.cat([self.latents, latents.to(self.latents.dtype)], dim=2)[:, :, -self.layout.window:]
        self.frames_seen += latents.shape[2]

    def set_anchor(self, anchor: torch.Tensor) -> None:
        self.anchor = anchor[:, :, :1]

    def model_inputs(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        terms = split_history(self.latents, self.layout, self.anchor)
        return {k: v.to(dtype) for k, v in terms.items()}
