"""CUDA versions of the fast paths against the plain PyTorch path (run on the lent GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_cudnn_attention_matches_math():
    from helios.model.attention import attention, set_attention_backends

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2000, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    set_attention_backends(["math"])
    ref = attention(q.float(), k.float(), v.float())
    set_attention_backends(["cudnn", "flash", "efficient", "math"])
    fast = attention(q, k, v)
    assert rel(fast.float(), ref) < 1e-2


def test_fp8_scaled_mm_matches_the_emulated_product():
    from helios.model.fp8 import Fp8Linear

    g = torch.Generator(device="cuda").manual_seed(1)
    lin = torch.nn.Linear(512, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1000, 512, device="cuda", generator=g, dtype=torch.bfloat16)  # 1000: padded to 16
    q = Fp8Linear(lin)
    fast = q(x)
    emulated = q.cpu()(x.cpu()).cuda()
    assert fast.shape == (1000, 384)
    assert rel(fast.float(), emulated.float()) < 1e-2
    assert rel(fast.float(), lin(x).float()) < 5e-2


def test_compiled_fused_model_matches_eager_bf16():
    from helios.model.config import named_config
    from helios.model.transformer import build_transformer

    torch.manual_seed(0)
    model = build_transformer(named_config("small"), device="cuda", dtype=torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(1, 16, 9, 16, 16, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(1, 20, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = model(x, 400.0, ctx).sample.float()
        model.fuse_projections_().compile_blocks_()
        fast = model(x, 400.0, ctx).sample.float()
    assert rel(fast, plain) < 2e-2


def test_batched_decode_matches_framewise_on_gpu():
    from diffusers import AutoencoderKLWan

    from helios.engine.conditioning import LatentCodec

    torch.manual_seed(0)
    codec = LatentCodec(AutoencoderKLWan().to("cuda", torch.bfloat16).eval())
    z = torch.randn(1, 16, 9, 12, 20, device="cuda")
    assert rel(codec.decode(z).float(), codec.decode_reference(z).float()) < 1e-2
