"""Our Wan VAE decoder (helios.model.wan_vae) against diffusers' AutoencoderKLWan, float32 on the CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helios.model.wan_vae import DecodeState, WanVAEDecoder


def random_vae(seed: int = 0, **config):
    """A small AutoencoderKLWan with random weights, norm gains included (they are ones when built)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    kw = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae = AutoencoderKLWan(**{**kw, **config}).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
    return vae


def reference(vae, z):
    return vae.decode(z, return_dict=False)[0]


@pytest.fixture(scope="module")
def vae():
    return random_vae()


@pytest.fixture(scope="module")
def released_vae():
    """The released VAE's own layout (base_dim 96, two res blocks per level), random weights."""
    return random_vae(seed=2, base_dim=96, num_res_blocks=2, dim_mult=[1, 2, 4, 4])


def test_decodes_several_chunks_in_a_row_like_diffusers(vae):
    # One decoder object over three chunks, as the engine uses it: nothing of a chunk may leak into the next.
    decoder = WanVAEDecoder.from_vae(vae)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        z = torch.randn(2, 16, 9, 4, 6, generator=g)
        ours, ref = decoder.decode(z), reference(vae, z)
        assert ours.shape == ref.shape == (2, 3, 33, 32, 48)
        assert (ours - ref).abs().max().item() < 1e-5


def test_the_default_wan21_layout_matches_at_its_widths(released_vae):
    # The released VAE's own layout, at a small frame size.
    z = torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(2))
    assert (WanVAEDecoder.from_vae(released_vae).decode(z) - reference(released_vae, z)).abs().max().item() < 1e-5


def test_a_chunk_decoded_in_parts_equals_the_whole(vae):
    # Frame 0 first (fast start hands it over early), then the rest: the state carries each causal
    # convolution's history between the calls as diffusers' feature cache does.
    decoder = WanVAEDecoder.from_vae(vae)
    z = torch.randn(1, 16, 9, 4, 6, generator=torch.Generator().manual_seed(3))
    whole = reference(vae, z)
    state = DecodeState()
    parts = [decoder.decode(z[:, :, :1], state), decoder.decode(z[:, :, 1:4], state), decoder.decode(z[:, :, 4:], state)]
    assert [p.shape[2] for p in parts] == [1, 12, 20]
    assert (torch.cat(parts, dim=2) - whole).abs().max().item() < 1e-5


def set_impls(decoder, conv: str, upsample: str) -> None:
    from helios.model.wan_vae import CausalConv3d, Resample

    for m in decoder.modules():
        if isinstance(m, CausalConv3d) and conv in m.impls:
            m.impl = conv
        elif isinstance(m, Resample):
            m.impl = upsample


def test_every_convolution_implementation_and_layout_gives_the_same_frames(vae):
    decoder = WanVAEDecoder.from_vae(vae)
    z = torch.randn(1, 16, 9, 4, 6, generator=torch.Generator().manual_seed(4))
    ref = reference(vae, z)
    outs = {}
    for conv, upsample in [("taps", "upsample"), ("folded", "phase")]:
        set_impls(decoder, conv, upsample)
        outs[conv] = decoder.decode(z)
    decoder.decoder.conv_out.impl = "gather"  # with the folded taps and the phase convolution elsewhere
    decoder.channels_last_()
    outs["folded, channels-last"] = decoder.decode(z)
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in decoder.parameters() if p.dim() == 5)
    for name, out in outs.items():
        assert (out - ref).abs().max().item() < 1e-5, name


def static_choices(decoder) -> dict[str, str]:
    from helios.model.wan_vae import use_static_impls_

    return {name: c["chosen"] for name, c in use_static_impls_(decoder).items()}


def test_the_static_choice_is_a_function_of_shapes_alone(vae):
    from helios.model.wan_vae import UPSAMPLE_IMPLS, CausalConv3d, Resample, tunable_modules

    with torch.device("meta"):  # the released widths: shapes only
        released = (WanVAEDecoder(), WanVAEDecoder())
    small = (WanVAEDecoder.from_vae(vae), WanVAEDecoder.from_vae(random_vae(seed=9)))  # other weights
    for decoder, other in (small, released):
        choices = static_choices(decoder)
        assert choices == static_choices(decoder) == static_choices(other)
        modules = dict(tunable_modules(decoder))
        assert set(choices) == set(modules)  # every tunable module has one
        for name, impl in choices.items():
            m = modules[name]
            assert impl in (m.impls if isinstance(m, CausalConv3d) else UPSAMPLE_IMPLS), name
            assert impl == ("phase" if isinstance(m, Resample) else
                            "taps" if m.kernel_size == (3, 3, 3) and min(m.in_channels, m.out_channels) >= 96
                            else "conv3d"), name
    assert set(choices.values()) == {"taps", "phase", "conv3d"}
    assert choices["decoder.conv_in"] == choices["decoder.conv_out"] == "conv3d"  # the narrow ends


@pytest.mark.parametrize("widths", ["small", "released"])
def test_the_static_choices_decode_the_same_frames(vae, released_vae, widths):
    # In float32 on the CPU, as the plain decoder (conv3d everywhere, upsampling then convolution) and diffusers.
    from helios.model.wan_vae import Resample, use_static_impls_

    model = vae if widths == "small" else released_vae
    z = torch.randn(1, 16, 5 if widths == "small" else 3, 2, 4, generator=torch.Generator().manual_seed(10))
    plain = WanVAEDecoder.from_vae(model).decode(z)
    decoder = WanVAEDecoder.from_vae(model)
    use_static_impls_(decoder, z)  # as on the GPU: one decode of z's shape prepares the chosen weights
    for m in decoder.modules():
        if isinstance(m, Resample):
            assert m.impl == "phase" and set(m.derived) == {"phase"}
    assert (decoder.decode(z) - plain).abs().max().item() < 1e-5
    assert (plain - reference(model, z)).abs().max().item() < 1e-5


def test_settling_a_choice_drops_the_other_weights_and_the_cached_blocks(vae, monkeypatch):
    from helios.model.wan_vae import Resample, settle_choices

    decoder = WanVAEDecoder.from_vae(vae)
    rs = next(m for m in decoder.modules() if isinstance(m, Resample))
    rs.impl, rs.derived = "phase", {"phase": ((), torch.zeros(1)), "upsample": ((), torch.zeros(1))}
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    settle_choices(decoder, cuda=False)
    assert set(rs.derived) == {"phase"} and emptied == []
    settle_choices(decoder, cuda=True)  # what autotune_convs ends with on a GPU
    assert emptied == [True]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel, padding, c_out", [((3, 3, 3), 1, 7), ((3, 3, 3), 1, 3), ((3, 1, 1), (1, 0, 0), 7),
                                                     ((1, 1, 1), 0, 7)])
def test_each_convolution_implementation_equals_conv3d(kernel, padding, c_out, channels_last):
    from helios.model.wan_vae import CONV_IMPLS, FREE_BIAS, CausalConv3d, run_conv_deferred

    torch.manual_seed(0)
    conv = CausalConv3d(5, c_out, kernel, padding=padding)
    x = torch.randn(2, 5, 6, 4, 5)
    if channels_last:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    ref = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=conv.padding)
    assert ref.shape[2] == 6 - kernel[0] + 1
    assert ("pad16" in conv.impls) and (("folded" in conv.impls) == (kernel[0] == 3))
    assert ("gather" in conv.impls) == (kernel == (3, 3, 3) and c_out <= 4)
    for name in conv.impls:
        assert (CONV_IMPLS[name](conv, x, conv.bias) - ref).abs().max().item() < 1e-5, name
        no_bias = CONV_IMPLS[name](conv, x, None)
        assert (no_bias + conv.bias.view(-1, 1, 1, 1) - ref).abs().max().item() < 1e-5, name
        # a deferred bias comes back to the caller unless the implementation adds it for free
        conv.impl = name
        parts, bias = run_conv_deferred(conv, x, defer=True)
        y = sum(parts) if bias is None else sum(parts) + bias.view(-1, 1, 1, 1)
        assert (y - ref).abs().max().item() < 1e-5, name
        assert (bias is None) == (name in FREE_BIAS), name
        assert len(parts) == (kernel[0] if name == "taps" else 1), name  # the taps come back unsummed
        assert len(run_conv_deferred(conv, x, defer=True, partial_sums=False)[0]) == 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_phase_convolution_equals_nearest_upsampling_then_the_3x3_convolution(channels_last):
    from helios.model.wan_vae import UPSAMPLE_IMPLS, Resample

    torch.manual_seed(1)
    rs = Resample(8, temporal=False).requires_grad_(False)
    frames = torch.randn(3, 8, 5, 7)
    if channels_last:
        frames = frames.contiguous(memory_format=torch.channels_last)
        rs.resample[1].weight.data = rs.resample[1].weight.data.contiguous(memory_format=torch.channels_last)
    conv = rs.resample[1]
    up = torch.nn.functional.interpolate(frames, scale_factor=2.0, mode="nearest-exact")
    ref = torch.nn.functional.conv2d(up, conv.weight, conv.bias, padding=1)
    assert ref.shape == (3, 4, 10, 14)
    for name, fn in UPSAMPLE_IMPLS.items():
        out = fn(rs, frames, conv.bias)
        assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-5, name
        assert (fn(rs, frames, None) + conv.bias.view(-1, 1, 1) - ref).abs().max().item() < 1e-5, name
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_the_fused_norm_adds_a_deferred_bias_the_taps_and_the_residual():
    from helios.model import vae_kernels

    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(2, 6, 3, 4, 5, generator=g), torch.randn(2, 6, 3, 4, 5, generator=g)
    bias, gain = torch.randn(6, generator=g), 1 + 0.3 * torch.randn(6, generator=g)
    out, total = torch.empty_like(x), torch.empty_like(x)
    parts = [torch.randn(2, 6, 3, 4, 5, generator=g) for _ in range(2)]  # a convolution's unsummed taps
    vae_kernels.rms_norm_silu(x, gain, 6**0.5, out=out, residual=[*parts, r], total=total, bias=bias)
    s = x + bias.view(1, -1, 1, 1, 1) + parts[0] + parts[1] + r
    ref = torch.nn.functional.silu(torch.nn.functional.normalize(s, dim=1) * 6**0.5 * gain.view(1, -1, 1, 1, 1))
    assert (total - s).abs().max().item() < 1e-5 and (out - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="at most 3"):
        vae_kernels.rms_norm_silu(x, gain, 6**0.5, out=out, residual=[r] * 4)


def test_the_implicit_gemm_convolution_takes_power_of_two_sums_of_widths():
    from helios.model import vae_kernels
    from helios.model.wan_vae import CausalConv3d

    assert [vae_kernels.igemm_split(c) for c in (96, 192, 128, 80, 16)] == [(64, 32), (128, 64), (128, 0), (64, 16),
                                                                             (16, 0)]
    assert [vae_kernels.igemm_split(c) for c in (3, 72, 112, 384)] == [None] * 4  # 8 or 48 left over; too wide
    assert "igemm" in CausalConv3d(96, 96, 3, padding=1).impls
    assert "igemm" not in CausalConv3d(96, 384, 3, padding=1).impls  # too wide for one program's accumulators
    assert "igemm" not in CausalConv3d(5, 96, 3, padding=1).impls  # inputs not in blocks of 32
    assert "igemm" not in CausalConv3d(96, 96, (3, 1, 1), padding=(1, 0, 0)).impls
    w = torch.randn(48, 32, 3, 3, 3)
    packed = vae_kernels.pack_igemm_weight(w)  # row (tap, input channel), tap = 9 kt + 3 ky + kx
    assert packed.shape == (27 * 32, 48) and torch.equal(packed[(9 * 2 + 3 * 1 + 0) * 32 + 5], w[:, 5, 2, 1, 0])
    with pytest.raises(ValueError, match="conv3x3x3"):
        vae_kernels.conv3x3x3(torch.randn(1, 32, 4, 5, 6), w, None, out=torch.empty(1, 48, 4, 5, 6))


def test_the_conv_with_its_norm_fused_equals_the_conv_then_the_norm():
    from helios.model import vae_kernels

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 5, 4, 6, generator=g).contiguous(memory_format=torch.channels_last_3d)
    w, bias, gain = torch.randn(48, 32, 3, 3, 3, generator=g) / 30, torch.randn(48, generator=g), torch.rand(48) + 0.5
    conv = torch.nn.functional.conv3d(x, w, bias, padding=(0, 1, 1))
    buf = torch.full((2, 48, 5, 4, 6), float("nan")).contiguous(memory_format=torch.channels_last_3d)
    vae_kernels.conv3x3x3(x, w, bias, buf[:, :, 2:], gain=gain, scale=48**0.5, silu=True)
    ref = torch.nn.functional.silu(torch.nn.functional.normalize(conv, dim=1) * 48**0.5 * gain.view(-1, 1, 1, 1))
    assert (buf[:, :, 2:] - ref).abs().max().item() < 1e-5 and buf[:, :, :2].isnan().all()  # history left alone
    plain = vae_kernels.conv3x3x3(x, w, bias, torch.empty_like(conv))
    assert (plain - conv).abs().max().item() < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
def test_implicit_gemm_kernel_under_the_triton_interpreter():
    """The Triton kernel itself (its CUDA run is in tests/gpu/test_wan_vae_gpu.py): split output widths, a batch
    stride, an output view inside a history buffer, positions past the last block, the frame's borders."""
    script = textwrap.dedent("""
        import torch
        import torch.nn.functional as F
        from helios.model import vae_kernels as vk
        torch.manual_seed(0)
        for b, c_in, c_out, t, h, w, norm, res, block_m in ((2, 32, 96, 2, 5, 7, True, False, 32),
                                                            (1, 64, 128, 1, 4, 9, False, False, 16),
                                                            (1, 96, 48, 2, 3, 5, True, True, 64),
                                                            (2, 32, 96, 1, 3, 4, True, True, 16)):
            fmt = torch.channels_last_3d
            x = torch.randn(b, c_in, t + 2, h, w).contiguous(memory_format=fmt)
            wt = torch.randn(c_out, c_in, 3, 3, 3) / (27 * c_in) ** 0.5
            bias, gain = torch.randn(c_out), torch.rand(c_out) + 0.5
            buf = torch.full((b, c_out, t + 2, h, w), float("nan")).contiguous(memory_format=fmt)
            r = torch.randn(b, c_out, t, h, w).contiguous(memory_format=fmt) if res else None
            total = torch.empty_like(r) if res else None
            s = F.conv3d(x, wt, bias, padding=(0, 1, 1)) + (r if res else 0)
            ref = F.silu(F.normalize(s, dim=1) * c_out ** 0.5 * gain.view(-1, 1, 1, 1)) if norm else s
            vk._conv3x3x3_triton(x, vk.pack_igemm_weight(wt), bias, buf[:, :, 2:], gain if norm else None,
                                 c_out ** 0.5, norm, r, total, block_m=block_m)
            err = ((buf[:, :, 2:] - ref).norm() / ref.norm()).item()
            assert err < 1e-6 and buf[:, :, :2].isnan().all(), err
            assert not res or ((total - s).norm() / s.norm()).item() < 1e-6
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("convs", [("conv1",), ("conv2",), ("conv1", "conv2")])
def test_fusing_block_convs_with_the_norms_after_them_decodes_the_same_frames(released_vae, convs):
    decoder = WanVAEDecoder.from_vae(released_vae)
    z = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(6))
    ref = reference(released_vae, z)
    tuned = decoder.get_submodule("decoder.up_blocks.3.resnets.0.conv2")
    tuned.impl = "igemm"  # as tuning may choose it for a convolution it runs alone
    fused = decoder.fuse_conv_norms_(convs)
    for which in ("conv1", "conv2"):  # 96 and 192 wide fit, 384 does not
        assert (f"decoder.up_blocks.3.resnets.0.{which}" in fused) == (which in convs)
        assert f"decoder.mid_block.resnets.0.{which}" not in fused
    assert all(decoder.get_submodule(name).impl == "igemm" for name in fused)
    decoder.channels_last_()
    assert (decoder.decode(z) - ref).abs().max().item() < 1e-5
    state = DecodeState()  # the fused kernels keep each convolution's history for the next call
    parts = [decoder.decode(z[:, :, :1], state), decoder.decode(z[:, :, 1:], state)]
    assert (torch.cat(parts, 2) - ref).abs().max().item() < 1e-5
    assert decoder.fuse_conv_norms_(()) == [] and not decoder.fused_convs
    assert all(decoder.get_submodule(name).impl != "igemm" for name in fused)  # back to the choice by shape
    assert (tuned.impl == "igemm") == ("conv2" not in convs)  # a choice that was never fused is kept
    with pytest.raises(ValueError, match="conv3"):
        decoder.fuse_conv_norms_(("conv3",))


def test_the_conv_with_a_residual_and_its_norm_fused_writes_the_sum_and_the_norm():
    from helios.model import vae_kernels

    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 32, 4, 3, 5, generator=g)
    w, bias, gain = torch.randn(16, 32, 3, 3, 3, generator=g) / 30, torch.randn(16, generator=g), torch.rand(16) + 0.5
    r = torch.randn(1, 16, 2, 3, 5, generator=g)
    out, total = torch.empty_like(r), torch.empty_like(r)
    vae_kernels.conv3x3x3(x, w, bias, out, gain=gain, scale=4.0, silu=True, residual=r, total=total)
    s = torch.nn.functional.conv3d(x, w, bias, padding=(0, 1, 1)) + r
    ref = torch.nn.functional.silu(torch.nn.functional.normalize(s, dim=1) * 4.0 * gain.view(-1, 1, 1, 1))
    assert (total - s).abs().max().item() < 1e-5 and (out - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="give both"):
        vae_kernels.conv3x3x3(x, w, bias, out, total=total)


def test_summing_folded_taps_takes_tap_k_from_frame_t_plus_k():
    from helios.model import vae_kernels

    y = torch.randn(2 * 5, 3 * 4, 2, 3, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(4)
    out = vae_kernels.sum_taps(y, batch=2, taps=3, bias=bias, memory_format=torch.contiguous_format)
    assert out.shape == (2, 4, 3, 2, 3)
    per = y.reshape(2, 5, 3, 4, 2, 3)
    for t in range(3):
        expected = per[:, t, 0] + per[:, t + 1, 1] + per[:, t + 2, 2] + bias.view(4, 1, 1)
        assert (out[:, :, t] - expected).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="not \\(B \\* T_in"):
        vae_kernels.sum_taps(y, batch=3, taps=3, bias=None, memory_format=torch.contiguous_format)


def test_gathering_taps_sums_each_shifted_tap_with_zeros_outside_the_frame():
    from helios.model import vae_kernels

    b, t_in, h, w = 1, 4, 3, 5
    p = torch.randn(b * t_in * h * w, 27 * 4, generator=torch.Generator().manual_seed(4))
    out = vae_kernels.gather_taps(p, b, t_in, h, w, channels=3, bias=None)
    assert out.shape == (1, 3, 2, 3, 5) and out.is_contiguous()
    per = p.reshape(b, t_in, h, w, 27, 4)
    t, y, x, c = 1, 0, 4, 2  # a corner: the taps reaching outside the frame add nothing
    expected = sum(per[0, t + kt, y + ky - 1, x + kx - 1, 9 * kt + 3 * ky + kx, c]
                   for kt in range(3) for ky in range(3) for kx in range(3)
                   if 0 <= y + ky - 1 < h and 0 <= x + kx - 1 < w)
    assert abs(out[0, c, t, y, x].item() - expected.item()) < 1e-5
    with pytest.raises(ValueError, match="gather_taps"):
        vae_kernels.gather_taps(p, b, t_in, h + 1, w, channels=3, bias=None)


def test_the_fastest_implementation_is_chosen_and_its_timings_kept():
    from helios.model.wan_vae import CausalConv3d, fastest_impl

    conv = CausalConv3d(2, 16, 3, padding=1)
    ran = []
    fake_ms = {"conv3d": 2.0, "taps": 3.0, "folded": 1.5}
    chosen = fastest_impl(conv, conv.impls, ran.append, timer=lambda fn: (fn(), fake_ms[ran[-1]])[1])
    assert chosen == "folded" and ran == ["conv3d", "taps", "folded"]
    assert conv.tuned_ms == fake_ms
    fake_ms["folded"] = 4.0  # a slower new implementation is not picked
    assert fastest_impl(conv, conv.impls, ran.append, timer=lambda fn: (fn(), fake_ms[ran[-1]])[1]) == "conv3d"

    def conv3d_fails(name):
        if name == "conv3d":
            raise RuntimeError("no kernel for this device")
        ran.append(name)

    # one that fails while tuning is left out; the fastest of the others is chosen
    assert fastest_impl(conv, conv.impls, conv3d_fails, timer=lambda fn: (fn(), fake_ms[ran[-1]])[1]) == "taps"
    assert set(conv.tuned_ms) == {"taps", "folded"}


def test_graph_replay_reads_each_new_latent(vae):
    # replay="host" re-runs the captured decode on its static input: a latent that skipped the copy
    # into it would decode the first chunk again.
    from helios.model.graphs import GraphedDecode

    graphed = GraphedDecode(WanVAEDecoder.from_vae(vae), replay="host")
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        z = torch.randn(1, 16, 5, 4, 6, generator=g)
        out = graphed(z)
        assert (out - reference(vae, z)).abs().max().item() < 1e-5
    assert len(graphed.graphs) == 1


def test_the_codec_decodes_with_our_decoder_and_equals_diffusers(vae):
    from helios.engine.conditioning import LatentCodec

    codec = LatentCodec(vae)
    assert codec.decoder is not None
    z = torch.randn(1, 16, 9, 4, 6, generator=torch.Generator().manual_seed(6))
    ref = codec.decode_reference(z)
    assert (codec.decode(z) - ref).abs().max().item() < 1e-5
    first, rest = codec.decode_parts(z)
    assert (torch.cat([first, rest], dim=2) - ref).abs().max().item() < 1e-5


def test_a_vae_of_another_layout_is_refused_by_ours_and_decoded_by_diffusers():
    from helios.engine.conditioning import LatentCodec
    from helios.model.wan_vae import WanVAEDecoderConfig

    with pytest.raises(ValueError, match="not a Wan2.1 VAE"):
        WanVAEDecoderConfig.from_vae_config({"is_residual": True, "patch_size": 2})
    vae = random_vae(seed=7)
    vae.register_to_config(is_residual=True)  # stands in for a Wan2.2 VAE: the codec falls back
    codec = LatentCodec(vae)
    assert codec.decoder is None
    z = torch.randn(1, 16, 2, 4, 6)
    assert torch.equal(codec.decode(z), codec.decode_reference(z))


def test_weights_that_do_not_fit_are_refused_with_the_keys():
    vae = random_vae(seed=8)
    state = {k: v for k, v in vae.state_dict().items() if "conv_out" not in k}
    with pytest.raises(ValueError, match="missing .*conv_out"):
        WanVAEDecoder.from_state_dict(state, vae.config)
    assert WanVAEDecoder.from_state_dict(vae.state_dict(), vae.config) is not None


def test_beside_a_captured_decode_the_parts_are_decoded_in_slices_and_equal_the_whole(vae, monkeypatch):
    # A fast start decodes chunk 0 in parts outside the graph; beside a captured whole-chunk decode (its pool
    # holds a whole chunk's working set) those parts go in slices, with the same frames.
    from helios.engine.conditioning import SLICE_BESIDE_GRAPH, LatentCodec
    from helios.model.graphs import GraphedDecode

    codec = LatentCodec(vae)
    z = torch.randn(1, 16, 9, 4, 6, generator=torch.Generator().manual_seed(7))
    ref = codec.decode_reference(z)
    assert codec.eager_slice() is None
    codec.graphed = GraphedDecode(codec.decoder, replay="host")
    codec.graphed(codec._vae_latents(z))  # captured: its pool now holds a whole chunk's working set
    assert codec.eager_slice() == SLICE_BESIDE_GRAPH
    calls = []
    decode = codec.decoder.decode
    monkeypatch.setattr(codec.decoder, "decode", lambda x, state=None: (calls.append(x.shape[2]), decode(x, state))[1])
    first, rest = codec.decode_parts(z)
    assert calls == [1, 2, 2, 2, 2]  # frame 0, then the other 8 latent frames two at a time
    assert (torch.cat([first, rest], dim=2) - ref).abs().max().item() < 1e-5
