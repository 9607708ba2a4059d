"""History layout used in training: first-frame anchor + long / mid / short memory + noisy chunk.

Facts carried over from the official training code (see docs/training-notes.md):

* history sizes are ``[long, mid, short] = [16, 2, 1]`` latent frames, the noisy chunk has
  ``window = 9`` latent frames (33 RGB frames);
* the *anchor* (the first latent frame of the video) is kept as a separate frame and is
  concatenated in front of the most recent history frame: ``short = [anchor, last]`` (2 frames);
* relative RoPE frame indices are the same for every chunk:
  ``0`` anchor, ``1..16`` long, ``17..18`` mid, ``19`` last frame, ``20..28`` noisy chunk;
* training samples are cut from a video stored as independently VAE-encoded 33-frame sections
  ``(S, C, 9, h, w)``: the sections are concatenated along time, 19 zero frames are padded in
  front, section ``s`` is the target and the 19 latent frames before it are the history.
  The anchor is the first latent frame of the video, zeroed when ``s == 0`` (nothing generated
  yet, i.e. a T2V sample).

Tensors follow the diffusers layout ``(B, C, T, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "HistoryLayout",
    "HistoryBatch",
    "rope_indices",
    "split_history",
    "history_from_sections",
    "choose_section",
]


@dataclass(frozen=True)
class HistoryLayout:
    long: int = 16
    mid: int = 2
    short: int = 1
    window: int = 9  # noisy latent frames per chunk
    keep_anchor: bool = True

    @property
    def history_len(self) -> int:
        """Latent frames of history without the anchor (19 for the official layout)."""
        return self.long + self.mid + self.short

    @property
    def total_len(self) -> int:
        """Anchor + history + noisy chunk (29 for the official layout)."""
        return int(self.keep_anchor) + self.history_len + self.window

    @classmethod
    def from_sizes(cls, history_sizes, window: int = 9, keep_anchor: bool = True) -> "HistoryLayout":
        long, mid, short = sorted((int(s) for s in history_sizes), reverse=True)
        return cls(long=long, mid=mid, short=short, window=int(window), keep_anchor=keep_anchor)


@dataclass
class HistoryBatch:
    """Model-ready history: the three memory terms plus their RoPE frame indices.

    ``short`` is ``[anchor, most recent frame(s)]`` when the layout keeps the anchor.
    """

    long: torch.Tensor  # (B, C, long, h, w)
    mid: torch.Tensor  # (B, C, mid, h, w)
    short: torch.Tensor  # (B, C, 1 + short, h, w)
    indices_long: torch.Tensor  # (B, long)
    indices_mid: torch.Tensor  # (B, mid)
    indices_short: torch.Tensor  # (B, 1 + short)
    indices_noisy: torch.Tensor  # (B, window)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.short, self.mid, self.long


def rope_indices(layout: HistoryLayout, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Relative temporal RoPE indices (identical for every chunk), each ``(B, n)`` int64."""
    a = int(layout.keep_anchor)
    idx = torch.arange(layout.total_len, dtype=torch.long)
    anchor = idx[:a]
    o = a
    long = idx[o : o + layout.long]
    o += layout.long
    mid = idx[o : o + layout.mid]
    o += layout.mid
    last = idx[o : o + layout.short]
    o += layout.short
    noisy = idx[o : o + layout.window]
    short = torch.cat([anchor, last])

    def b(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0).expand(batch_size, -1).clone()

    return {"long": b(long), "mid": b(mid), "short": b(short), "noisy": b(noisy)}


def split_history(
    history: torch.Tensor, anchor: torch.Tensor | None, layout: HistoryLayout = HistoryLayout()
) -> HistoryBatch:
    """Split ``history (B, C, 19, h, w)`` (oldest first) + ``anchor (B, C, 1, h, w)`` into memory terms."""
    if history.shape[2] != layout.history_len:
        raise ValueError(f"history has {history.shape[2]} frames, layout expects {layout.history_len}")
    long, mid, last = history.split([layout.long, layout.mid, layout.short], dim=2)
    if layout.keep_anchor:
        if anchor is None:
            raise ValueError("layout keeps the anchor but anchor is None")
        short = torch.cat([anchor.to(history.dtype), last], dim=2)
    else:
        short = last
    ind = rope_indices(layout, history.shape[0])
    return HistoryBatch(
        long=long,
        mid=mid,
        short=short,
        indices_long=ind["long"],
        indices_mid=ind["mid"],
        indices_short=ind["short"],
        indices_noisy=ind["noisy"],
    )


def history_from_sections(
    sections: torch.Tensor, section_idx: int, layout: HistoryLayout = HistoryLayout()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut one training sample from a video stored as sections ``(S, C, t, h, w)``.

    Returns ``(anchor (C, 1, h, w), history (C, history_len, h, w), target (C, t, h, w))``: the
    target is section ``section_idx``; the history is the ``history_len`` latent frames right
    before it (zeros before the start of the video); the anchor is the video's first latent
    frame, zeroed when ``section_idx == 0``.
    """
    S, C, t, h, w = sections.shape
    if not 0 <= section_idx < S:
        raise IndexError(f"section {section_idx} out of range [0, {S})")
    flat = sections.permute(1, 0, 2, 3, 4).reshape(C, S * t, h, w)
    n = layout.history_len
    padded = torch.cat([flat.new_zeros(C, n, h, w), flat], dim=1)
    start = section_idx * t
    history = padded[:, start : start + n]
    target = sections[section_idx]
    anchor = sections[0, :, :1].clone()
    if section_idx == 0:
        anchor.zero_()
    return anchor, history.clone(), target.clone()


def choose_section(num_sections: int, seed: int, epoch: int, index: int) -> int:
    """Deterministic uniform section choice; same seeding rule as the official loader
    (``seed + epoch * 1_000_000 + index``)."""
    g = torch.Generator().manual_seed(int(seed) + int(epoch) * 1_000_000 + int(index))
    return int(torch.randint(0, num_sections, (1,), generator=g).item())
