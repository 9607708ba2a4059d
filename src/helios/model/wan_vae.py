"""Our Wan2.1 VAE decoder: the weights of diffusers' `AutoencoderKLWan` (its `decoder.*` and
`post_quant_conv.*`), decoding a whole chunk of latent frames in one pass.

diffusers walks the latent frames one at a time and keeps, for every causal convolution, the last two
frames of its input. Over a whole chunk that is the same as one causal convolution over all frames
with two zero frames in front, which is what this decoder runs. The temporal upsamplers are the
exception the reference makes: the chunk's first latent frame is not upsampled in time (it becomes one
frame), and the others are, with zero history. So 9 latent frames become 1 + 4 * 8 = 33 frames.

Layout and fusion (the GPU fast path; the CPU runs the same maths with plain torch):
- every activation is channels-last (`channels_last_3d`), the layout cuDNN's Hopper kernels want;
- each causal convolution reads a buffer with room for its two history frames in front, and the
  RMS norm + SiLU before it (and the residual add and the previous convolution's bias before that)
  write straight into that buffer in one fused kernel (`helios.model.vae_kernels`), so no
  concatenation or separate activation pass is made;
- each convolution has several implementations with the same result in float32, chosen per layer by
  timing (`autotune_convs`): cuDNN's 3-D kernel, one 2-D convolution per temporal tap summed, or the taps
  folded into one 2-D convolution's output channels and summed by a Triton kernel; each upsampler's
  nearest 2x upsampling + 3x3 convolution runs as is or as one 2x2 convolution of its four output phases;
  or, for decodes that must repeat exactly across runs, fixed by shape alone (`static_impl`, `use_static_impls_`);
- the whole decode can be captured as a CUDA graph per latent shape (`GraphedDecode`).

`decode(z, state)` also decodes a chunk in parts (frame 0 first, then the rest): `state` carries each
causal convolution's history between the calls, as diffusers' feature cache does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from helios.model import vae_kernels

log = logging.getLogger("helios")

HISTORY = 2  # frames of history a kernel-3 causal convolution reads


@dataclass
class WanVAEDecoderConfig:
    """The decoder's part of `AutoencoderKLWan`'s config (Wan2.1 defaults)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    out_channels: int = 3

    @classmethod
    def from_vae_config(cls, cfg: Any) -> "WanVAEDecoderConfig":
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        unsupported = [k for k in ("is_residual", "patch_size") if get(k)]
        if unsupported or get("attn_scales"):
            raise ValueError(f"this VAE config is not a Wan2.1 VAE (has {unsupported or ['attn_scales']}); "
                             "only the Wan2.1 layout (is_residual=False, no patch_size, no attn_scales) is supported")
        return cls(base_dim=get("base_dim", 96), z_dim=get("z_dim", 16), dim_mult=tuple(get("dim_mult", (1, 2, 4, 4))),
                   num_res_blocks=get("num_res_blocks", 2),
                   temperal_downsample=tuple(get("temperal_downsample", (False, True, True))),
                   out_channels=get("out_channels", 3))

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temperal_downsample))


# ----------------------------------------------------------------------------------------------
# state: each causal convolution's last input frames, between the parts of one chunk


@dataclass
class DecodeState:
    """History carried between `decode` calls of one chunk (a fresh one for every chunk)."""

    keep: bool = True  # keep each convolution's last input frames for a next call
    frames: dict[str, torch.Tensor] = field(default_factory=dict)
    started: bool = False  # the chunk's first latent frame has been decoded


# ----------------------------------------------------------------------------------------------
# building blocks (module and parameter names are diffusers', so its state dict loads as it is)


class RMSNorm(nn.Module):
    """x / max(|x|_2, eps) * sqrt(C) * gamma over the channel dimension (Wan's RMS_norm, no bias)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))
        self.scale = dim**0.5

    def gain(self) -> torch.Tensor:
        return self.gamma.reshape(-1)


class CausalConv3d(nn.Conv3d):
    """A Conv3d whose input already holds its `HISTORY` frames in front (kernel 3 in time) or none
    (kernel 1); the spatial padding is the convolution's own."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int, int], padding: int | tuple = 0):
        k = (kernel,) * 3 if isinstance(kernel, int) else kernel
        p = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(c_in, c_out, k, padding=(0, p[1], p[2]))
        self.impl: str = "conv3d"  # see autotune_convs
        self.derived: dict[str, tuple[tuple, torch.Tensor]] = {}  # weights rearranged for an impl

    @property
    def impls(self) -> list[str]:
        names = ["conv3d", "taps", "folded"] if self.kernel_size[0] > 1 else ["conv3d"]
        if self.out_channels < PADDED_CHANNELS:
            names.append("pad16")
        if (self.out_channels <= vae_kernels.GATHER_CHANNELS and self.kernel_size == (3, 3, 3)
                and self.padding == (0, 1, 1)):
            names.append("gather")
        if self.fits_igemm:
            names.append("igemm")
        return names

    @property
    def fits_igemm(self) -> bool:
        """A 3x3x3 convolution whose widths the implicit-GEMM kernel takes (`vae_kernels.igemm_fits`)."""
        return (self.kernel_size == (3, 3, 3) and self.padding == (0, 1, 1)
                and vae_kernels.igemm_fits(self.in_channels, self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_conv(self, x)


# Each implementation computes conv(x) + bias (bias may be None) with the same result in float32.
CONV_IMPLS: dict[str, Callable[[CausalConv3d, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {}
# Implementations that add a bias for free (in a pass they make anyway); the others leave it to a consumer
# that can take it (`run_conv_deferred`), as cuDNN's bias is a separate pass over the output.
FREE_BIAS = {"folded", "phase", "gather", "igemm"}
# Implementations that can leave their partial sums (one per temporal tap) to such a consumer too.
PARTIAL_SUMS = {"taps"}
PADDED_CHANNELS = 16  # "pad16": a convolution with fewer outputs runs with zero weights up to this many
# Equal in float32; tuned only when asked for by name. "gather": on an H200 (2026-12-03) faster alone (2.9
# against 5.3 ms) but the whole decode 1.7 ms slower with it (benchmarks/RESULTS.md). "igemm": checked under
# Triton's interpreter, not yet timed on a GPU.
NOT_TUNED_BY_DEFAULT = {"gather", "igemm"}
_tuning: list[set[str] | None] = [None]  # while autotune_convs runs: the implementations it may choose


def run_conv(conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
    """The convolution (with its bias) by the implementation chosen for its shape."""
    return run_conv_deferred(conv, x, defer=False)[0][0]


def run_conv_deferred(conv: CausalConv3d, x: torch.Tensor, defer: bool = True, partial_sums: bool = True
                      ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(the parts whose sum is conv(x) [+ bias], the bias still to add). Without `defer`: one part, the
    whole output. With it, for a caller that adds them in a fused kernel it runs anyway: an implementation
    whose bias would cost a pass of its own leaves the bias, and (with `partial_sums`) the per-tap one
    leaves its taps unsummed."""

    def call(name: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if defer and partial_sums and name in PARTIAL_SUMS:
            return conv3d_tap_parts(conv, x, None), conv.bias
        if defer and name not in FREE_BIAS:
            return [CONV_IMPLS[name](conv, x, None)], conv.bias
        return [CONV_IMPLS[name](conv, x, conv.bias)], None

    pick_impl(conv, conv.impls, call, x.is_cuda)
    return call(conv.impl)


def pick_impl(module: nn.Module, candidates: list[str], call: Callable[[str], Any], cuda: bool) -> None:
    """While autotune_convs runs, set `module.impl` to the fastest allowed candidate on this very input."""
    if _tuning[0] is None or not cuda:
        return
    allowed = [name for name in candidates if name in _tuning[0]] or candidates[:1]
    module.impl = allowed[0] if len(allowed) == 1 else fastest_impl(module, allowed, call)


def cuda_ms(fn: Callable[[], Any], iters: int = 3) -> float:
    """Milliseconds per call of fn on the current stream (CUDA events), after one warm-up call."""
    fn()  # warm-up: plan selection, Triton compiles, derived weights
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def fastest_impl(module: nn.Module, candidates: list[str], call: Callable[[str], Any],
                 timer: Callable[[Callable[[], Any]], float] = cuda_ms) -> str:
    """Time each candidate (`call(name)` runs it) and return the fastest one's name; the timings (ms) are
    kept on the module as `tuned_ms`."""
    times = {}
    for name in candidates:
        try:
            times[name] = timer(lambda name=name: call(name))
        except Exception as e:  # e.g. a kernel that does not compile for this device: not a candidate here
            log.warning("%s implementation %r failed while tuning (%s); not using it", type(module).__name__,
                        name, f"{type(e).__name__}: {e}"[:200])
    if not times:
        raise RuntimeError(f"every implementation of {type(module).__name__} failed while tuning: {candidates}")
    module.tuned_ms = times
    return min(times, key=times.get)


def derived_weight(module: nn.Module, impl: str, weight: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor],
                   memory_format: torch.memory_format) -> torch.Tensor:
    """`make(weight)` in the weight's dtype and the given layout, made once and kept on the module (remade
    when the weight tensor, its dtype, device or contents change)."""
    key = (weight.data_ptr(), weight.dtype, weight.device, weight._version, memory_format)
    kept = module.derived.get(impl)
    if kept is None or kept[0] != key:
        made = make(weight.float()).to(weight.dtype).contiguous(memory_format=memory_format)
        module.derived[impl] = kept = (key, made)
    return kept[1]


def conv3d_direct(conv: CausalConv3d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.conv3d(x, conv.weight, bias, padding=conv.padding)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B T, C, H, W); a view of a channels-last tensor (then channels-last itself)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _format2d(x: torch.Tensor) -> torch.memory_format:
    """The 2-D layout matching x's (a 5-D or 4-D activation): channels-last where x is."""
    cl = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return torch.channels_last if x.is_contiguous(memory_format=cl) and not x.is_contiguous() \
        else torch.contiguous_format


def conv3d_tap_parts(conv: CausalConv3d, x: torch.Tensor, bias: torch.Tensor | None) -> list[torch.Tensor]:
    """One 2-D convolution per temporal tap over all frames (tap k reads frames k..k + T - 1), unsummed;
    each part (B, C_out, T, H', W'); the bias goes into the first."""
    b, c, t_in, h, w = x.shape
    kt = conv.kernel_size[0]
    t = t_in - kt + 1
    frames = x.permute(0, 2, 1, 3, 4)  # (B, T_in, C, H, W), a view
    parts = []
    for k in range(kt):
        view = frames[:, k:k + t].reshape(b * t, c, h, w)
        y = F.conv2d(view, conv.weight[:, :, k], bias if k == 0 else None, padding=conv.padding[1:])
        parts.append(y.reshape(b, t, -1, y.shape[-2], y.shape[-1]).permute(0, 2, 1, 3, 4))
    return parts


def conv3d_by_taps(conv: CausalConv3d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3-D convolution as one 2-D convolution per temporal tap over all frames, summed: cuDNN's
    2-D kernels can beat its 3-D ones for some shapes."""
    if conv.kernel_size[0] == 1:
        return conv3d_direct(conv, x, bias)
    parts = conv3d_tap_parts(conv, x, bias)
    out = parts[0]
    for part in parts[1:]:
        out = out.add_(part)
    return out


def conv3d_padded(conv: CausalConv3d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """cuDNN's 3-D kernel with the outputs padded to PADDED_CHANNELS by zero weights (its kernels for very few
    output channels are slow), cut back to the real ones (a view)."""
    pad = PADDED_CHANNELS - conv.out_channels
    fmt = torch.channels_last_3d if _format2d(x) == torch.channels_last else torch.contiguous_format
    weight = derived_weight(conv, "pad16", conv.weight, lambda w: F.pad(w, (0, 0, 0, 0, 0, 0, 0, 0, 0, pad)), fmt)
    y = F.conv3d(x, weight, None if bias is None else F.pad(bias, (0, pad)), padding=conv.padding)
    return y[:, :conv.out_channels]


def conv3d_folded(conv: CausalConv3d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The temporal taps folded into the output channels: one 2-D convolution over all input frames with
    kt x C_out outputs (a GEMM kt times wider than a tap's), then one pass that sums each output frame's
    taps (tap k from input frame t + k) and adds the bias (`vae_kernels.sum_taps`)."""
    kt = conv.kernel_size[0]
    if kt == 1:
        return conv3d_direct(conv, x, bias)
    fmt = _format2d(x)
    weight = derived_weight(conv, "folded", conv.weight,
                            lambda w: w.permute(2, 0, 1, 3, 4).reshape(kt * w.shape[0], *w.shape[1:2], *w.shape[3:]),
                            fmt)
    y = F.conv2d(_frames(x), weight, None, padding=conv.padding[1:])
    if fmt == torch.channels_last:
        y = y.contiguous(memory_format=torch.channels_last)  # a no-op unless cuDNN chose another layout
    out_fmt = torch.channels_last_3d if fmt == torch.channels_last else torch.contiguous_format
    return vae_kernels.sum_taps(y, x.shape[0], kt, bias, out_fmt)


def conv3d_by_gather(conv: CausalConv3d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3x3 convolution with very few outputs (cuDNN's kernels fill a GEMM 3 wide poorly): one matmul
    from the input channels to every tap's contribution to each output (27 x 4 columns, a GEMM that wide),
    then one pass that gathers and sums each output position's 27 shifted taps, adding the bias
    (`vae_kernels.gather_taps`). Its output is contiguous (B, C, T, H, W), as the decoder hands it over."""
    b, c, t_in, h, w = x.shape
    cp = vae_kernels.GATHER_CHANNELS
    weight = derived_weight(conv, "gather", conv.weight,  # (27 cp, C_in): row (tap, output channel)
                            lambda wt: F.pad(wt.permute(2, 3, 4, 0, 1), (0, 0, 0, cp - wt.shape[0]))
                            .reshape(vae_kernels.GATHER_TAPS * cp, wt.shape[1]), torch.contiguous_format)
    rows = x.permute(0, 2, 3, 4, 1).reshape(-1, c)  # a view of a channels-last x
    p = F.linear(rows, weight)
    return vae_kernels.gather_taps(p, b, t_in, h, w, conv.out_channels, bias)


def igemm_weight(conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor | None:
    """The weight as the implicit-GEMM kernel reads it (`vae_kernels.pack_igemm_weight`), kept on the module;
    None where x is not on CUDA (the kernel's fallback reads the weight as it is)."""
    if not x.is_cuda:
        return None
    return derived_weight(conv, "igemm", conv.weight, vae_kernels.pack_igemm_weight, torch.contiguous_format)


def conv3d_igemm(conv: CausalConv3d, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3x3x3 convolution as one implicit GEMM over all 27 taps (`vae_kernels.conv3x3x3`): every output
    channel of a position in one program (96 as 64 + 32 wide, where cuDNN pads its GEMM to 128), the bias added
    and the taps summed in float32 before the one store; no partial outputs."""
    b, _, t_in, h, w = x.shape
    fmt = torch.channels_last_3d if _format2d(x) == torch.channels_last else torch.contiguous_format
    out = torch.empty((b, conv.out_channels, t_in - 2, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    return vae_kernels.conv3x3x3(x, conv.weight, bias, out, packed=igemm_weight(conv, x))


CONV_IMPLS.update(conv3d=conv3d_direct, taps=conv3d_by_taps, folded=conv3d_folded, pad16=conv3d_padded,
                  gather=conv3d_by_gather, igemm=conv3d_igemm)


# ---- nearest 2x upsampling + 3x3 convolution -----------------------------------------------------
# Upsampled pixel (2i + a, 2j + b) is input pixel (i, j), so output phase (a, b) of the 3x3 convolution
# over the upsampled image is a 2x2 convolution of the input: along each axis, phase 0 reads rows i - 1
# (weight row 0) and i (rows 1 + 2 summed), phase 1 rows i (rows 0 + 1) and i + 1 (row 2). With padding 1
# a 2x2 convolution's output row i' reads input rows i' - 1 and i', so phase a is its output row i + a.
# All four phases are one 2x2 convolution with 4 C_out outputs: 2.25x fewer FLOPs than the 3x3 over the
# upsampled image, a 4x wider GEMM, and no upsampled copy; a shuffle interleaves the phases.

_PHASE_ROWS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # phase 0: rows (i - 1, i)
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # phase 1: rows (i, i + 1)


def phase_weights(w: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): phase (a, b) in output channels [(2a + b) C_out, ...)."""
    r = _PHASE_ROWS.to(w.device, w.dtype)
    k = torch.einsum("ari,ocij,bsj->abocrs", r, w, r)  # (2, 2, C_out, C_in, 2, 2)
    return k.reshape(4 * w.shape[0], w.shape[1], 2, 2)


def shuffle_phases(y: torch.Tensor, bias: torch.Tensor | None, memory_format: torch.memory_format,
                   relu: bool = False) -> torch.Tensor:
    """y (N, 4 C, h + 1, w + 1), the 2x2 phase convolution -> (N, C, 2h, 2w) (+ bias), then ReLU'd if `relu`
    (without bias in the same pass that interleaves the phases: no pass of its own over the output)."""
    n, c4, h1, w1 = y.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    fused = relu and bias is None and not (torch.is_grad_enabled() and y.requires_grad)  # (out= has no autograd)
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=memory_format)
    phases = y.unflatten(1, (2, 2, c))  # (N, a, b, C, h + 1, w + 1)
    rows = out.unflatten(2, (h, 2)).unflatten(4, (w, 2))  # (N, C, h, a, w, b)
    for a in range(2):
        for b in range(2):
            src, dst = phases[:, a, b, :, a:a + h, b:b + w], rows[:, :, :, a, :, b]
            if bias is None:
                torch.clamp(src, min=0, out=dst) if fused else dst.copy_(src)
            else:
                torch.add(src, bias.to(y.dtype).view(c, 1, 1), out=dst)
    return F.relu(out) if relu and not fused else out


def upsample_conv_direct(rs: "Resample", frames: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fmt = _format2d(frames)
    up = F.interpolate(frames, scale_factor=2.0, mode="nearest-exact").contiguous(memory_format=fmt)
    return F.conv2d(up, rs.resample[1].weight, bias, padding=1)


def upsample_conv_phases(rs: "Resample", frames: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fmt = _format2d(frames)
    weight = derived_weight(rs, "phase", rs.resample[1].weight, phase_weights, fmt)
    y = F.conv2d(frames, weight, None, padding=1)
    return shuffle_phases(y, bias, fmt)


UPSAMPLE_IMPLS: dict[str, Callable[["Resample", torch.Tensor, torch.Tensor | None], torch.Tensor]] = dict(
    upsample=upsample_conv_direct, phase=upsample_conv_phases)


def run_upsample_conv(rs: "Resample", frames: torch.Tensor, defer_bias: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest 2x upsampling + the resampler's 3x3 convolution of (N, C, h, w) frames, by the chosen impl;
    returns (output, the bias still to add)."""
    bias = rs.resample[1].bias

    def call(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if defer_bias and name not in FREE_BIAS:
            return UPSAMPLE_IMPLS[name](rs, frames, None), bias
        return UPSAMPLE_IMPLS[name](rs, frames, bias), None

    pick_impl(rs, list(UPSAMPLE_IMPLS), call, frames.is_cuda)
    return call(rs.impl)


def tunable_modules(decoder: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in decoder.named_modules() if isinstance(m, (CausalConv3d, Resample))]


@torch.no_grad()
def autotune_convs(decoder: "WanVAEDecoder", z: torch.Tensor, impls: set[str] | None = None
                   ) -> dict[str, dict[str, float]]:
    """Choose each causal convolution's and each upsampler's implementation by timing it on the input it
    meets when decoding latents of z's shape (among `impls` only, if given: for measuring what each brings;
    by default all but NOT_TUNED_BY_DEFAULT); returns the timings (ms) per module name. A no-op off CUDA."""
    if not z.is_cuda:
        return {}
    known = set(CONV_IMPLS) | set(UPSAMPLE_IMPLS)
    if impls is not None and not impls <= known:
        raise ValueError(f"unknown implementations {sorted(impls - known)}; known: {sorted(known)}")
    for _, m in tunable_modules(decoder):
        m.__dict__.pop("tuned_ms", None)
    _tuning[0] = set(impls) if impls is not None else known - NOT_TUNED_BY_DEFAULT
    try:
        decoder.decode(z)
    finally:
        _tuning[0] = None
    settle_choices(decoder, z.is_cuda)
    return {name: dict(getattr(m, "tuned_ms", {}), chosen=m.impl) for name, m in tunable_modules(decoder)}


def settle_choices(decoder: nn.Module, cuda: bool) -> None:
    """After choosing: the rearranged weights of implementations not chosen go and, on CUDA, the cached
    blocks the tried implementations left (their outputs, temporaries and cuDNN workspaces) go back to the
    device, so that generation starts without those fragments reserved (they counted against a budget)."""
    for _, m in tunable_modules(decoder):
        m.derived = {k: v for k, v in m.derived.items() if k == m.impl}
    if cuda:
        torch.cuda.empty_cache()


# The static choice (`static_impl`): per-tap 2-D convolutions for the 3x3x3 convolutions at least this wide.
# Tuned on a whole chunk (H200 2026-12-03, results/vae-decode-v2-h200-2026-12-03.json, tap sums deferred),
# taps won 20 of those 28 layers, and the static choices' timings sum to 1.1 ms over the tuned ones' (of
# 175 ms); the narrow ends (conv_in from 16 latent channels, conv_out to RGB) won with cuDNN's 3-D kernel.
STATIC_TAPS_MIN_CHANNELS = 96


def static_impl(module: nn.Module) -> str:
    """The implementation a module runs when the choice must not depend on timing (`use_static_impls_`), from
    its shape alone: "phase" for every upsampler (fastest at every size measured: 2.25x fewer FLOPs, no
    upsampled copy), "taps" for a 3x3x3 convolution with at least STATIC_TAPS_MIN_CHANNELS inputs and outputs,
    "conv3d" otherwise (time_conv's (3, 1, 1), the 1x1x1 ones, the narrow ends)."""
    if isinstance(module, Resample):
        return "phase"
    if not isinstance(module, CausalConv3d):
        raise TypeError(f"not a tunable module: {type(module).__name__}")
    wide = min(module.in_channels, module.out_channels) >= STATIC_TAPS_MIN_CHANNELS
    return "taps" if module.kernel_size == (3, 3, 3) and wide else "conv3d"


@torch.no_grad()
def use_static_impls_(decoder: WanVAEDecoder, z: torch.Tensor | None = None) -> dict[str, dict[str, str]]:
    """Set every tunable module's implementation by `static_impl` (the same choice every run and on every
    device, where `autotune_convs` times them). With z, one decode of z's shape then builds the chosen
    implementations' rearranged weights in the layout the decode meets, as tuning does, and on CUDA the
    cached blocks it left go back. Returns the choices, in `autotune_convs`' form."""
    for _, m in tunable_modules(decoder):
        m.__dict__.pop("tuned_ms", None)
        m.impl = static_impl(m)
    if z is not None:
        decoder.decode(z)
        settle_choices(decoder, z.is_cuda)
    return {name: {"chosen": m.impl} for name, m in tunable_modules(decoder)}


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = RMSNorm(c_in, images=False)
        self.conv1 = CausalConv3d(c_in, c_out, 3, padding=1)
        self.norm2 = RMSNorm(c_out, images=False)
        self.conv2 = CausalConv3d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = CausalConv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])


class Resample(nn.Module):
    """Nearest-exact 2x spatial upsampling + 3x3 conv (halving channels); `upsample3d` also doubles the
    frames with a causal (3, 1, 1) convolution to 2C channels whose halves become even and odd frames."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.impl: str = "upsample"  # or "phase"; see autotune_convs
        self.derived: dict[str, tuple[tuple, torch.Tensor]] = {}
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, upsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(c_in if i == 0 else c_out, c_out)
                                      for i in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(c_out, upsample == "upsample3d")]) if upsample else None


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEDecoderConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            c_in = c_in // 2 if i > 0 else c_in  # the previous block's upsampler halved the channels
            last = i == len(cfg.dim_mult) - 1
            mode = None if last else ("upsample3d" if cfg.temporal_upsample[i] else "upsample2d")
            blocks.append(UpBlock(c_in, c_out, cfg.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], images=False)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)


# ----------------------------------------------------------------------------------------------
# the decoder


class WanVAEDecoder(nn.Module):
    """Raw Wan latents (B, z_dim, T, h, w) -> frames (B, 3, 1 + 4 (T - 1), 8 h, 8 w) in [-1, 1]."""

    def __init__(self, config: WanVAEDecoderConfig | None = None):
        super().__init__()
        self.config = config or WanVAEDecoderConfig()
        self.post_quant_conv = CausalConv3d(self.config.z_dim, self.config.z_dim, 1)
        self.decoder = Decoder(self.config)
        self.channels_last = False
        # what the next fused norm adds on its way in: biases that would cost a pass of their own, and the
        # per-tap convolution's partial sums (switches for measuring what each brings)
        self.defer_biases = True
        self.defer_tap_sums = True
        # which residual-block convolutions run with the norm after them as one kernel (`fuse_conv_norms_`);
        # none until measured on a GPU
        self.fused_convs: frozenset[str] = frozenset()

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_vae(cls, vae: nn.Module) -> "WanVAEDecoder":
        """The decoder of a loaded `AutoencoderKLWan`, sharing its weight tensors (no copy)."""
        model = cls(WanVAEDecoderConfig.from_vae_config(vae.config))
        own = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
        model.load_state_dict(own, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], vae_config: Any) -> "WanVAEDecoder":
        """From a whole VAE state dict (e.g. `vae/diffusion_pytorch_model.safetensors`); encoder keys are ignored."""
        model = cls(WanVAEDecoderConfig.from_vae_config(vae_config))
        own = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
        missing, unexpected = model.load_state_dict(own, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"the VAE weights do not fit a Wan2.1 decoder: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        return model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def channels_last_(self) -> "WanVAEDecoder":
        """Keep weights and activations channels-last (the fast layout for cuDNN on Hopper)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                fmt = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        self.channels_last = True
        return self

    def fuse_conv_norms_(self, convs: tuple[str, ...] = ("conv1", "conv2")) -> list[str]:
        """Run residual-block convolutions and the norm + SiLU that reads them as one implicit-GEMM kernel with
        the norm in its epilogue (`vae_kernels.conv3x3x3`), where the widths fit. "conv1": a block's first
        convolution with its norm2; its output is never written, only the normalised activation, straight into
        conv2's history buffer. "conv2": a block's second convolution + its identity, where the next consumer
        is a norm (the next block's norm1, or norm_out): the kernel writes the block's output (the next
        identity) and the next normalised activation. Those convolutions run "igemm" (their own choice no
        longer applies). `()` turns it off. Returns the convolutions fused."""
        unknown = set(convs) - {"conv1", "conv2"}
        if unknown:
            raise ValueError(f"fuse_conv_norms_: unknown convolutions {sorted(unknown)}; choose from conv1, conv2")
        was, self.fused_convs = self.fused_convs, frozenset(convs)
        fused = []
        for name, m in self.named_modules():
            if not isinstance(m, ResidualBlock):
                continue
            for which in ("conv1", "conv2"):
                conv = getattr(m, which)
                if not conv.fits_igemm:
                    continue
                if which in convs:
                    conv.impl = "igemm"
                    fused.append(f"{name}.{which}")
                elif which in was:  # no longer fused: back to the choice by shape (tuning may choose again)
                    conv.impl = static_impl(conv)
        return fused

    # ---- forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, z: torch.Tensor, state: DecodeState | None = None, clamp: bool = True) -> torch.Tensor:
        return self.decode(z, state, clamp)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, state: DecodeState | None = None, clamp: bool = True) -> torch.Tensor:
        """Decode latent frames. With `state`, the call continues the chunk that `state` has seen (so a
        chunk may be decoded as frame 0, then frames 1.., with the same result as all at once)."""
        state = state if state is not None else DecodeState(keep=False)
        run = _Run(self, state)
        x = run.layout(z.to(self.dtype))
        x = run_conv(self.post_quant_conv, x)
        d = self.decoder
        x = run.causal_conv("conv_in", d.conv_in, run.with_history("conv_in", x), defer=True)
        x = run.residual_block("mid.0", d.mid_block.resnets[0], x, defer=False)  # attention next: no fused norm
        x = run.attention(d.mid_block.attentions[0], x)
        x = run.residual_block("mid.1", d.mid_block.resnets[1], x)
        for i, block in enumerate(d.up_blocks):
            for j, resnet in enumerate(block.resnets):
                into_upsampler = j == len(block.resnets) - 1 and block.upsamplers is not None
                x = run.residual_block(f"up{i}.{j}", resnet, x, defer=not into_upsampler)
            if block.upsamplers is not None:
                x = run.resample(f"up{i}.resample", block.upsamplers[0], x)
        x = run.causal_conv("conv_out", d.conv_out, run.norm_silu_into("conv_out", d.norm_out, x))
        state.started = True
        x = x.contiguous()  # (B, 3, T, H, W) in the usual layout for whoever reads the frames
        return x.clamp_(-1.0, 1.0) if clamp else x


@dataclass
class Pending:
    """The sum of parts + residual + bias, not added yet: the next fused norm adds them on its way in (a pass
    each saved). The parts are one convolution's output, or its unsummed per-tap outputs; or the convolution
    itself, for the norm to run with it."""

    parts: list[torch.Tensor]
    residual: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # a convolution's bias, per channel
    # a convolution not run yet and the history buffer it reads (then parts is empty): see `_Run.pending_conv`
    conv: tuple["CausalConv3d", torch.Tensor] | None = None

    def addends(self) -> list[torch.Tensor]:
        """What the norm adds to parts[0]."""
        return self.parts[1:] + ([self.residual] if self.residual is not None else [])


Activation = torch.Tensor | Pending


class _Run:
    """One decode call: the helpers that thread each causal convolution's history through `state`."""

    def __init__(self, model: WanVAEDecoder, state: DecodeState):
        self.model, self.state = model, state
        self.fmt = torch.channels_last_3d if model.channels_last else torch.contiguous_format
        self.defer, self.partial_sums = model.defer_biases, model.defer_tap_sums

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.fmt)

    def buffer(self, key: str, like: torch.Tensor, channels: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (B, C, HISTORY + T, H, W) buffer whose first frames hold the history of `key`
        (zeros for a chunk's first call), and the view of its T new frames."""
        b, _, _, h, w = like.shape
        buf = torch.empty((b, channels, HISTORY + frames, h, w), dtype=like.dtype, device=like.device,
                          memory_format=self.fmt)
        past = self.state.frames.get(key)
        if past is None:
            buf[:, :, :HISTORY].zero_()
        else:
            buf[:, :, :HISTORY].copy_(past)
        return buf, buf[:, :, HISTORY:]

    def keep_history(self, key: str, buf: torch.Tensor) -> None:
        """Remember the last input frames of `key` only when the chunk may continue in another call."""
        if self.state.keep:
            self.state.frames[key] = buf[:, :, -HISTORY:].clone()

    def with_history(self, key: str, x: torch.Tensor) -> torch.Tensor:
        buf, new = self.buffer(key, x, x.shape[1], x.shape[2])
        new.copy_(x)
        return buf

    def causal_conv(self, key: str, conv: CausalConv3d, buf: torch.Tensor, defer: bool = False) -> Activation:
        """The convolution of a history buffer; with `defer` (its consumer is a fused norm), what would cost
        passes of their own (bias, per-tap sums) comes back pending."""
        self.keep_history(key, buf)
        parts, bias = run_conv_deferred(conv, buf, defer and self.defer, self.partial_sums)
        return parts[0] if len(parts) == 1 and bias is None else Pending(parts, bias=bias)

    def norm_silu_into(self, key: str, norm: RMSNorm, x: Activation, total: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """silu(norm(x)) written into a history buffer for `key`. A pending x is summed on the way in;
        with `total`, that sum is also written there (the next block's identity)."""
        p = x if isinstance(x, Pending) else Pending([x])
        if p.conv is not None:  # the convolution, its bias, the residual and this norm in one kernel
            conv, src = p.conv
            buf, new = self.buffer(key, src, conv.out_channels, src.shape[2] - HISTORY)
            vae_kernels.conv3x3x3(src, conv.weight, conv.bias, new, gain=norm.gain(), scale=norm.scale, silu=True,
                                  residual=p.residual, total=total, packed=igemm_weight(conv, src))
            return buf
        first = p.parts[0]
        buf, new = self.buffer(key, first, first.shape[1], first.shape[2])
        vae_kernels.rms_norm_silu(first, norm.gain(), norm.scale, out=new, residual=p.addends(), total=total,
                                  silu=True, bias=p.bias)
        return buf

    def pending_conv(self, key: str, conv: CausalConv3d, buf: torch.Tensor, residual: torch.Tensor | None = None
                     ) -> Pending:
        """A convolution of a history buffer left for its consumer to run: a fused norm runs it in one kernel
        (`norm_silu_into`), any other consumer as it is (`settle`)."""
        self.keep_history(key, buf)
        return Pending([], residual, conv=(conv, buf))

    def residual_block(self, key: str, blk: ResidualBlock, x: Activation, defer: bool = True) -> Pending:
        """Returns the pending sum (conv2 output, identity[, conv2's bias]) for the next consumer to add;
        `defer` where that consumer is a fused norm (which may then run conv2 itself: `fuse_conv_norms_`)."""
        if isinstance(x, Pending):
            identity = self.empty_output(x)
            buf1 = self.norm_silu_into(f"{key}.conv1", blk.norm1, x, total=identity)
        else:
            identity = x
            buf1 = self.norm_silu_into(f"{key}.conv1", blk.norm1, x)
        h = identity if isinstance(blk.conv_shortcut, nn.Identity) else run_conv(blk.conv_shortcut, identity)
        fused = self.model.fused_convs
        if "conv1" in fused and blk.conv1.fits_igemm:
            buf2 = self.norm_silu_into(f"{key}.conv2", blk.norm2, self.pending_conv(f"{key}.conv1", blk.conv1, buf1))
        else:
            y = self.causal_conv(f"{key}.conv1", blk.conv1, buf1, defer=True)  # norm2 adds what conv1 leaves
            buf2 = self.norm_silu_into(f"{key}.conv2", blk.norm2, y)
        if defer and "conv2" in fused and blk.conv2.fits_igemm:  # the next norm runs conv2 in its kernel
            return self.pending_conv(f"{key}.conv2", blk.conv2, buf2, residual=h)
        y = self.causal_conv(f"{key}.conv2", blk.conv2, buf2, defer=defer)
        return Pending([y], h) if isinstance(y, torch.Tensor) else Pending(y.parts, h, y.bias)

    def empty_output(self, p: Pending) -> torch.Tensor:
        """An uninitialised tensor of the pending sum's shape, dtype and layout."""
        if p.conv is None:
            return torch.empty_like(p.parts[0], memory_format=self.fmt)
        conv, src = p.conv
        b, _, t_in, h, w = src.shape
        return torch.empty((b, conv.out_channels, t_in - HISTORY, h, w), dtype=src.dtype, device=src.device,
                           memory_format=self.fmt)

    def settle(self, x: Activation) -> torch.Tensor:
        """A pending sum made into a tensor (where the next consumer is no fused norm)."""
        if not isinstance(x, Pending):
            return x
        if x.conv is not None:
            conv, src = x.conv
            out = run_conv(conv, src)
            return out if x.residual is None else out.add_(x.residual)
        out = x.parts[0]
        for a in x.addends():
            out = out.add_(a)
        if x.bias is not None:
            out = out.add_(x.bias.view(-1, 1, 1, 1))
        return out

    def attention(self, blk: AttentionBlock, x: Activation) -> torch.Tensor:
        x = self.settle(x)
        b, c, t, h, w = x.shape
        frames = _frames(x)
        normed = torch.empty_like(frames)
        vae_kernels.rms_norm_silu(frames, blk.norm.gain(), blk.norm.scale, out=normed, silu=False)
        qkv = blk.to_qkv(normed).flatten(2).transpose(1, 2)  # (BT, HW, 3C)
        q, k, v = qkv[:, None].chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (BT, HW, C)
        o = o.transpose(1, 2).reshape(b * t, c, h, w)
        o = blk.proj(o.contiguous(memory_format=torch.channels_last if self.model.channels_last else
                                  torch.contiguous_format))
        return o.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4).add_(x)

    def resample(self, key: str, rs: Resample, x: Activation) -> Activation:
        """(Temporal doubling, then) nearest 2x upsampling + 3x3 convolution; its bias may come back pending
        (the next block's first norm adds it)."""
        x = self.settle(x)
        if rs.temporal:
            x = self.double_frames(key, rs, x)
        b, c, t, h, w = x.shape
        y, bias = run_upsample_conv(rs, _frames(x), defer_bias=self.defer)
        y = y.reshape(b, t, y.shape[1], 2 * h, 2 * w).permute(0, 2, 1, 3, 4)
        return y if bias is None else Pending([y], bias=bias)

    def double_frames(self, key: str, rs: Resample, x: torch.Tensor) -> torch.Tensor:
        """Each latent frame after the chunk's first becomes two (the first stays one)."""
        first = None
        if not self.state.started:
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2] > 0:
            b, c, t, h, w = x.shape
            y = self.causal_conv(f"{key}.time_conv", rs.time_conv, self.with_history(f"{key}.time_conv", x))
            # (B, 2C, T, H, W): channel half 0 is frame 2i, half 1 frame 2i+1
            y = torch.stack((y[:, :c], y[:, c:]), dim=3).reshape(b, c, 2 * t, h, w)
            x = y.contiguous(memory_format=self.fmt)
        if first is None:
            return x
        return torch.cat([first, x], dim=2).contiguous(memory_format=self.fmt) if x.shape[2] else first
