"""Kernel choice by compute capability (helios.model.backends), checked by forcing the capability on the CPU."""

from __future__ import annotations

import pytest

from helios.engine.memory import ModelSizes, plan_for
from helios.model import attention
from helios.model.backends import (attention_backends_for, configure_device, device_capability, force_capability,
                                   fp8_matmul_supported, weight_dtype_for)


@pytest.fixture
def restore():
    saved = list(attention._preferred)
    yield
    attention.set_attention_backends(saved)
    force_capability(None)


@pytest.mark.parametrize("cap, first, has_cudnn, has_flash, fp8", [
    ((9, 0), "cudnn", True, True, True),    # H100/H200: cuDNN's Hopper kernels first
    ((8, 9), "flash", False, True, True),   # RTX 4090: FlashAttention-2, FP8 matmuls
    ((8, 6), "flash", False, True, False),  # RTX 3090: FlashAttention-2, bf16
    ((8, 0), "flash", False, True, False),  # A100
    ((10, 0), "flash", False, True, True),  # Blackwell: no Hopper kernels
    ((7, 5), "efficient", False, False, False),  # Turing: no FlashAttention-2
])
def test_selection_by_capability(restore, cap, first, has_cudnn, has_flash, fp8):
    backends = attention_backends_for(cap)
    assert backends[0] == first and backends[-1] == "math"
    assert ("cudnn" in backends) == has_cudnn and ("flash" in backends) == has_flash
    assert fp8_matmul_supported(cap) == fp8
    assert weight_dtype_for(cap, fp8_requested=True) == ("fp8" if fp8 else "bf16")
    assert weight_dtype_for(cap, fp8_requested=False) == "bf16"
    chosen = configure_device("cuda", capability=cap)  # sets the attention module's order
    assert attention._preferred == backends and chosen["fp8_matmul"] == fp8


def test_a_forced_capability_steers_the_memory_plan(restore):
    force_capability((8, 6))
    assert device_capability("cuda") == (8, 6)
    plan, _, _ = plan_for("24gb", None, 384, 640, device="cuda", sizes=ModelSizes.helios_14b())
    assert not plan.fp8 and plan.stream_blocks  # bf16 blocks do not fit 24 GB resident
    force_capability((8, 9))
    plan, _, _ = plan_for("24gb", None, 384, 640, device="cuda", sizes=ModelSizes.helios_14b())
    assert plan.fp8 and not plan.stream_blocks
