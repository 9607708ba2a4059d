"""Each fast path computes what the plain path computes (CPU; the CUDA versions are in tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from helios.model.fp8 import Fp8Linear, quantize_blocks_
from helpers_reference import generator_for, random_inputs, relative_error, tiny_transformer


def tiny_model(seed: int):
    return tiny_transformer(seed)


def test_fused_qkv_equals_separate_projections(request):
    model = tiny_model(1)
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    with torch.no_grad():
        plain = model(**kw).sample
        model.fuse_projections_()
        fused = model(**kw).sample
    assert not hasattr(model.blocks[0].attn1, "to_q") and hasattr(model.blocks[0].attn1, "to_qkv")
    assert relative_error(fused, plain) < 1e-6


def test_fp8_linear_is_close_to_the_float_linear(request):
    g = generator_for(request.node.name)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
    x = torch.randn(37, 64, generator=g)
    q = Fp8Linear(lin)
    assert q.weight_fp8.dtype == torch.float8_e4m3fn
    err = relative_error(q(x), lin(x).detach())
    assert 1e-4 < err < 0.05  # quantised (not a copy of the float path), within e4m3 precision


def test_fp8_model_stays_close_to_float(request):
    model = tiny_model(2)
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    with torch.no_grad():
        plain = model(**kw).sample
        n = quantize_blocks_(model)
        quant = model(**kw).sample
    assert n == 2 * 10  # per block: q, k, v, out of both attentions, and the two FFN projections
    assert relative_error(quant, plain) < 0.1


def test_compiled_block_equals_eager_on_cpu(request):
    pytest.importorskip("torch._inductor")
    model = tiny_model(3)
    kw = random_inputs(generator_for(request.node.name), text_dim=24, terms=("short",))
    with torch.no_grad():
        plain = model(**kw).sample
        model.compile_blocks_()
        try:
            compiled = model(**kw).sample
        except Exception as e:  # no working C++ toolchain for inductor here
            pytest.skip(f"torch.compile does not run on this machine: {type(e).__name__}: {e}")
    assert relative_error(compiled, plain) < 1e-5
