"""Scaled dot-product attention through the fastest backend the device has.

On Hopper, PyTorch's cuDNN attention ran at about 580 TFLOP/s against 290-360 for its
FlashAttention-2 backend at Helios' sequence lengths, so it comes first where it exists.
Layout in and out: (B, L, H, D).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - old torch
    SDPBackend = None
    sdpa_kernel = None

_BACKEND_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}
_preferred: list[str] = ["cudnn", "flash", "efficient", "math"]


def set_attention_backends(names: list[str]) -> None:
    """Choose the SDPA backends to try on CUDA, in order of preference (e.g. ["flash", "math"])."""
    unknown = [n for n in names if n not in _BACKEND_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown attention backend(s) {unknown}; choose from {list(_BACKEND_NAMES)}")
    _preferred[:] = names


def _backend_context(device: torch.device):
    if device.type != "cuda" or sdpa_kernel is None:
        return contextlib.nullcontext()
    backends = [getattr(SDPBackend, _BACKEND_NAMES[n]) for n in _preferred if hasattr(SDPBackend, _BACKEND_NAMES[n])]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without set_priority: the set is still restricted, order is torch's own
        return sdpa_kernel(backends)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) attention. q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D)."""
    with _backend_context(q.device):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# attention with its log-sum-exp, for merging partial results (ring attention)

_lse_unsupported: set[tuple[str, str, torch.dtype]] = set()  # (backend, device type, dtype) that raised


def _lse_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    aten = torch.ops.aten
    if name == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    if name == "cudnn":
        return aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    if name == "flash":
        return aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    if name == "efficient":
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    raise ValueError(name)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention`, plus the log-sum-exp of each query's scores: (B, Lq, H, D) and (B, Lq, H) float32.

    Partial results over disjoint key sets merge exactly with these (see `merge_partial`). Uses the
    fused kernels' own LSE output where one runs, else the explicit softmax (fine for small inputs).
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    lq = q.shape[1]
    names = ["cpu"] if q.device.type == "cpu" else [n for n in _preferred if n != "math"] if q.device.type == "cuda" else []
    for name in names:
        key = (name, q.device.type, q.dtype)
        # cuDNN's kernel returned NaN (no error) for float32 on an H100: only half precision goes there.
        if key in _lse_unsupported or (name in ("cudnn", "flash") and q.dtype not in (torch.float16, torch.bfloat16)):
            continue
        try:
            out, lse = _lse_kernel(name, qt, kt, vt)
        except (RuntimeError, NotImplementedError):  # this kernel does not take these inputs: try the next
            _lse_unsupported.add(key)
            continue
        # Some kernels pad the LSE along the queries or add a trailing unit dimension.
        lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :lq].float()
        return out.transpose(1, 2), lse.transpose(1, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v.float()).to(q.dtype)
    return out, lse.transpose(1, 2)


def merge_partial(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets: softmax weights rescaled by exp(lse_i - lse).

    out/out_b: (B, L, H, D) (the result is float32), lse/lse_b: (B, L, H) float32.
    """
    new = torch.logaddexp(lse, lse_b)
    merged = out.float() * torch.exp(lse - new)[..., None] + out_b.float() * torch.exp(lse_b - new)[..., None]
    return merged, new
