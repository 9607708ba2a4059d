"""The transformer's fused ops on CUDA against float32 references (run on a GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("nh", [0, 300])
def test_qk_norm_rope_kernel_is_within_bf16_rounding(nh):
    from helios.model import transformer_kernels as tk

    g = torch.Generator(device="cuda").manual_seed(0)
    b, length, heads, hd = 2, 700, 40, 128
    d = heads * hd
    qkv = torch.randn(b, length, 3 * d, device="cuda", generator=g, dtype=torch.bfloat16)
    wq, wk = ((1 + 0.3 * torch.randn(d, device="cuda", generator=g)).bfloat16() for _ in range(2))
    angles = torch.rand(b, length, hd // 2, device="cuda", generator=g) * 6.3
    cos, sin = angles.cos(), angles.sin()
    gain = 1 + torch.rand(heads, device="cuda", generator=g) * 3 if nh else None
    ref = tk.qk_norm_rope_reference(qkv.float(), wq, wk, cos, sin, 1e-6, heads, nh, gain)
    fused = tk.qk_norm_rope(qkv, wq, wk, cos, sin, 1e-6, heads, nh, gain)
    plain = tk.qk_norm_rope_reference(qkv, wq, wk, cos, sin, 1e-6, heads, nh, gain)  # one bf16 rounding
    for f, p, r in zip(fused, plain, ref):
        assert rel(f, r) <= 1.05 * rel(p, r) + 1e-4


def test_qk_norm_rope_kernel_fp8_out_is_the_rounded_reference():
    from helios.model import transformer_kernels as tk

    g = torch.Generator(device="cuda").manual_seed(3)
    b, length, heads, hd = 1, 500, 40, 128
    d = heads * hd
    qkv = torch.randn(b, length, 3 * d, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (1 + 0.3 * torch.randn(d, device="cuda", generator=g)).bfloat16()
    angles = torch.rand(b, length, hd // 2, device="cuda", generator=g) * 6.3
    v = qkv[..., 2 * d:].float().unflatten(-1, (heads, -1))
    scales = (448 / tk.fp8_bound(w, d), 448 / tk.fp8_bound(w, d), 448 / v.abs().amax())
    ref = tk.qk_norm_rope_reference(qkv.float(), w, w, angles.cos(), angles.sin(), 1e-6, heads, 0, None) + (v,)
    out = tk.qk_norm_rope(qkv, w, w, angles.cos(), angles.sin(), 1e-6, heads, 0, None, scales=scales)
    for o, r, s in zip(out, ref, scales):
        assert o.dtype == torch.float8_e4m3fn
        assert rel(o.float() / s, r) < 0.04  # e4m3 rounding: 3 mantissa bits


def test_fp8_rope_attention_on_cuda_matches_its_cpu_emulation():
    from helios.model.attention import cudnn_frontend_available
    from helios.model.transformer_kernels import rope_attention_fp8

    if cudnn_frontend_available() is not None:
        pytest.skip(f"no cuDNN frontend: {cudnn_frontend_available()}")
    g = torch.Generator(device="cuda").manual_seed(7)
    b, length, heads, hd = 1, 300, 8, 128
    d = heads * hd
    qkv = torch.randn(b, length, 3 * d, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (1 + 0.3 * torch.randn(d, device="cuda", generator=g)).bfloat16()
    angles = torch.rand(b, length, hd // 2, device="cuda", generator=g) * 6.3
    args = (qkv, w, w, angles.cos(), angles.sin(), 1e-6, heads, 100, None)
    values, scales = rope_attention_fp8(*args, 16)
    cpu_values, cpu_scales = rope_attention_fp8(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), 16)
    assert values.shape == cpu_values.shape == (304, d)
    out, emulated = values.float() * scales, (cpu_values.float() * cpu_scales).cuda()
    assert not out[length:].any()
    assert rel(out, emulated) < 0.05


def test_attention_from_the_noisy_queries_only_equals_those_rows_of_the_full_attention():
    """The last block's form (queries_from): bf16 and cuDNN FP8 attention, no fallback for Lq != Lk."""
    from helios.model.attention import cudnn_frontend_available
    from helios.model.transformer_kernels import _FP8_UNSUPPORTED, rope_attention, rope_attention_fp8

    g = torch.Generator(device="cuda").manual_seed(8)
    b, length, heads, hd, nh = 1, 2940, 40, 128, 2400
    d = heads * hd
    qkv = torch.randn(b, length, 3 * d, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (1 + 0.3 * torch.randn(d, device="cuda", generator=g)).bfloat16()
    angles = torch.rand(b, length, hd // 2, device="cuda", generator=g) * 6.3
    args = (qkv, w, w, angles.cos(), angles.sin(), 1e-6, heads, nh, None)
    full, lean = rope_attention(*args), rope_attention(*args, nh)
    assert lean.shape == (b, length - nh, d)
    assert rel(lean, full[:, nh:]) < 1e-3
    if cudnn_frontend_available() is not None:
        pytest.skip(f"no cuDNN frontend: {cudnn_frontend_available()}")
    (fv, fs), (lv, ls) = rope_attention_fp8(*args, 16), rope_attention_fp8(*args, 16, nh)
    assert not _FP8_UNSUPPORTED, _FP8_UNSUPPORTED
    m = length - nh
    assert lv.shape == (m + (-m) % 16, d)  # rows padded to the FP8 matmul's multiple
    assert rel(lv[:m].float() * ls[:m], (fv.float() * fs)[nh:length]) < 1e-2


def test_cudnn_fp8_attention_matches_its_emulation():
    from helios.model.attention import (CudnnFp8Attention, attention, cudnn_frontend_available,
                                        fp8_attention_emulated, quantize_tensor)

    if cudnn_frontend_available() is not None:
        pytest.skip(f"no cuDNN frontend: {cudnn_frontend_available()}")
    g = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (torch.randn(1, 1000, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) * 2 for _ in range(3))
    (q8, dq), (k8, dk), (v8, dv) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
    out = CudnnFp8Attention().run_quantized(q8, k8, v8, dq, dk, dv).float() * dv.reshape(())
    emulated = fp8_attention_emulated(q8, k8, v8, dq, dk, dv)
    exact = attention(q.float(), k.float(), v.float())
    print("fp8 attention: vs emulation", rel(out, emulated), "vs float32", rel(out, exact),
          "emulation vs float32", rel(emulated, exact))
    assert rel(out, emulated) < 0.05
    assert rel(out, exact) < 0.1


def test_linear_gelu_epilogue_is_the_tanh_gelu():
    import torch.nn.functional as F

    from helios.model.transformer_kernels import linear_gelu

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1000, 512, device="cuda", generator=g)
    w, b = torch.randn(768, 512, device="cuda", generator=g) * 0.1, torch.randn(768, device="cuda", generator=g)
    lin = F.linear(x, w, b)
    out = linear_gelu(x, w, b)  # float32: the tanh/erf difference is far above the GEMM's error
    assert rel(out, F.gelu(lin, approximate="tanh")) < 1e-5 < rel(out, F.gelu(lin))
    out16 = linear_gelu(x.bfloat16(), w.bfloat16(), b.bfloat16())
    plain16 = F.gelu(F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()), approximate="tanh")
    ref = F.gelu(lin, approximate="tanh")
    assert rel(out16, ref) <= 1.05 * rel(plain16, ref) + 1e-4


def test_fused_compiled_model_matches_the_plain_one_bf16():
    from helios.model.config import HeliosConfig
    from helios.model.transformer import build_transformer

    torch.manual_seed(0)
    cfg = HeliosConfig(num_layers=2, is_amplify_history=True)  # the 14B widths, two blocks
    model = build_transformer(cfg, device="cuda", dtype=torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(1, 16, 9, 12, 20, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(1, 64, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    hist = dict(latents_history_short=torch.randn(1, 16, 2, 12, 20, device="cuda", generator=g).bfloat16(),
                indices_latents_history_short=torch.tensor([[0, 1]], device="cuda"),
                indices_hidden_states=torch.arange(2, 11, device="cuda")[None])
    t = torch.tensor([700.0], device="cuda")
    with torch.no_grad():
        ref32 = build_transformer(cfg, device="cuda", dtype=torch.float32).eval()
        ref32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        ref = ref32(x.float(), t, ctx.float(), **hist).sample
        del ref32
        model.fuse_projections_(kernels=False)
        plain = model(x, t, ctx, **hist).sample
        model.fuse_projections_(kernels=True)
        model.compile_blocks_()
        fused = model(x, t, ctx, **hist).sample
    assert rel(fused, ref) <= 1.1 * rel(plain, ref) + 1e-3


def test_gelu_quantize_rows_kernel_matches_the_reference():
    from helios.model.transformer_kernels import gelu_quantize_rows, gelu_quantize_rows_reference

    g = torch.Generator(device="cuda").manual_seed(5)
    h = torch.randn(1000, 13824, device="cuda", generator=g, dtype=torch.bfloat16) * 2
    values, scales = gelu_quantize_rows(h, 16)
    ref_v, ref_s = gelu_quantize_rows_reference(h, 16)
    assert values.shape == ref_v.shape == (1008, 13824) and scales.shape == (1008, 1)
    assert rel(scales, ref_s) < 1e-5
    assert rel(values.float() * scales, ref_v.float() * ref_s) < 1e-2


def test_fp8_model_with_fp8_attention_stays_close():
    from helios.model.attention import cudnn_frontend_available
    from helios.model.config import HeliosConfig
    from helios.model.fp8 import quantize_blocks_
    from helios.model.transformer import build_transformer

    torch.manual_seed(0)
    cfg = HeliosConfig(num_layers=2)
    model = build_transformer(cfg, device="cuda", dtype=torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(1, 16, 9, 12, 20, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(1, 64, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.tensor([700.0], device="cuda")
    with torch.no_grad():
        model.fuse_projections_()
        bf16 = model(x, t, ctx).sample
        quantize_blocks_(model, attention=False)
        fp8_linear = model(x, t, ctx).sample
        if cudnn_frontend_available() is None:
            quantize_blocks_(model, attention=True)  # already FP8 linears: only the attention flag changes
            fp8_all = model(x, t, ctx).sample
            print("FP8 error vs bf16: linears", rel(fp8_linear, bf16), "linears + attention", rel(fp8_all, bf16))
            assert rel(fp8_all, bf16) < 0.2
    assert rel(fp8_linear, bf16) < 0.2
