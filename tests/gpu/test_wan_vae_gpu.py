"""Our Wan VAE decoder on CUDA: the fused Triton kernel, and the fast path's bf16 error against a float32
decode, which must be no worse than diffusers' own bf16 decode (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [96, 384])
def test_fused_norm_kernel_equals_the_torch_ops(dtype, channels):
    from helios.model import vae_kernels

    assert vae_kernels.triton is not None
    g = torch.Generator("cuda").manual_seed(0)
    shape = (2, channels, 5, 12, 20)
    x, r, part = (torch.randn(shape, device="cuda", generator=g).to(dtype)
                  .contiguous(memory_format=torch.channels_last_3d) for _ in range(3))
    gain = 1 + 0.3 * torch.randn(channels, device="cuda", generator=g)
    # into the new frames of a history buffer, as the decoder writes it
    buf = torch.zeros(2, channels, 7, 12, 20, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    total = torch.empty_like(x)
    bias = torch.randn(channels, device="cuda", generator=g).to(dtype)  # a deferred convolution bias
    assert vae_kernels.use_triton(x, buf[:, :, 2:], r, total)
    # x and part: a convolution's unsummed taps; r: the residual
    vae_kernels.rms_norm_silu(x, gain, channels**0.5, out=buf[:, :, 2:], residual=[part, r], total=total, bias=bias)
    s = x.float() + bias.float().view(1, -1, 1, 1, 1) + part.float() + r.float()
    ref = torch.nn.functional.silu(torch.nn.functional.normalize(s.float(), dim=1) * channels**0.5
                                   * gain.view(1, -1, 1, 1, 1))
    assert ((total.float() - s).abs() <= s.abs() * 2**-8 + 1e-5).all()  # the sum, to one bf16 rounding
    assert torch.equal(buf[:, :, :2], torch.zeros_like(buf[:, :, :2]))  # the history frames are untouched
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(buf[:, :, 2:].float(), ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [96, 3])
def test_tap_sum_kernel_equals_the_torch_ops(dtype, channels):
    from helios.model import vae_kernels

    g = torch.Generator("cuda").manual_seed(1)
    y = torch.randn(2 * 7, 3 * channels, 12, 20, device="cuda", generator=g).to(dtype)
    y = y.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(channels, device="cuda", generator=g).to(dtype)
    out = vae_kernels.sum_taps(y, 2, 3, bias, torch.channels_last_3d)
    assert out.shape == (2, channels, 5, 12, 20) and out.is_contiguous(memory_format=torch.channels_last_3d)
    per = y.float().reshape(2, 7, 3, channels, 12, 20)
    ref = (per[:, :5, 0] + per[:, 1:6, 1] + per[:, 2:7, 2]).permute(0, 2, 1, 3, 4) + bias.float().view(-1, 1, 1, 1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(out.float(), ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c_in, c_out, norm", [(96, 96, True), (96, 96, False), (192, 192, True), (192, 96, False)])
def test_implicit_gemm_conv_kernel_equals_the_torch_ops(dtype, c_in, c_out, norm):
    from helios.model import vae_kernels

    g = torch.Generator("cuda").manual_seed(2)
    fmt = torch.channels_last_3d
    x = torch.randn(2, c_in, 5, 24, 40, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(c_out, c_in, 3, 3, 3, device="cuda", generator=g) / (27 * c_in) ** 0.5).to(dtype)
    bias = torch.randn(c_out, device="cuda", generator=g).to(dtype)
    gain = 1 + 0.3 * torch.randn(c_out, device="cuda", generator=g)
    buf = torch.full((2, c_out, 5, 24, 40), float("nan"), device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    assert vae_kernels.use_triton(x, buf[:, :, 2:]) and vae_kernels.igemm_fits(c_in, c_out)
    vae_kernels.conv3x3x3(x, w, bias, buf[:, :, 2:], gain=gain if norm else None, scale=c_out**0.5, silu=norm)
    ref = torch.nn.functional.conv3d(x.double(), w.double(), bias.double(), padding=(0, 1, 1))
    if norm:
        ref = torch.nn.functional.silu(torch.nn.functional.normalize(ref, dim=1) * c_out**0.5
                                       * gain.double().view(-1, 1, 1, 1))
    assert buf[:, :, :2].isnan().all()  # the history frames are untouched
    # against float64: float32 runs exact products (no TF32); bf16 rounds inputs and output once each
    assert rel(buf[:, :, 2:], ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    # every launch configuration the tuner may pick sums the same way: bit for bit the same output
    packed = vae_kernels.pack_igemm_weight(w)
    for block_m in (64, 128):
        again = torch.empty_like(buf[:, :, 2:])
        vae_kernels._conv3x3x3_triton(x, packed, bias, again, gain if norm else None, c_out**0.5, norm,
                                      block_m=block_m)
        assert torch.equal(again, buf[:, :, 2:]), block_m


def test_fast_decode_is_as_close_to_float32_as_diffusers_bf16():
    from diffusers import AutoencoderKLWan

    from helios.engine.conditioning import LatentCodec

    torch.manual_seed(0)
    vae = AutoencoderKLWan().to("cuda").eval()
    z = torch.randn(1, 16, 9, 24, 40, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    exact_codec = LatentCodec(vae)
    exact = exact_codec.decode_reference(z).float()
    ours_fp32 = exact_codec.decode(z).float()
    codec = LatentCodec(vae.to(torch.bfloat16))
    diffusers_bf16 = codec.decode_reference(z).float()
    timings = codec.fast_decode_(tuple(z.shape), graphs=True)
    assert timings and all("chosen" in t for t in timings.values())
    fast = codec.decode(z).float()
    again = codec.decode(z).float()  # the graph's replay
    assert codec.graphed is not None and len(codec.graphed.graphs) == 1 and not codec.graphed.failed
    err_ours, err_ref = rel(fast, exact), rel(diffusers_bf16, exact)
    print(f"bf16 vs float32 relative error: ours {err_ours:.4f}, diffusers {err_ref:.4f}; "
          f"ours float32 on CUDA {rel(ours_fp32, exact):.2e}")
    assert rel(ours_fp32, exact) < 1e-3  # TF32 may be on for cuDNN convolutions
    assert err_ours <= err_ref
    assert torch.equal(fast, again)
    first, rest = codec.decode_parts(z)
    assert rel(torch.cat([first, rest], 2).float(), exact) <= err_ref
    # each implementation on its own, whatever the timing chose (the Triton tap sum and the phase shuffle)
    from helios.model.wan_vae import CausalConv3d, Resample

    for conv_impl, upsample_impl in [("folded", "phase"), ("taps", "upsample"), ("pad16", "phase"), ("gather", "phase"),
                                     ("igemm", "phase")]:
        for m in codec.decoder.modules():
            if isinstance(m, CausalConv3d) and conv_impl in m.impls:
                m.impl = conv_impl
            elif isinstance(m, Resample):
                m.impl = upsample_impl
        forced = codec.decoder.decode(codec._vae_latents(z)).float()
        print(f"{conv_impl}/{upsample_impl}: bf16 vs float32 relative error {rel(forced, exact):.4f}")
        assert rel(forced, exact) <= err_ref
    # residual-block convolutions with the norms after them as one kernel (not the default yet), eager, then
    # both as a graph
    for convs in (("conv1",), ("conv1", "conv2")):
        assert codec.decoder.fuse_conv_norms_(convs)
        fused = codec.decoder.decode(codec._vae_latents(z)).float()
        print(f"{'+'.join(convs)} fused with their norms: bf16 vs float32 relative error {rel(fused, exact):.4f}")
        assert rel(fused, exact) <= err_ref
    codec.fast_decode_(None, graphs=True)
    assert torch.equal(codec.decode(z).float(), codec.decode(z).float())
    assert rel(codec.decode(z).float(), exact) <= err_ref
    codec.decoder.fuse_conv_norms_(())
