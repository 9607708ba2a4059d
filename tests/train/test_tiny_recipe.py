"""The small model's parts (helios.train.tiny): the 4x VAE and its pinned posterior, the pretrained text encoder."""

import json
from pathlib import Path

import pytest
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


def first_token_background_accuracy(encoder, tokenizer) -> float:
    """Nearest-centroid accuracy of the caption's background colour read from the *first* token's
    output alone ("a"/"two"...: the background word is far from it), on held-out captions."""
    from helios.train.synthetic import SyntheticConfig, SyntheticVideo
    from helios.train.tiny import caption_targets

    texts = [SyntheticVideo.from_index(i, SyntheticConfig(seed=4242)).caption for i in range(600)]
    tok = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        first = encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state[:, 0]
    bg = torch.tensor([caption_targets(t)[0] for t in texts])
    fit, test = slice(0, 400), slice(400, 600)
    centroids = torch.stack([first[fit][bg[fit] == c].mean(0) for c in range(10)])
    return (torch.cdist(first[test], centroids).argmin(1) == bg[test]).float().mean().item()


def test_caption_targets_name_background_and_counts():
    from helios.scenes import COLORS, SHAPES
    from helios.train.tiny import caption_targets

    bg, counts = caption_targets("two red circles and a green square bouncing on a blue background")
    assert bg == list(COLORS).index("blue")
    pair = {(c, s): counts[i * len(SHAPES) + j] for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES)}
    assert pair[("red", "circle")] == 2 and pair[("green", "square")] == 1 and sum(counts) == 3


def test_pretrained_text_encoder_puts_the_scene_in_every_token():
    # A random frozen encoder left the GPU-trained transformers deaf to their prompts; after the caption
    # pretraining even the first token's output names the background colour (random: ~chance).
    from helios.train.tiny import build_text_encoder, build_tokenizer

    tokenizer = build_tokenizer()
    random_acc = first_token_background_accuracy(build_text_encoder(pretrain_steps=0), tokenizer)
    trained_acc = first_token_background_accuracy(build_text_encoder(pretrain_steps=200), tokenizer)
    assert random_acc < 0.4
    assert trained_acc > 0.9


def sharp_copy(folder, dst):
    """The test model folder with its VAE's posterior pinned sharp (samples = means), as the tiny recipe's."""
    import shutil

    from diffusers import AutoencoderKLWan

    shutil.copytree(folder, dst)
    vae = AutoencoderKLWan.from_pretrained(dst / "vae")
    make_posterior_sharp(vae)
    vae.save_pretrained(dst / "vae")
    return dst


def test_synthetic_cache_holds_each_videos_sections_and_caption(tiny_model, tmp_path, capsys):
    from helios.train.data import ModelParts
    from helios.train.synthetic import SyntheticVideo
    from helios.train.tiny import MAX_TOKENS, build_cache, scene_config
    from helios.train.video_data import LatentCacheDataset, load_cache_entry

    folder = sharp_copy(tiny_model, tmp_path / "model")
    out = tmp_path / "cache"
    build_cache(folder, out, videos=3, device="cpu", clip_frames=66, batch=2)
    ds = LatentCacheDataset(out)
    assert len(ds) == 3
    parts = ModelParts(folder, text_max_length=MAX_TOKENS)
    cfg = scene_config(num_frames=66)
    by_source = {load_cache_entry(f)["metadata"]["source"]: load_cache_entry(f) for f in ds.files}
    for i in range(3):
        e = by_source[f"synthetic:{i}"]
        video = SyntheticVideo.from_index(i, cfg)
        assert e["caption"] == video.caption and e["metadata"]["num_frames"] == "66"
        clip = video.clip(0, 66)
        # batched encode of every section of every video = each 33-frame section encoded alone
        alone = torch.cat([parts.encode_video(clip[None, :, s:s + 33]) for s in (0, 33)])
        assert e["latents"].shape == alone.shape
        torch.testing.assert_close(e["latents"], alone, atol=0.05, rtol=0)
        torch.testing.assert_close(e["prompt_embeds"].float(), parts.encode_text(video.caption), atol=1e-2, rtol=0)

    # resumable: a second run builds nothing; a removed entry is rebuilt alone
    capsys.readouterr()
    build_cache(folder, out, videos=3, device="cpu", clip_frames=66)
    assert "0 built, 3 already cached" in capsys.readouterr().out
    Path(ds.files[1]).unlink()
    build_cache(folder, out, videos=3, device="cpu", clip_frames=66)
    assert "1 built, 2 already cached" in capsys.readouterr().out


def test_preloaded_cache_gives_the_same_samples(latent_cache):
    from helios.train.history import HistoryLayout
    from helios.train.video_data import LatentCacheDataset

    layout = HistoryLayout()
    lazy = LatentCacheDataset(latent_cache, layout=layout, seed=3)
    held = LatentCacheDataset(latent_cache, layout=layout, seed=3).preload()
    for epoch in range(3):
        lazy.set_epoch(epoch)
        held.set_epoch(epoch)
        for i in range(len(lazy)):
            a, b = lazy[i], held[i]
            assert a["section_index"] == b["section_index"] and a["caption"] == b["caption"]
            for k in ("anchor", "history", "target", "prompt_embeds"):
                assert torch.equal(a[k], b[k]), k
    # the held entries are not changed by handing out samples
    assert "latents" in held._loaded[0] and held._loaded[0]["latents"].shape[0] == 4


def test_reconstruction_error_is_reported_per_latent_frame():
    # The diagnostic that exposed a VAE trained on 17-frame clips: exact for the first frames of a
    # chunk, broken from RGB frame 17 on. A stand-in VAE that reproduces exactly that must show it.
    from types import SimpleNamespace

    from helios.train.tiny import CHUNK_FRAMES, reconstruction_error_per_latent_frame

    class HalfChunkVAE:
        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):
            out = z.clone()
            out[:, :, 17:] = 0.0
            return SimpleNamespace(sample=out)

    err = reconstruction_error_per_latent_frame(HalfChunkVAE(), clips=2)
    assert len(err) == 1 + (CHUNK_FRAMES - 1) // 4  # 9 latent frames
    assert max(err[:5]) == 0.0  # latent frames 0-4 = RGB frames 0-16
    assert min(err[5:]) > 0.1


def test_the_object_error_sees_a_vae_that_loses_the_objects():
    # Run 9's VAE scored 0.07-0.10 per latent frame over whole frames while it faded its objects after
    # frame 0: over the objects' pixels only, a VAE that paints every pixel the background must score badly.
    from types import SimpleNamespace

    from helios.train.tiny import reconstruction_error_per_latent_frame

    class BackgroundOnlyVAE:
        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):  # each frame's median colour everywhere: the background, no objects
            return SimpleNamespace(sample=z.flatten(3).median(dim=3).values[..., None, None].expand_as(z))

    frame = reconstruction_error_per_latent_frame(BackgroundOnlyVAE(), clips=2)
    objects = reconstruction_error_per_latent_frame(BackgroundOnlyVAE(), clips=2, region="objects")
    assert min(objects) > 0.5  # an object's colour is far from the background's ([-1, 1] scale)
    assert max(frame) < min(objects) / 3
    with pytest.raises(ValueError, match="region"):
        reconstruction_error_per_latent_frame(BackgroundOnlyVAE(), clips=1, region="object")


def test_the_vae_loss_weighs_object_pixels():
    from helios.train.tiny import clip_and_object_mask, reconstruction_loss, scene_config
    from helios.train.synthetic import SyntheticVideo

    x, mask = clip_and_object_mask(SyntheticVideo.from_index(0, scene_config()), 0, 9)
    assert x.shape[1:] == mask.shape and 0 < mask.mean() < 0.5 and set(mask.unique().tolist()) == {0.0, 1.0}
    x, mask = x[None], mask[None]
    off_objects = x + 0.1 * (1 - mask)[:, None]  # wrong on the background only
    on_objects = x + 0.1 * mask[:, None]  # wrong on the objects only
    plain = torch.nn.functional.l1_loss(on_objects, x) + torch.nn.functional.mse_loss(on_objects, x)
    assert torch.allclose(reconstruction_loss(on_objects, x, mask, 0.0), plain)
    # Weighted, an error on the objects costs (1 + w) / (1 + w * area) times more (area: the objects'
    # fraction of the pixels), and one on the background less than unweighted.
    area = mask.mean()
    assert torch.allclose(reconstruction_loss(on_objects, x, mask, 10.0), plain * 11 / (1 + 10 * area))
    assert reconstruction_loss(on_objects, x, mask, 10.0) > 2 * plain
    assert reconstruction_loss(off_objects, x, mask, 10.0) < reconstruction_loss(off_objects, x, mask, 0.0)


def test_the_vae_learning_rate_warms_up_then_decays():
    # A trained VAE continued at full rate with a fresh optimizer went from loss 0.18 to 1.09 in two steps.
    from helios.train.tiny import vae_learning_rate

    assert vae_learning_rate(1e-3, 0, 0.0, warmup_steps=20) == pytest.approx(1e-3 / 20)
    assert vae_learning_rate(1e-3, 9, 0.0, warmup_steps=20) == pytest.approx(1e-3 / 2)
    assert vae_learning_rate(1e-3, 19, 0.0, warmup_steps=20) == pytest.approx(1e-3)
    assert vae_learning_rate(1e-3, 500, 0.5, warmup_steps=20) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert vae_learning_rate(1e-3, 500, 1.0, warmup_steps=20) == pytest.approx(5e-5)
    assert vae_learning_rate(1e-3, 0, 0.0, warmup_steps=0) == pytest.approx(1e-3)  # no warm-up


def test_an_init_made_again_from_its_vae_is_the_same(tiny_model, tmp_path, monkeypatch):
    # The drift study trains its second stage-1 model in another GPU run: `tiny vae --steps 0
    # --init-vae` on the first run's VAE must give the same VAE, latent statistics and fresh transformer.
    import sys

    from safetensors.torch import load_file

    from helios.train import tiny

    def make(out: Path, vae: Path, steps: int) -> Path:
        monkeypatch.setattr(sys, "argv", ["tiny", "vae", str(out), "--steps", str(steps), "--batch", "1",
                                          "--frames", "5", "--init-vae", str(vae), "--text-pretrain-steps", "0",
                                          "--device", "cpu"])
        tiny.main()
        return out

    first = make(tmp_path / "first", tiny_model / "vae", steps=1)  # the first run trains its VAE
    again = make(tmp_path / "again", first / "vae", steps=0)
    for part in ("vae", "transformer"):
        a = {k: v for f in sorted((first / part).glob("*.safetensors")) for k, v in load_file(f).items()}
        b = {k: v for f in sorted((again / part).glob("*.safetensors")) for k, v in load_file(f).items()}
        assert a.keys() == b.keys() and a, part
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    cfg_a = json.loads((first / "vae" / "config.json").read_text())
    cfg_b = json.loads((again / "vae" / "config.json").read_text())
    assert cfg_a["latents_mean"] == cfg_b["latents_mean"] and cfg_a["latents_std"] == cfg_b["latents_std"]


def test_decoder_only_vae_training_leaves_the_latents_as_they_were():
    # The shipped transformers learnt the shipped encoder's latents: a decoder trained alone must not
    # move the encoder (nor the normalisation), so the new decoder can go into the shipped bundle.
    from helios.train.tiny import decoder_parameters, train_vae

    torch.manual_seed(0)
    vae = build_vae()
    make_posterior_sharp(vae)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    decoder = {id(p) for p in decoder_parameters(vae)}
    decoder_keys = {k for k, p in vae.named_parameters() if id(p) in decoder}
    train_vae(vae, steps=2, batch=1, frames=5, lr=1e-3, warmup_steps=0, decoder_only=True)
    after = vae.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= decoder_keys  # only the decoder's weights moved
    assert any(k.startswith("decoder.") for k in moved)
    assert all(p.requires_grad for p in vae.parameters())  # left trainable, as a normal run leaves it


def test_decoder_only_needs_a_trained_vae(tmp_path, monkeypatch, capsys):
    import sys

    from helios.train import tiny

    monkeypatch.setattr(sys, "argv", ["tiny", "vae", str(tmp_path / "m"), "--decoder-only", "--steps", "1"])
    with pytest.raises(SystemExit):
        tiny.main()
    assert "--decoder-only trains the decoder of a trained VAE: give it with --init-vae" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_base_and_mid_bundles_carry_their_own_sampling_and_a_distilled_one_none(tiny_model, tmp_path):
    # `tiny bundle --kind base` writes BASE_SAMPLING and `--kind mid` MID_SAMPLING (the official presets'
    # CFG 5 oversaturates the small model); none is inherited from the folder bundled.
    import helios
    from helios.sampling.sampler import preset
    from helios.train.tiny import BASE_SAMPLING, MID_SAMPLING, bundle

    base = bundle(tiny_model, tmp_path / "base", kind="base")
    assert json.loads((base / "model_index.json").read_text())["helios_default_sampling"] == BASE_SAMPLING
    s = helios.load_pipeline(base).resolve_settings(None)
    assert (s.pyramid_steps, s.steps, s.guidance_scale) == (None, BASE_SAMPLING["steps"], BASE_SAMPLING["guidance_scale"])
    mid = bundle(base, tmp_path / "mid", kind="mid")
    assert json.loads((mid / "model_index.json").read_text())["helios_default_sampling"] == MID_SAMPLING
    s = helios.load_pipeline(mid).resolve_settings(None)
    assert s.guidance_scale == MID_SAMPLING["guidance_scale"] != 5.0  # not the official mid preset's CFG 5
    assert s.pyramid_steps == preset("mid").pyramid_steps  # its steps stay the preset's
    distilled = bundle(mid, tmp_path / "distilled", kind="distilled")
    assert "helios_default_sampling" not in json.loads((distilled / "model_index.json").read_text())
    distilled_settings = helios.load_pipeline(distilled).resolve_settings(None)
    assert distilled_settings.guidance_scale == preset("distilled").guidance_scale


def test_bundles_carry_the_caption_vocabulary_and_an_example_prompt(tiny_model, tmp_path):
    # `helios generate` warns about prompt words outside it; the server page shows the example.
    import helios
    from helios.scenes import EXAMPLE_CAPTION, caption_vocabulary
    from helios.train.tiny import bundle

    spec = helios.load_pipeline(bundle(tiny_model, tmp_path / "base", kind="base")).spec
    assert list(spec.vocabulary) == caption_vocabulary() and spec.example_prompt == EXAMPLE_CAPTION
    assert spec.unknown_words(EXAMPLE_CAPTION) == [] and spec.unknown_words("a red fox") == ["fox"]
