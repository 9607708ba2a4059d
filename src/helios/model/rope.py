"""3D rotary position embedding, with the centre-downsampled tables of the compressed history terms.

Each token's head dimension is split into (t, h, w) parts; each part rotates pairs of channels by
angle = position * theta^(-2i/d). A token gets a (cos, sin) row of head_dim/2 values each.

History terms patchified coarser than the noisy tokens (mid 2x4x4, long 4x8x8 in latent units, i.e.
2x2x2 and 4x4x4 in token units) get the average of the cos/sin rows of the fine tokens they cover,
after replicate-padding the grid to a multiple of the pooling size. That average is what the
released checkpoints were trained with, so we reproduce it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def axis_frequencies(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim
    return 1.0 / (theta ** exponents)


def rope_grid(frame_indices: torch.Tensor, height: int, width: int, rope_dim: tuple[int, int, int],
              theta: float) -> torch.Tensor:
    """cos/sin tables for a (T, height, width) token grid: (B, head_dim, T, height, width), cos then sin.

    frame_indices: (B, T) temporal positions (integers, possibly non-contiguous).
    """
    device = frame_indices.device
    pos_t = frame_indices.to(torch.float32)
    pos_y = torch.arange(height, device=device, dtype=torch.float32)
    pos_x = torch.arange(width, device=device, dtype=torch.float32)
    b, t = pos_t.shape
    # Outer products in float32 (positions past 256 are not exact in bf16).
    with torch.autocast(device_type=device.type, enabled=False):
        ang_t = pos_t[:, :, None] * axis_frequencies(rope_dim[0], theta, device)  # (B, T, dt/2)
        ang_y = pos_y[:, None] * axis_frequencies(rope_dim[1], theta, device)  # (H, dy/2)
        ang_x = pos_x[:, None] * axis_frequencies(rope_dim[2], theta, device)  # (W, dx/2)
        angles = torch.cat([
            ang_t[:, :, None, None, :].expand(b, t, height, width, -1),
            ang_y[None, None, :, None, :].expand(b, t, height, width, -1),
            ang_x[None, None, None, :, :].expand(b, t, height, width, -1),
        ], dim=-1)  # (B, T, H, W, head_dim/2)
        table = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return table.permute(0, 4, 1, 2, 3)


def pool_grid(table: torch.Tensor, factor: int) -> torch.Tensor:
    """Average factor^3 blocks of a (B, C, T, H, W) table, replicate-padding to a multiple first."""
    if factor == 1:
        return table
    _, _, t, h, w = table.shape
    pad = [(-w) % factor, (-h) % factor, (-t) % factor]
    table = F.pad(table, (0, pad[0], 0, pad[1], 0, pad[2]), mode="replicate")
    return F.avg_pool3d(table, factor, stride=factor)


def flatten_grid(table: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T*H*W, C), token order t-major like the patch embedding."""
    return table.flatten(2).transpose(1, 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x (B, L, H, D) by per-token angles; cos/sin: (B, L, D/2).

    Computed in float32, returned in x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)
