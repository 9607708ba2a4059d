"""Opt-in FP8 matmuls for the transformer blocks (Hopper: about 1380 TFLOP/s against 750 for bf16).

Weights are stored as float8 e4m3 with one scale per output channel; activations are quantised on
the fly with one scale per token. On CUDA the product runs in `torch._scaled_mm` (FP8 tensor cores,
bf16 out); elsewhere the same quantised numbers are multiplied in float32, so CPU tests check the
quantisation itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from helios.model.attention import FP8, FP8_MAX, cudnn_frontend_available

ROW_MULTIPLE = 16  # FP8 tensor-core matmuls need row counts in multiples of 16: CUDA inputs are padded to it


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> float8 values and (M, 1) float32 scales, so that x ~= values * scales."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        values, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", values)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, N)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m = x2.shape[0]
        if x.is_cuda:
            pad = (-m) % ROW_MULTIPLE
            if pad:
                x2 = F.pad(x2, (0, 0, 0, pad))
        xq, xs = quantize_rows(x2)
        return self.forward_quantized(xq, xs, m, shape[:-1], x.dtype)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor, m: int, lead: tuple[int, ...],
                          dtype: torch.dtype) -> torch.Tensor:
        """The product from already quantised rows: xq (M', K) e4m3 and xs (M', 1), of which the first m are
        the tokens (on CUDA M' is a multiple of ROW_MULTIPLE); returns (*lead, N) in `dtype`."""
        if xq.is_cuda:
            out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                                   bias=None if self.bias is None else self.bias.to(dtype), out_dtype=dtype)
        else:
            w = self.weight_fp8.float() * self.weight_scale.t()
            out = (xq.float() * xs) @ w.t()
            if self.bias is not None:
                out = out + self.bias.float()
            out = out.to(dtype)
        out = out[:m] if out.shape[0] != m else out
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


def fp8_attention_runs_on(device: torch.device | str) -> bool:
    """Whether cuDNN's FP8 self-attention runs for blocks computing on `device` (CUDA with `nvidia-cudnn-frontend`)."""
    return torch.device(device).type == "cuda" and cudnn_frontend_available() is None


def quantize_blocks_(model: nn.Module, attention: bool | None = None,
                     device: torch.device | str | None = None) -> int:
    """Swap every nn.Linear inside `model.blocks` for an Fp8Linear; returns how many were swapped.

    attention: also run the self-attention in e4m3 (cuDNN's FP8 attention; needs the fused q/k/v projection
    with its kernels, `fuse_projections_()`, first). None: where it runs (`fp8_attention_runs_on`) on `device`,
    the device the blocks will compute on (default: where the model is now; a loader quantising on the meta
    device names the device it loads onto).
    """
    count = 0
    for blk in model.blocks:
        for name, module in list(blk.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, Fp8Linear(child))
                    count += 1
    if attention is None:
        attention = fp8_attention_runs_on(device if device is not None else model.device)
    for blk in model.blocks:
        if attention and not blk.attn1.fused_kernels:
            raise ValueError("FP8 attention runs inside the fused q/k/v op: call fuse_projections_() first")
        blk.attn1.fp8_attention = bool(attention)
    return count
