"""The small model's parts (helios.train.tiny): the 4x VAE and its pinned posterior."""

import torch

from helios.train.tiny import FRAME_SIZE, build_vae, make_posterior_sharp


def test_tiny_vae_compresses_4x_in_space_and_time():
    vae = build_vae().eval()
    assert vae.config.scale_factor_spatial == 4 and vae.config.scale_factor_temporal == 4
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 17, *FRAME_SIZE)).latent_dist.mean
    assert tuple(z.shape) == (1, 16, 5, FRAME_SIZE[0] // 4, FRAME_SIZE[1] // 4)


def test_sharp_posterior_samples_equal_the_means():
    torch.manual_seed(0)
    vae = build_vae().eval()
    x = torch.rand(1, 3, 5, *FRAME_SIZE) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        make_posterior_sharp(vae)
        after = vae.encode(x).latent_dist
    assert before.std.mean() > 0.5  # a fresh encoder's posterior is wide
    assert torch.equal(after.mean, before.mean)  # only the log-variance half changed
    assert after.std.max() < 3e-3
    g = torch.Generator().manual_seed(0)
    assert (after.sample(g) - after.mean).abs().max() < 0.02
