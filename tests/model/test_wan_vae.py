"""Our Wan VAE decoder (helios.model.wan_vae) against diffusers' AutoencoderKLWan, float32 on the CPU."""

from __future__ import annotations

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


def test_decodes_several_chunks_in_a_row_like_diffusers(vae):
    # One decoder object over three chunks, as the engine uses it: nothing of a chunk may leak into the next.
    decoder = WanVAEDecoder.from_vae(vae)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        z = torch.randn(2, 16, 9, 4, 6, generator=g)
        ours, ref = decoder.decode(z), reference(vae, z)
        assert ours.shape == ref.shape == (2, 3, 33, 32, 48)
        assert (ours - ref).abs().max().item() < 1e-5


def test_the_default_wan21_layout_matches_at_its_widths():
    # The released VAE's own layout (base_dim 96, two res blocks per level), at a small frame size.
    vae = random_vae(seed=2, base_dim=96, num_res_blocks=2, dim_mult=[1, 2, 4, 4])
    z = torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(2))
    assert (WanVAEDecoder.from_vae(vae).decode(z) - reference(vae, z)).abs().max().item() < 1e-5


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


def test_every_convolution_implementation_and_layout_gives_the_same_frames(vae):
    decoder = WanVAEDecoder.from_vae(vae)
    z = torch.randn(1, 16, 9, 4, 6, generator=torch.Generator().manual_seed(4))
    ref = reference(vae, z)
    convs = [m for m in decoder.modules() if hasattr(m, "impl")]
    for m in convs:
        m.impl = "taps"
    taps = decoder.decode(z)
    decoder.channels_last_()
    last = decoder.decode(z)
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in decoder.parameters() if p.dim() == 5)
    assert (taps - ref).abs().max().item() < 1e-5 and (last - ref).abs().max().item() < 1e-5


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
