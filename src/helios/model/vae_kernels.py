"""The Wan VAE decoder's fused elementwise kernel: [residual add] + RMS norm + [SiLU] in one pass.

Wan's RMS norm is x / max(|x|_2, 1e-12) * sqrt(C) * gamma over the channels of each position. On
channels-last tensors a position's channels are one contiguous row, so one Triton program normalises a
block of rows in float32 and writes the result (and the residual sum, when asked) in the tensor's dtype,
straight into the slice of a causal convolution's input buffer. That replaces diffusers' float32 cast,
normalize, cast back, two multiplies, SiLU and the cache concatenation: seven passes over the
activations become one read and one or two writes.

The torch path computes the same in plain ops; it runs on the CPU, where Triton is absent, and for
layouts the kernel does not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12  # F.normalize's

try:  # Triton ships with CUDA builds of PyTorch; the CPU wheels have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def rms_norm_silu(x: torch.Tensor, gain: torch.Tensor, scale: float, out: torch.Tensor,
                  residual: torch.Tensor | None = None, total: torch.Tensor | None = None,
                  silu: bool = True) -> torch.Tensor:
    """out = silu?(norm(x + residual) * scale * gain) over dim 1; `total` (if given) receives x + residual.

    x, residual, total and out have the same shape (B, C, ...); `out` may be a view into a larger buffer.
    """
    if use_triton(x, out, residual, total):
        _rms_norm_silu_triton(x, gain, scale, out, residual, total, silu)
        return out
    s = x if residual is None else x + residual
    if total is not None:
        total.copy_(s)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = F.normalize(s.float(), dim=1) * (scale * gain.float().view(shape))
    out.copy_(F.silu(y) if silu else y)
    return out


def use_triton(*tensors: torch.Tensor | None) -> bool:
    ts = [t for t in tensors if t is not None]
    return triton is not None and ts[0].is_cuda and all(_row_batch_stride(t) is not None for t in ts)


def _row_batch_stride(t: torch.Tensor) -> int | None:
    """The batch stride of a tensor whose positions are contiguous rows of its C channels (channels-last,
    any batch stride), else None."""
    if t.stride(1) != 1:
        return None
    c = t.shape[1]
    expected = c
    for dim in reversed(range(2, t.dim())):
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            return None
        expected *= t.shape[dim]
    return t.stride(0)


def _rms_norm_silu_triton(x, gain, scale, out, residual, total, silu):
    c = x.shape[1]
    per_batch = x[0, 0].numel()
    rows = x.shape[0] * per_batch
    block_c = triton.next_power_of_2(c)
    block_rows = max(1, 8192 // block_c)
    grid = (triton.cdiv(rows, block_rows),)
    res, tot = residual if residual is not None else x, total if total is not None else out
    _rms_norm_silu_kernel[grid](
        x, res, tot, out, gain.float().contiguous(), rows, per_batch, c, float(scale),
        _row_batch_stride(x), _row_batch_stride(res), _row_batch_stride(tot), _row_batch_stride(out),
        HAS_RESIDUAL=residual is not None, WRITE_TOTAL=total is not None, SILU=silu,
        BLOCK_C=block_c, BLOCK_ROWS=block_rows, num_warps=4 if block_c <= 256 else 8)


if triton is not None:

    @triton.jit
    def _rms_norm_silu_kernel(x_ptr, r_ptr, t_ptr, o_ptr, g_ptr, rows, per_batch, C, scale,
                              xs, rs, ts, os, HAS_RESIDUAL: tl.constexpr, WRITE_TOTAL: tl.constexpr,
                              SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.arange(0, BLOCK_C)
        mask = (row[:, None] < rows) & (col[None, :] < C)
        b = (row // per_batch).to(tl.int64)
        p = (row % per_batch).to(tl.int64) * C
        within = p[:, None] + col[None, :]
        v = tl.load(x_ptr + b[:, None] * xs + within, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            # the sum is rounded to the activations' dtype first, as the unfused decoder stores it
            v = v + tl.load(r_ptr + b[:, None] * rs + within, mask=mask, other=0.0)
        if WRITE_TOTAL:
            tl.store(t_ptr + b[:, None] * ts + within, v, mask=mask)
        v = v.to(tl.float32)
        norm = tl.sqrt(tl.sum(v * v, axis=1))
        inv = scale / tl.maximum(norm, 1e-12)
        g = tl.load(g_ptr + col, mask=col < C, other=0.0)
        y = v * inv[:, None] * g[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(o_ptr + b[:, None] * os + within, y.to(o_ptr.dtype.element_ty), mask=mask)
