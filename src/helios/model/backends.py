"""Which kernels a GPU generation gets: attention backends and FP8 matmuls, by compute capability.

- Hopper (sm90): FlashAttention-4's forward where `flash-attn-4` is installed (the `fa4` extra; 646 against
  617 TFLOP/s for cuDNN at stage 2's 11040 tokens, 686 against 604 for the last block's 8640 queries, -27 ms
  per 1/1/1 chunk of the 14B model on an H100), then cuDNN's attention (about 580 TFLOP/s against 290-360
  for FlashAttention-2 at Helios' sequence lengths), FlashAttention-2, memory-efficient, math.
  HELIOS_NO_FA4=1 in the environment leaves FlashAttention-4 out.
- Ampere and Ada (sm80-sm89) and Blackwell (sm100+): FlashAttention-2, then the memory-efficient kernel
  (cuDNN's fused attention is tuned for Hopper; elsewhere PyTorch's flash kernel is the safer first choice).
- Older cards (sm75 and below): the memory-efficient kernel, then math (FlashAttention-2 needs sm80).
- FP8 matmuls (`torch._scaled_mm`, row-wise scales) need sm89 or newer; below that the weights stay bf16.
"""

from __future__ import annotations

import logging
import os

import torch

from helios.model.attention import FA4, fa4_available, set_attention_backends

log = logging.getLogger("helios")

Capability = tuple[int, int]
_forced: Capability | None = None


def force_capability(capability: Capability | None) -> None:
    """Plan and pick kernels as if the GPU had this compute capability (None: its own). For trying the
    Ampere/Ada paths on a newer card; a capability above the card's would pick kernels it lacks."""
    global _forced
    _forced = tuple(capability) if capability is not None else None


def device_capability(device: torch.device | str) -> Capability | None:
    """The forced capability, else the CUDA device's own; None without either."""
    if _forced is not None:
        return _forced
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def fa4_wanted() -> bool:
    """FlashAttention-4 is installed and not turned off (HELIOS_NO_FA4=1)."""
    return os.environ.get("HELIOS_NO_FA4", "") in ("", "0") and fa4_available() is None


def attention_backends_for(capability: Capability, fa4: bool | None = None) -> list[str]:
    """Attention backends to try, in order, on a GPU of this compute capability.

    fa4: put FlashAttention-4 first on Hopper (default: where it is installed and not turned off); it was
    measured on Hopper only, so other generations keep their SDPA order."""
    if capability[0] == 9:
        fa4 = fa4_wanted() if fa4 is None else fa4
        return [FA4] * fa4 + ["cudnn", "flash", "efficient", "math"]
    if capability >= (8, 0):
        return ["flash", "efficient", "math"]
    return ["efficient", "math"]


def fp8_matmul_supported(capability: Capability) -> bool:
    """FP8 tensor-core matmuls exist from Ada (sm89) on."""
    return tuple(capability) >= (8, 9)


def weight_dtype_for(capability: Capability, fp8_requested: bool) -> str:
    """'fp8' where it was asked for and runs, else 'bf16'."""
    return "fp8" if fp8_requested and fp8_matmul_supported(capability) else "bf16"


def configure_device(device: torch.device | str, capability: Capability | None = None,
                     fa4: bool | None = None) -> dict:
    """Set the attention backends for `device` (a CUDA device; others are left alone) and say what was chosen.

    capability: force one (tests, and trying a fallback path on a newer card); default: the device's own.
    fa4: as in `attention_backends_for` (False: cuDNN first on Hopper even where FlashAttention-4 is installed).
    """
    device = torch.device(device)
    if device.type != "cuda" and capability is None:
        return {}
    cap = tuple(capability or device_capability(device) or (0, 0))
    backends = attention_backends_for(cap, fa4=fa4)
    set_attention_backends(backends)
    chosen = {"capability": f"sm{cap[0]}{cap[1]}", "attention": backends, "fp8_matmul": fp8_matmul_supported(cap)}
    log.info("kernels for %s: attention %s, FP8 matmuls %s", chosen["capability"], " > ".join(backends),
             "yes" if chosen["fp8_matmul"] else "no (bf16)")
    return chosen
