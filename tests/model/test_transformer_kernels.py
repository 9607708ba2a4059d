"""The transformer's fused ops (helios.model.transformer_kernels) against the plain path, on the CPU.

The Triton kernel itself runs here under Triton's interpreter when Triton is installed (a subprocess: the
interpreter is chosen when the kernel is defined); its CUDA run is in tests/gpu/test_transformer_kernels_gpu.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helios.model.transformer import gated_add, modulate
from helios.model.transformer_kernels import linear_gelu, qk_norm_rope_reference, rope_attention
from helpers_reference import generator_for, random_inputs, relative_error, tiny_transformer


def tiny_model(seed: int, **config):
    return tiny_transformer(seed, varied_norms=True, **config)


@pytest.mark.parametrize("amplify", [False, True])
def test_fused_ops_equal_the_plain_block_in_float32(request, amplify):
    model = tiny_model(4, is_amplify_history=amplify)
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    with torch.no_grad():
        model.fuse_projections_(kernels=False)
        plain = model(**kw).sample
        model.fuse_projections_(kernels=True)
        fused = model(**kw).sample
    assert model.blocks[0].attn1.fused_kernels and model.blocks[0].ffn.fused_gelu
    assert relative_error(fused, plain) < 1e-6


def test_qk_norm_rope_reference_is_the_model_computation(request):
    """Against the block's own pieces: nn.RMSNorm across heads, apply_rope, the history key gain."""
    from helios.model.rope import apply_rope

    g = generator_for(request.node.name)
    model = tiny_model(5, is_amplify_history=True)
    attn = model.blocks[0].attn1
    b, length, nh = 2, 11, 4
    d = attn.to_q.out_features
    qkv = torch.randn(b, length, 3 * d, generator=g)
    half = d // attn.heads // 2
    cos, sin = torch.randn(b, length, half, generator=g), torch.randn(b, length, half, generator=g)
    q_lin, k_lin, _ = qkv.chunk(3, dim=-1)
    with torch.no_grad():
        q = apply_rope(attn.heads_of(attn.norm_q(q_lin)), cos, sin)
        k = apply_rope(attn.heads_of(attn.norm_k(k_lin)), cos, sin)
        gain = attn.history_gain()
        k = torch.cat([k[:, :nh] * gain.view(1, 1, -1, 1), k[:, nh:]], dim=1)
        fq, fk = qk_norm_rope_reference(qkv, attn.norm_q.weight, attn.norm_k.weight, cos, sin, attn.norm_q.eps,
                                        attn.heads, nh, gain)
    assert relative_error(fq, q) < 1e-6 and relative_error(fk, k) < 1e-6


def test_rope_attention_op_traces_under_compile(request):
    """The custom op's fake implementation gives torch.compile the right output shape."""
    pytest.importorskip("torch._inductor")
    g = generator_for(request.node.name)
    qkv = torch.randn(1, 6, 3 * 32, generator=g)
    w = torch.ones(32)
    cos, sin = torch.ones(1, 6, 8), torch.zeros(1, 6, 8)
    eager = rope_attention(qkv, w, w, cos, sin, 1e-6, 2, 0, None)
    compiled = torch.compile(lambda t: rope_attention(t, w, w, cos, sin, 1e-6, 2, 0, None), backend="eager")(qkv)
    assert eager.shape == (1, 6, 32) and torch.equal(compiled, eager)


def test_linear_gelu_is_the_tanh_gelu_of_the_linear(request):
    g = generator_for(request.node.name)
    x, w, b = torch.randn(5, 7, 16, generator=g) * 3, torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    out = linear_gelu(x, w, b)
    ref = torch.nn.functional.gelu(x @ w.t() + b, approximate="tanh")
    assert out.shape == (5, 7, 24) and relative_error(out, ref) < 1e-6
    assert relative_error(out, torch.nn.functional.gelu(x @ w.t() + b)) > 1e-5  # the tanh form, not erf's


def test_per_token_forms_used_when_compiling_equal_the_segment_forms(request, monkeypatch):
    g = generator_for(request.node.name)
    x, u = torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    shift, scale, gate = (torch.randn(2, 2, 8, generator=g) for _ in range(3))
    for nh in (0, 4):
        segments = modulate(x, shift, scale, nh), gated_add(x, u, gate, nh)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        per_token = modulate(x, shift, scale, nh), gated_add(x, u, gate, nh)
        monkeypatch.undo()
        for a, b in zip(segments, per_token):
            assert torch.equal(a, b)


def test_block_in_its_compiling_form_equals_eager(request, monkeypatch):
    """The whole model with the compile-time forms (per-token modulation, padded cross-attention update)."""
    model = tiny_model(6)
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    with torch.no_grad():
        plain = model(**kw).sample
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        compiling_form = model(**kw).sample
    assert relative_error(compiling_form, plain) < 1e-6


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
def test_qk_norm_rope_kernel_under_the_triton_interpreter():
    script = textwrap.dedent("""
        import torch
        from helios.model import transformer_kernels as tk
        torch.manual_seed(0)
        for b, length, heads, hd, nh in ((2, 7, 3, 8, 3), (1, 5, 4, 16, 0)):
            d = heads * hd
            qkv = torch.randn(b, length, 3 * d)
            wq, wk = torch.randn(d), torch.randn(d)
            cos, sin = torch.randn(b, length, hd // 2), torch.randn(b, length, hd // 2)
            gain = torch.rand(heads) + 0.5 if nh else None
            ref = tk.qk_norm_rope_reference(qkv, wq, wk, cos, sin, 1e-6, heads, nh, gain)
            out = tk._qk_norm_rope_triton(qkv, wq, wk, cos, sin, 1e-6, heads, nh, gain)
            for r, o in zip(ref, out):
                err = ((r - o).norm() / r.norm()).item()
                assert err < 1e-6, err
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_fp8_bound_bounds_the_normalised_rotated_rows(request):
    from helios.model.transformer_kernels import fp8_bound

    g = generator_for(request.node.name)
    b, length, heads, hd = 1, 64, 4, 8
    d = heads * hd
    qkv = torch.randn(b, length, 3 * d, generator=g)
    qkv[0, 3, :d] = 0.0
    qkv[0, 3, 5] = 100.0  # a row whose whole norm sits in one channel: the bound is reached there
    w = torch.randn(d, generator=g)
    angles = torch.rand(b, length, hd // 2, generator=g) * 6.3
    gain = torch.rand(heads, generator=g) + 1.0
    q, k = qk_norm_rope_reference(qkv, w, w, angles.cos(), angles.sin(), 0.0, heads, 10, gain)
    assert q.abs().max() <= fp8_bound(w, d) * (1 + 1e-5)
    assert k.abs().max() <= fp8_bound(w, d, gain) * (1 + 1e-5)
    assert q.abs().max() > 0.1 * fp8_bound(w, d)  # and not loose by orders of magnitude on that row


def test_fp8_rope_attention_is_quantised_and_close(request):
    from helios.model.transformer_kernels import rope_attention_fp8

    g = generator_for(request.node.name)
    b, length, heads, hd = 1, 40, 2, 16
    d = heads * hd
    qkv = torch.randn(b, length, 3 * d, generator=g)
    w = torch.rand(d, generator=g) + 0.5
    angles = torch.rand(b, length, hd // 2, generator=g) * 6.3
    args = (qkv, w, w, angles.cos(), angles.sin(), 1e-6, heads, 8, None)
    exact = rope_attention(*args).reshape(length, d)
    values, scales = rope_attention_fp8(*args, 16)
    assert values.dtype == torch.float8_e4m3fn and values.shape == (48, d) and scales.shape == (48, 1)
    assert not values[length:].float().any()
    assert 1e-3 < relative_error(values[:length].float() * scales[:length], exact) < 0.1


def test_fp8_attention_in_the_model(request):
    from helios.model.fp8 import quantize_blocks_

    model = tiny_model(7)
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    with torch.no_grad():
        plain = model(**kw).sample
        with pytest.raises(ValueError, match="fuse_projections_"):
            quantize_blocks_(tiny_model(7), attention=True)
        model.fuse_projections_()
        quantize_blocks_(model, attention=True)
        quant = model(**kw).sample
    assert all(blk.attn1.fp8_attention for blk in model.blocks)
    assert relative_error(quant, plain) < 0.15


def test_fp8_feed_forward_with_fused_gelu_quantisation_equals_the_plain_fp8_one(request):
    from helios.model.fp8 import quantize_blocks_

    model = tiny_model(8)
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    with torch.no_grad():
        model.fuse_projections_(kernels=False)
        quantize_blocks_(model, attention=False)
        plain = model(**kw).sample
        for blk in model.blocks:
            blk.ffn.fused_gelu = True
        fused = model(**kw).sample
    assert relative_error(fused, plain) < 1e-5


def test_gelu_quantize_rows_pads_to_the_row_multiple(request):
    from helios.model.transformer_kernels import gelu_quantize_rows

    h = torch.randn(21, 40, generator=generator_for(request.node.name))
    values, scales = gelu_quantize_rows(h, 16)
    assert values.shape == (32, 40) and scales.shape == (32, 1)
    assert not values[21:].float().any()
    y = torch.nn.functional.gelu(h, approximate="tanh")
    assert relative_error(values[:21].float() * scales[:21], y) < 0.04


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
@pytest.mark.parametrize("scaled", [False, True])
def test_kernels_compile_for_hopper_without_a_gpu(scaled):
    """Triton builds the kernels for sm_90 here (its bundled ptxas), at the 14B widths: a kernel that does not
    compile fails on the CPU, not first on the GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from helios.model import transformer_kernels as tk

    hopper = GPUTarget("cuda", 90, 32)
    out = "*fp8e4nv" if scaled else "*bf16"
    signature = {"qkv_ptr": "*bf16", "wq_ptr": "*bf16", "wk_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                 "gain_ptr": "*fp32", "sq_ptr": "*fp32", "sk_ptr": "*fp32", "sv_ptr": "*fp32", "q_ptr": out,
                 "k_ptr": out, "v_ptr": out, "L": "i32", "num_history": "i32", "qkv_bs": "i64", "qkv_ls": "i64",
                 "cos_bs": "i32", "cos_ls": "i32", "eps": "fp32", "D": "constexpr", "HALF_HEAD": "constexpr",
                 "HAS_GAIN": "constexpr", "SCALED": "constexpr", "BLOCK": "constexpr"}
    consts = {"D": 5120, "HALF_HEAD": 64, "HAS_GAIN": True, "SCALED": scaled, "BLOCK": 8192}
    built = triton.compile(ASTSource(fn=tk._qk_norm_rope_kernel, signature=signature, constexprs=consts),
                           target=hopper, options={"num_warps": 8})
    assert "cubin" in built.asm
    if scaled:
        signature = {"h_ptr": "*bf16", "v_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "h_rs": "i64",
                     "K": "constexpr", "BLOCK": "constexpr", "FP8_LIMIT": "constexpr"}
        consts = {"K": 13824, "BLOCK": 16384, "FP8_LIMIT": 448.0}
        built = triton.compile(ASTSource(fn=tk._gelu_quantize_kernel, signature=signature, constexprs=consts),
                               target=hopper, options={"num_warps": 16})
        assert "cubin" in built.asm


@pytest.mark.parametrize("path", ["plain", "fused", "fp8"])
def test_last_block_computing_only_the_noisy_tokens_changes_nothing(request, path):
    """The last block attends from the noisy tokens only and drops the history's final states: the same output
    as a last block that computes every token (the head reads the noisy ones alone)."""
    from helios.model.fp8 import quantize_blocks_

    model = tiny_model(9)
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    assert kw.get("latents_history_short") is not None
    with torch.no_grad():
        if path != "plain":
            model.fuse_projections_()
        if path == "fp8":
            quantize_blocks_(model, attention=True)
        lean = model(**kw).sample
        model.last_block_noisy_only = False
        full = model(**kw).sample
    assert relative_error(lean, full) < 1e-6
