"""The Wan VAE decoder's fused elementwise kernels.

`rms_norm_silu`: [bias add] + [residual adds] + RMS norm + [SiLU] in one pass.

Wan's RMS norm is x / max(|x|_2, 1e-12) * sqrt(C) * gamma over the channels of each position. On
channels-last tensors a position's channels are one contiguous row, so one Triton program normalises a
block of rows in float32 and writes the result (and the residual sum, when asked) in the tensor's dtype,
straight into the slice of a causal convolution's input buffer. That replaces diffusers' float32 cast,
normalize, cast back, two multiplies, SiLU and the cache concatenation: seven passes over the
activations become one read and one or two writes.

`sum_taps`: the temporal taps of a causal 3-D convolution computed as one 2-D convolution with the taps
folded into its output channels, (B T_in, K C, H, W), summed back per output frame (frame t takes tap k
of input frame t + k) with the bias added, in float32, rounded once.

`gather_taps`: a 3x3x3 convolution with very few outputs computed as one matmul to every tap's contribution,
then summed back over the 27 shifted taps per output position, in float32.

`conv3x3x3`: a 3x3x3 causal convolution as one implicit GEMM over its 27 taps, every output channel of a
position in one program, optionally with the residual add and the RMS norm + SiLU that follow it in the same
pass (the decoder's `fuse_conv_norms_`).

The torch paths compute the same in plain ops; they run on the CPU, where Triton is absent, and for
layouts the kernels do not take.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-12  # F.normalize's

try:  # Triton ships with CUDA builds of PyTorch; the CPU wheels have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


MAX_ADDENDS = 3  # tensors the fused norm adds to x on its way in (the unsummed taps of a convolution + a residual)


def rms_norm_silu(x: torch.Tensor, gain: torch.Tensor, scale: float, out: torch.Tensor,
                  residual: torch.Tensor | Sequence[torch.Tensor] | None = None, total: torch.Tensor | None = None,
                  silu: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out = silu?(norm(x + bias + residual) * scale * gain) over dim 1; `total` (if given) receives the sum.

    x, residual, total and out have the same shape (B, C, ...); `out` may be a view into a larger buffer;
    residual may be several tensors (at most MAX_ADDENDS), all added; bias (C,) is a convolution's bias left
    for this kernel to add. The sum is made in float32 and rounded once to x's dtype.
    """
    addends = [] if residual is None else [residual] if isinstance(residual, torch.Tensor) else list(residual)
    if len(addends) > MAX_ADDENDS:
        raise ValueError(f"rms_norm_silu adds at most {MAX_ADDENDS} tensors to x, got {len(addends)}")
    if use_triton(x, out, total, *addends):
        _rms_norm_silu_triton(x, gain, scale, out, addends, total, silu, bias)
        return out
    shape = (1, -1) + (1,) * (x.dim() - 2)
    s = x if bias is None else x + bias.to(x.dtype).view(shape)
    for a in addends:
        s = s + a
    if total is not None:
        total.copy_(s)
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


def _rms_norm_silu_triton(x, gain, scale, out, addends, total, silu, bias=None):
    c = x.shape[1]
    per_batch = x[0, 0].numel()
    rows = x.shape[0] * per_batch
    block_c = triton.next_power_of_2(c)
    block_rows = max(1, 8192 // block_c)
    grid = (triton.cdiv(rows, block_rows),)
    adds = list(addends) + [x] * (MAX_ADDENDS - len(addends))  # unused slots point anywhere valid
    tot = total if total is not None else out
    gain = gain.float().contiguous()
    _rms_norm_silu_kernel[grid](
        x, adds[0], adds[1], adds[2], tot, out, gain, bias.contiguous() if bias is not None else gain,
        rows, per_batch, c, float(scale), _row_batch_stride(x), *(_row_batch_stride(a) for a in adds),
        _row_batch_stride(tot), _row_batch_stride(out),
        N_ADD=len(addends), WRITE_TOTAL=total is not None, SILU=silu, HAS_BIAS=bias is not None,
        ADD=bias is not None or len(addends) > 0,
        BLOCK_C=block_c, BLOCK_ROWS=block_rows, num_warps=4 if block_c <= 256 else 8)


if triton is not None:

    @triton.jit
    def _rms_norm_silu_kernel(x_ptr, a1_ptr, a2_ptr, a3_ptr, t_ptr, o_ptr, g_ptr, bias_ptr, rows, per_batch, C,
                              scale, xs, a1s, a2s, a3s, ts, os, N_ADD: tl.constexpr, WRITE_TOTAL: tl.constexpr,
                              SILU: tl.constexpr, HAS_BIAS: tl.constexpr, ADD: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.arange(0, BLOCK_C)
        mask = (row[:, None] < rows) & (col[None, :] < C)
        b = (row // per_batch).to(tl.int64)
        p = (row % per_batch).to(tl.int64) * C
        within = p[:, None] + col[None, :]
        v = tl.load(x_ptr + b[:, None] * xs + within, mask=mask, other=0.0)
        if ADD:
            s = v.to(tl.float32)
            if HAS_BIAS:
                s += tl.load(bias_ptr + col, mask=col < C, other=0.0).to(tl.float32)[None, :]
            if N_ADD >= 1:
                s += tl.load(a1_ptr + b[:, None] * a1s + within, mask=mask, other=0.0).to(tl.float32)
            if N_ADD >= 2:
                s += tl.load(a2_ptr + b[:, None] * a2s + within, mask=mask, other=0.0).to(tl.float32)
            if N_ADD >= 3:
                s += tl.load(a3_ptr + b[:, None] * a3s + within, mask=mask, other=0.0).to(tl.float32)
            # the sum is rounded to the activations' dtype once: the next block's identity is that stored sum
            v = s.to(x_ptr.dtype.element_ty)
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


# ----------------------------------------------------------------------------------------------
# the folded temporal taps: one 2-D convolution's K * C output channels summed back into C


def sum_taps(y: torch.Tensor, batch: int, taps: int, bias: torch.Tensor | None,
             memory_format: torch.memory_format) -> torch.Tensor:
    """y (B * T_in, taps * C, H, W), tap k of each input frame in channels [k C, (k + 1) C) ->
    out (B, C, T_in - taps + 1, H, W) with out[:, :, t] = sum_k y[frame t + k, tap k] + bias."""
    n, kc, h, w = y.shape
    if n % batch or kc % taps:
        raise ValueError(f"sum_taps: {tuple(y.shape)} is not (B * T_in, taps * C, H, W) for B={batch}, taps={taps}")
    c, frames_in = kc // taps, n // batch
    frames = frames_in - taps + 1
    out = torch.empty((batch, c, frames, h, w), dtype=y.dtype, device=y.device, memory_format=memory_format)
    if (triton is not None and y.is_cuda and y.is_contiguous(memory_format=torch.channels_last)
            and out.is_contiguous(memory_format=torch.channels_last_3d)):
        _sum_taps_triton(y, out, frames_in, taps, bias)
        return out
    yv = y.reshape(batch, frames_in, taps, c, h, w)  # a view in either layout
    ov = out.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W)
    ov.copy_(yv[:, :frames, 0])
    for k in range(1, taps):
        ov.add_(yv[:, k:k + frames, k])
    if bias is not None:
        ov.add_(bias.to(y.dtype).view(c, 1, 1))
    return out


def _sum_taps_triton(y, out, frames_in, taps, bias):
    b, c, frames, h, w = out.shape
    rows = b * frames * h * w
    block_c = triton.next_power_of_2(c)
    block_rows = max(16, 8192 // block_c)
    grid = (triton.cdiv(rows, block_rows),)
    _sum_taps_kernel[grid](y, bias.contiguous() if bias is not None else y, out, rows, frames, frames_in, h * w, c,
                           TAPS=taps, HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_ROWS=block_rows,
                           num_warps=4 if block_c <= 128 else 8)


if triton is not None:

    @triton.jit
    def _sum_taps_kernel(y_ptr, bias_ptr, o_ptr, rows, frames, frames_in, hw, C, TAPS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        # one row per output position (b, t, p); y is (B T_in, H, W, TAPS C) in memory, out (B, T, H, W, C)
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.arange(0, BLOCK_C)
        mask = (row[:, None] < rows) & (col[None, :] < C)
        p = row % hw
        bt = row // hw
        frame0 = (bt // frames) * frames_in + bt % frames  # input frame of tap 0
        acc = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(TAPS):
            src = ((frame0 + k) * hw + p) * (TAPS * C) + k * C
            acc += tl.load(y_ptr + src[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + col, mask=col < C, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr + row[:, None] * C + col[None, :], acc.to(o_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# a 3x3x3 convolution with very few outputs (the decoder's last, 96 -> 3) as a matmul + gather


GATHER_CHANNELS = 4  # outputs per tap in the matmul's result (the real ones, then zeros)
GATHER_TAPS = 27  # a 3x3x3 kernel


def gather_taps(p: torch.Tensor, batch: int, frames_in: int, h: int, w: int, channels: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """p (B * T_in * H * W, 27 * 4): at each input position, every tap's contribution to each output channel
    (tap (kt, ky, kx) in columns [(9 kt + 3 ky + kx) 4, ... + 4)) -> out (B, channels, T_in - 2, H, W),
    contiguous, with out[b, c, t, y, x] = sum over taps of p at (t + kt, y + ky - 1, x + kx - 1) (zero
    outside the frame) + bias[c]."""
    if p.shape != (batch * frames_in * h * w, GATHER_TAPS * GATHER_CHANNELS) or channels > GATHER_CHANNELS:
        raise ValueError(f"gather_taps: p {tuple(p.shape)} is not (B T_in H W, {GATHER_TAPS * GATHER_CHANNELS}) "
                         f"for B={batch}, T_in={frames_in}, H={h}, W={w}, or channels {channels} > {GATHER_CHANNELS}")
    frames = frames_in - 2
    out = torch.empty((batch, channels, frames, h, w), dtype=p.dtype, device=p.device)
    if triton is not None and p.is_cuda and p.is_contiguous():
        rows = batch * frames * h * w
        block_rows = 64
        _gather_taps_kernel[(triton.cdiv(rows, block_rows),)](
            p, bias.contiguous() if bias is not None else p, out, rows, frames, frames_in, h, w, channels,
            CP=GATHER_CHANNELS, TAPS=GATHER_TAPS, TAPS_P2=32, HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows,
            num_warps=4)
        return out
    per = F.pad(p.reshape(batch, frames_in, h, w, GATHER_TAPS, GATHER_CHANNELS), (0, 0, 0, 0, 1, 1, 1, 1))
    acc = torch.zeros((batch, frames, h, w, GATHER_CHANNELS), dtype=p.dtype, device=p.device)
    for tap in range(GATHER_TAPS):
        kt, ky, kx = tap // 9, tap // 3 % 3, tap % 3
        acc += per[:, kt:kt + frames, ky:ky + h, kx:kx + w, tap]
    out.copy_(acc[..., :channels].permute(0, 4, 1, 2, 3))
    if bias is not None:
        out += bias.to(p.dtype).view(-1, 1, 1, 1)
    return out


if triton is not None:

    @triton.jit
    def _gather_taps_kernel(p_ptr, bias_ptr, o_ptr, rows, frames, frames_in, H, W, C, CP: tl.constexpr,
                            TAPS: tl.constexpr, TAPS_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_ROWS: tl.constexpr):
        # one row per output position (b, t, y, x): its 27 taps' CP channels, gathered and summed over taps
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rmask = row < rows
        hw = row % (H * W)
        x = hw % W
        y = hw // W
        bt = row // (H * W)
        t = bt % frames
        b = bt // frames
        tap = tl.arange(0, TAPS_P2)
        kt, ky, kx = tap // 9, (tap // 3) % 3, tap % 3
        yy = y[:, None] + ky[None, :] - 1
        xx = x[:, None] + kx[None, :] - 1
        valid = rmask[:, None] & (tap[None, :] < TAPS) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        pos = ((b[:, None] * frames_in + t[:, None] + kt[None, :]) * H + yy) * W + xx
        base = pos * (TAPS * CP) + tap[None, :] * CP
        c = tl.arange(0, CP)
        vals = tl.load(p_ptr + base[:, :, None] + c[None, None, :], mask=valid[:, :, None], other=0.0)
        acc = tl.sum(vals.to(tl.float32), axis=1)  # (BLOCK_ROWS, CP)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
        o = ((b[:, None] * C + c[None, :]) * frames + t[:, None]) * (H * W) + hw[:, None]
        tl.store(o_ptr + o, acc.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & (c[None, :] < C))


# ----------------------------------------------------------------------------------------------
# a 3x3x3 convolution as one implicit GEMM, all output channels per program, with an optional fused
# RMS norm + SiLU epilogue


def igemm_split(c_out: int) -> tuple[int, int] | None:
    """(N0, N1): the output channels as two power-of-two GEMM widths (96 = 64 + 32, 192 = 128 + 64, 128 =
    128 + 0), so that a program computes every output channel without padding them; None if C_out is not
    such a sum within 16..192 (Triton's dot takes power-of-two widths of at least 16)."""
    if not 16 <= c_out <= 192:
        return None
    n0 = 1 << (c_out.bit_length() - 1)
    n1 = c_out - n0
    return (n0, n1) if n1 == 0 or (n1 >= 16 and n1 & (n1 - 1) == 0) else None


def igemm_fits(c_in: int, c_out: int) -> bool:
    """Whether `conv3x3x3`'s Triton kernel takes these widths (input channels in blocks of 32)."""
    return c_in % 32 == 0 and igemm_split(c_out) is not None


def pack_igemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3, 3) -> (27 C_in, C_out): row (tap, input channel), tap = 9 kt + 3 ky + kx."""
    c_out, c_in = weight.shape[:2]
    return weight.permute(2, 3, 4, 1, 0).reshape(27 * c_in, c_out).contiguous()


def conv3x3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
              gain: torch.Tensor | None = None, scale: float = 1.0, silu: bool = False,
              residual: torch.Tensor | None = None, total: torch.Tensor | None = None,
              packed: torch.Tensor | None = None) -> torch.Tensor:
    """out = conv(x) + bias [+ residual] for a 3x3x3 convolution with no temporal and unit spatial padding (the
    causal convolution of a buffer that holds its history frames in front): x (B, C_in, T + 2, H, W) -> out
    (B, C_out, T, H, W). With `gain`, the RMS norm (and SiLU) that follows the convolution is made in the same
    pass and `out` receives silu?(norm(s) * scale * gain) of that sum s instead; `total` (with `residual`)
    then receives s itself, rounded once to out's dtype (the norm reads the rounded s, as `rms_norm_silu` does).
    Without a residual the norm reads the float32 sum.

    `weight` is the convolution's (C_out, C_in, 3, 3, 3) weight; `out` and `total` may be views into larger
    buffers. On CUDA with channels-last tensors and `igemm_fits` widths, one Triton kernel (`_conv3x3x3_triton`,
    the weight packed by `pack_igemm_weight`, or `packed` if the caller keeps it packed); elsewhere cuDNN's or
    the CPU's convolution, then the fused norm.
    """
    b, c_in, t_in, h, w = x.shape
    c_out = weight.shape[0]
    shape = (b, c_out, t_in - 2, h, w)
    if weight.shape != (c_out, c_in, 3, 3, 3) or any(t is not None and t.shape != shape for t in (out, residual, total)):
        raise ValueError(f"conv3x3x3: weight {tuple(weight.shape)}, out {tuple(out.shape)} (and residual, total) do "
                         f"not fit x {tuple(x.shape)} (a 3x3x3 kernel, T + 2 input frames -> T output frames)")
    if total is not None and (residual is None or gain is None):
        raise ValueError("conv3x3x3: `total` is the sum with the residual before the norm; give both")
    if x.is_cuda and igemm_fits(c_in, c_out) and use_triton(x, out, residual, total):
        _conv3x3x3_triton(x, pack_igemm_weight(weight) if packed is None else packed, bias, out, gain, scale, silu,
                          residual, total)
        return out
    y = F.conv3d(x, weight, bias, padding=(0, 1, 1))
    if gain is None:
        return out.copy_(y if residual is None else y + residual)
    return rms_norm_silu(y, gain, scale, out=out, residual=residual, total=total, silu=silu)


def _conv3x3x3_triton(x, packed, bias, out, gain=None, scale=1.0, silu=False, residual=None, total=None,
                      block_m: int | None = None):
    """`conv3x3x3` by the Triton kernel, `packed` from `pack_igemm_weight` (made once by the caller). The launch
    configuration is tuned per shape (`_IGEMM_CONFIGS`) unless `block_m` fixes it: none of them changes what a
    position sums or in which order (the K loop is the same), only how many positions a program takes."""
    b, c_in, t_in, h, w = x.shape
    c_out = out.shape[1]
    n0, n1 = igemm_split(c_out)
    rows = b * (t_in - 2) * h * w
    fp32 = x.dtype == torch.float32
    res = residual if residual is not None else out
    tot = total if total is not None else out
    args = (x, packed, bias if bias is not None else packed, gain.float().contiguous() if gain is not None else packed,
            res, tot, out, rows, t_in - 2, h, w, float(scale), _row_batch_stride(x), _row_batch_stride(res),
            _row_batch_stride(tot), _row_batch_stride(out))
    meta = dict(C_IN=c_in, C_OUT=c_out, N0=n0, N1=n1, BK=64 if c_in % 64 == 0 else 32,
                HAS_BIAS=bias is not None, NORM=gain is not None, SILU=silu, HAS_RES=residual is not None,
                WRITE_TOTAL=total is not None, PRECISION="ieee" if fp32 else "tf32")
    if block_m is not None:
        _conv3x3x3_kernel[(triton.cdiv(rows, block_m),)](*args, **meta, BLOCK_M=block_m,
                                                          num_warps=8 if block_m >= 128 else 4, num_stages=3)
    else:
        _conv3x3x3_tuned[lambda m: (triton.cdiv(rows, m["BLOCK_M"]),)](*args, **meta)
    return out


if triton is not None:

    @triton.jit
    def _conv3x3x3_kernel(x_ptr, w_ptr, bias_ptr, g_ptr, r_ptr, t_ptr, o_ptr, rows, T, H, W, scale, xs, rs, ts, os,
                          C_IN: tl.constexpr, C_OUT: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr,
                          BK: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                          SILU: tl.constexpr, HAS_RES: tl.constexpr, WRITE_TOTAL: tl.constexpr,
                          PRECISION: tl.constexpr):
        # One row per output position (b, t, y, x). The K loop runs over the 27 taps x C_IN / BK channel
        # blocks; tap (kt, ky, kx) reads input position (t + kt, y + ky - 1, x + kx - 1), zero outside the frame.
        row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = row < rows
        x_ = row % W
        y_ = (row // W) % H
        t_ = (row // (W * H)) % T
        b_ = row // (W * H * T)
        k = tl.arange(0, BK)
        n0 = tl.arange(0, N0)
        acc0 = tl.zeros((BLOCK_M, N0), dtype=tl.float32)
        if N1 > 0:
            n1 = N0 + tl.arange(0, N1)
            acc1 = tl.zeros((BLOCK_M, N1), dtype=tl.float32)
        CHUNKS: tl.constexpr = C_IN // BK
        for it in range(27 * CHUNKS):
            tap = it // CHUNKS
            c0 = (it % CHUNKS) * BK
            kt = tap // 9
            yy = y_ + (tap // 3) % 3 - 1
            xx = x_ + tap % 3 - 1
            valid = rmask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            pos = ((t_ + kt) * H + yy) * W + xx
            src = b_ * xs + pos * C_IN + c0
            a = tl.load(x_ptr + src[:, None] + k[None, :], mask=valid[:, None], other=0.0)
            wrow = (tap * C_IN + c0 + k).to(tl.int64) * C_OUT
            acc0 = tl.dot(a, tl.load(w_ptr + wrow[:, None] + n0[None, :]), acc0, input_precision=PRECISION)
            if N1 > 0:
                acc1 = tl.dot(a, tl.load(w_ptr + wrow[:, None] + n1[None, :]), acc1, input_precision=PRECISION)
        if HAS_BIAS:
            acc0 += tl.load(bias_ptr + n0).to(tl.float32)[None, :]
            if N1 > 0:
                acc1 += tl.load(bias_ptr + n1).to(tl.float32)[None, :]
        pos = (t_ * H + y_) * W + x_  # the output position within its batch element
        if HAS_RES:  # the residual, then the sum rounded once to the activations' dtype (the next identity)
            rpos = pos * C_OUT + b_ * rs
            acc0 += tl.load(r_ptr + rpos[:, None] + n0[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
            acc0 = acc0.to(o_ptr.dtype.element_ty).to(tl.float32)
            if N1 > 0:
                acc1 += tl.load(r_ptr + rpos[:, None] + n1[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
                acc1 = acc1.to(o_ptr.dtype.element_ty).to(tl.float32)
        if WRITE_TOTAL:
            tpos = pos * C_OUT + b_ * ts
            tl.store(t_ptr + tpos[:, None] + n0[None, :], acc0.to(t_ptr.dtype.element_ty), mask=rmask[:, None])
            if N1 > 0:
                tl.store(t_ptr + tpos[:, None] + n1[None, :], acc1.to(t_ptr.dtype.element_ty), mask=rmask[:, None])
        if NORM:
            sq = tl.sum(acc0 * acc0, axis=1)
            if N1 > 0:
                sq += tl.sum(acc1 * acc1, axis=1)
            inv = scale / tl.maximum(tl.sqrt(sq), 1e-12)
            acc0 = acc0 * inv[:, None] * tl.load(g_ptr + n0)[None, :]
            if SILU:
                acc0 = acc0 * tl.sigmoid(acc0)
            if N1 > 0:
                acc1 = acc1 * inv[:, None] * tl.load(g_ptr + n1)[None, :]
                if SILU:
                    acc1 = acc1 * tl.sigmoid(acc1)
        opos = pos * C_OUT + b_ * os
        tl.store(o_ptr + opos[:, None] + n0[None, :], acc0.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
        if N1 > 0:
            tl.store(o_ptr + opos[:, None] + n1[None, :], acc1.to(o_ptr.dtype.element_ty), mask=rmask[:, None])

    # (output positions per program, warps, pipeline stages); the outputs are only written, so timing reruns are
    # safe. 256 positions halve how often each program's weight tiles are read from L2 (a 96-wide GEMM reuses
    # them little), where the accumulators fit in registers (96 channels; at 192 the tuner finds it slow).
    _IGEMM_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=wp, num_stages=st)
                      for m, wp, st in ((128, 8, 3), (128, 8, 4), (128, 4, 3), (64, 4, 3), (64, 4, 4), (256, 8, 3),
                                        (256, 8, 4))]
    _conv3x3x3_tuned = triton.autotune(_IGEMM_CONFIGS, key=["rows", "C_IN", "C_OUT", "NORM", "HAS_RES"])(
        _conv3x3x3_kernel)
