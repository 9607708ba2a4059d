"""Training samples cut from a video's latent sections: (anchor, history, target).

The layout (term sizes, RoPE frame indices) and the split of the history into the model's memory
terms are the engine's (:class:`helios.engine.history.HistoryLayout`,
:func:`helios.engine.history.split_history`), so training feeds the model exactly what inference
feeds it. What is training-specific lives here (see docs/training-notes.md, section 0.2):

* a video is stored as independently VAE-encoded 33-frame sections ``(S, C, 9, h, w)``; the
  sections are concatenated along time, zero frames are padded in front, section ``s`` is the
  target and the latent frames right before it are the history;
* the anchor is the first latent frame of the video, zeroed when ``s == 0`` (nothing generated yet,
  i.e. a T2V sample);
* the target section is drawn with the official seeding rule.

Tensors follow the diffusers layout ``(B, C, T, H, W)``.
"""

from __future__ import annotations

import torch

from helios.engine.history import HistoryLayout, split_history

__all__ = [
    "HistoryLayout",
    "history_frames",
    "model_history_inputs",
    "history_from_sections",
    "choose_section",
]


def history_frames(layout: HistoryLayout) -> int:
    """Latent frames of history besides the anchor: 19 for (16, 2, 1) with the anchor (20 without,
    where the short term takes the two newest frames)."""
    return sum(layout.term_sizes)


def model_history_inputs(history: torch.Tensor, anchor: torch.Tensor | None,
                         layout: HistoryLayout) -> dict[str, torch.Tensor]:
    """``history (B, C, history_frames, h, w)`` (oldest first) + ``anchor (B, C, 1, h, w)`` -> the
    transformer's history keyword arguments (latents and RoPE indices)."""
    indices = {k: v.to(history.device) for k, v in layout.indices(history.shape[0]).items()}
    return {**split_history(history, layout, anchor), **indices}


def history_from_sections(
    sections: torch.Tensor, section_idx: int, layout: HistoryLayout = HistoryLayout()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut one training sample from a video stored as sections ``(S, C, t, h, w)``.

    Returns ``(anchor (C, 1, h, w), history (C, history_frames, h, w), target (C, t, h, w))``: the
    target is section ``section_idx``; the history is the latent frames right before it (zeros
    before the start of the video); the anchor is the video's first latent frame, zeroed when
    ``section_idx == 0``.
    """
    S, C, t, h, w = sections.shape
    if not 0 <= section_idx < S:
        raise IndexError(f"section {section_idx} out of range [0, {S})")
    flat = sections.permute(1, 0, 2, 3, 4).reshape(C, S * t, h, w)
    n = history_frames(layout)
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
