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
def test_selection_by_capability(restore, monkeypatch, cap, first, has_cudnn, has_flash, fp8):
    monkeypatch.setenv("HELIOS_NO_FA4", "1")  # the SDPA order alone (FlashAttention-4: the next test)
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


def test_fa4_refused_with_the_install_line_when_missing(restore, monkeypatch):
    monkeypatch.setattr(attention, "fa4_available", lambda: "ModuleNotFoundError: No module named 'flash_attn'")
    with pytest.raises(RuntimeError, match="pip install flash-attn-4"):
        attention.set_attention_backends(["fa4", "cudnn"])
    with pytest.raises(ValueError, match="no SDPA backend to fall back on"):
        attention.set_attention_backends(["fa4"])


def test_fa4_goes_through_one_custom_op_that_compiles_without_a_break(restore, monkeypatch):
    """The plumbing of the fa4 backend on the CPU: FlashAttention-4 stands in as SDPA (its own kernel needs a
    Hopper GPU; tests/gpu checks it against cuDNN). A compiled caller keeps the op in one graph."""
    import sys
    import types

    import torch

    calls = []

    def flash_attn_func(q, k, v):
        calls.append(q.shape)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous(), None

    interface = types.ModuleType("flash_attn.cute.interface")
    interface.flash_attn_func = flash_attn_func
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", types.ModuleType("flash_attn.cute")),
                      ("flash_attn.cute.interface", interface)):
        monkeypatch.setitem(sys.modules, name, mod)
    attention.set_attention_backends(["fa4", "cudnn", "flash", "efficient", "math"])
    monkeypatch.setattr(attention, "_fa4_device", lambda q: True)  # the CPU stands in for the GPU
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g, dtype=torch.bfloat16) for n in (6, 9, 9))
    eager = attention.attention(q, k, v)
    assert len(calls) == 1
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.equal(eager, want.transpose(1, 2))
    compiled = torch.compile(lambda q, k, v: attention.attention(q, k, v) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), eager * 2)
    n = len(calls)
    assert n >= 2
    attention.set_attention_backends(["cudnn", "flash", "efficient", "math"])
    attention.attention(q, k, v)
    assert len(calls) == n  # the SDPA order leaves fa4 alone


def test_fa4_comes_first_on_hopper_only_where_installed_and_not_turned_off(restore, monkeypatch):
    monkeypatch.setattr(attention, "fa4_available", lambda: None)  # as if installed
    import helios.model.backends as backends

    monkeypatch.setattr(backends, "fa4_available", lambda: None)
    monkeypatch.delenv("HELIOS_NO_FA4", raising=False)
    assert attention_backends_for((9, 0))[:2] == ["fa4", "cudnn"]
    assert "fa4" not in attention_backends_for((8, 0)) and "fa4" not in attention_backends_for((10, 0))
    configure_device("cuda", capability=(9, 0))
    assert attention._preferred[0] == "fa4"
    configure_device("cuda", capability=(9, 0), fa4=False)  # bench_e2e's -no-fa4 configs
    assert attention._preferred[0] == "cudnn"
    monkeypatch.setenv("HELIOS_NO_FA4", "1")
    assert attention_backends_for((9, 0))[0] == "cudnn"
    monkeypatch.setattr(backends, "fa4_available", lambda: "ModuleNotFoundError: No module named 'flash_attn'")
    monkeypatch.delenv("HELIOS_NO_FA4")
    assert attention_backends_for((9, 0))[0] == "cudnn"
