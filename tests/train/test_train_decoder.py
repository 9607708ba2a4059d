"""`helios train-decoder` (helios.train.decoder): the loss falls, files are atomic, a resumed run is the same run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helios.model.taehv import load_taehv
from helios.train.decoder import DecoderTrainConfig, DecoderTrainError, psnr, save_decoder, ssim, train_decoder


def config(model, out, **kw) -> DecoderTrainConfig:
    """A few 16x16 crops of procedural clips, one 32x32 held-out chunk, a decoder of a few thousand weights."""
    base = dict(model=model, out=out, steps=40, batch=2, lr=3e-3, train_videos=4, test_videos=1, real_fraction=0.0,
                widths=(16, 16, 8, 8), blocks=1, size=(32, 32), crop=16, train_latents=2, save_every=20, seed=1,
                linear_init=False)
    return DecoderTrainConfig(**{**base, **kw})


def no_temporary_files(folder) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_loss_falls_and_every_output_is_written(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = train_decoder(config(tiny_model, out, steps=60), log=lambda m: None)
    first, last = np.mean(result.losses[:8]), np.mean(result.losses[-8:])
    assert last < 0.75 * first, (first, last)
    names = {"taehv.safetensors", "checkpoint.safetensors", "state.pt", "clips.pt", "metrics.json", "loss.png",
             "heldout.png", "frames.png"}
    assert names <= {p.name for p in out.iterdir()} and no_temporary_files(out)
    decoder = load_taehv(out / "taehv.safetensors", latent_channels=16, spatial_factor=8)
    assert decoder.cfg.widths == (16, 16, 8, 8) and not decoder.cfg.encoder
    held_out = result.metrics["summary"]["all"]
    assert held_out["clips"] == 1 and np.isfinite(held_out["psnr"]) and 0 < held_out["ssim"] <= 1
    assert len(held_out["psnr_frames"]) == 1 + 4 * (9 - 1)  # one held-out chunk, scored frame by frame
    # The held-out score improved over training (an eval at step 20 and at the end).
    evals = result.metrics["evals"]
    assert [e["step"] for e in evals] == [20, 40, 60]
    assert evals[-1]["summary"]["all"]["psnr"] > evals[0]["summary"]["all"]["psnr"]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_model, tmp_path):
    straight = train_decoder(config(tiny_model, tmp_path / "a", steps=16, save_every=8), log=lambda m: None)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "clips.pt", tmp_path / "b" / "clips.pt")  # the same clips, made once
    first = train_decoder(config(tiny_model, tmp_path / "b", steps=16, save_every=8, stop_after=8), log=lambda m: None)
    assert first.step == 8
    logs = []
    resumed = train_decoder(config(tiny_model, tmp_path / "b", steps=16, save_every=8, resume=True), log=logs.append)
    assert any("resumed at step 8" in m for m in logs) and resumed.step == 16
    assert resumed.losses == straight.losses
    a, b = load_file(tmp_path / "a" / "checkpoint.safetensors"), load_file(tmp_path / "b" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_checkpoint_write_leaves_the_previous_file(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_decoder(config(tiny_model, out, steps=4, save_every=4), log=lambda m: None)
    path = out / "checkpoint.safetensors"
    before = path.read_bytes()
    decoder = load_taehv(path)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("helios.train.video_data.save_file", broken)
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_decoder(decoder, path)
    assert path.read_bytes() == before and no_temporary_files(out)


def test_a_run_started_from_a_decoder_continues_from_its_weights(tiny_model, tmp_path):
    """--init: step 0 of the new run is the given decoder (its held-out score, not a fresh start's); a decoder
    of another architecture is refused, naming the file."""
    first = train_decoder(config(tiny_model, tmp_path / "a", steps=40, save_every=40), log=lambda m: None)
    start = tmp_path / "a" / "taehv.safetensors"
    fresh = train_decoder(config(tiny_model, tmp_path / "b", steps=1, save_every=1, lr=1e-9), log=lambda m: None)
    went_on = train_decoder(config(tiny_model, tmp_path / "c", steps=1, save_every=1, lr=1e-9, init=start),
                            log=lambda m: None)
    score = lambda r: r.metrics["summary"]["all"]["psnr"]  # noqa: E731
    assert abs(score(went_on) - score(first)) < 0.05 and score(went_on) > score(fresh) + 1.0
    with pytest.raises(DecoderTrainError, match="another architecture"):
        train_decoder(config(tiny_model, tmp_path / "d", widths=(8, 8, 8, 8), init=start), log=lambda m: None)
    assert not (tmp_path / "d" / "clips.pt").exists()  # refused before the clips were made
    with pytest.raises(DecoderTrainError, match="--init"):
        train_decoder(config(tiny_model, tmp_path / "e", init=tmp_path / "missing.safetensors"))


def test_bad_settings_are_refused_before_any_work(tiny_model, tmp_path):
    with pytest.raises(DecoderTrainError, match="vae/config.json"):
        train_decoder(config(tmp_path, tmp_path / "out"))
    with pytest.raises(DecoderTrainError, match="--widths"):
        train_decoder(config(tiny_model, tmp_path / "out", widths=(16, 16)))
    with pytest.raises(DecoderTrainError, match="--crop"):
        train_decoder(config(tiny_model, tmp_path / "out", crop=12))
    assert not (tmp_path / "out").exists()


def test_psnr_and_ssim_of_known_pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 24, generator=g)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
    assert psnr(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.1)) == pytest.approx(20.0)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert 0 < ssim(a, noisy) < ssim(a, (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)) < 1


def test_the_linear_start_computes_the_least_squares_latent_to_rgb_map():
    from types import SimpleNamespace

    from helios.model.taehv import TAEHV
    from helios.train.decoder import latent_rgb_fit, linear_start_, student_config, student_frames

    g = torch.Generator().manual_seed(0)
    vae = SimpleNamespace(z_dim=16, scale_factor_spatial=4, scale_factor_temporal=4)
    mean, std = torch.randn(1, 16, 1, 1, 1, generator=g) * 0.3, torch.rand(1, 16, 1, 1, 1, generator=g) + 0.5
    z = torch.randn(2, 16, 3, 4, 4, generator=g)
    # Frames that are a known linear function of the (soft-clamped) latent above each pixel.
    w, b = torch.randn(3, 16, generator=g) * 0.1, torch.randn(3, generator=g) * 0.1
    raw = torch.tanh((z * std + mean) / 3) * 3
    under = raw[:, :, [0, 1, 1, 1, 1, 2, 2, 2, 2]].repeat_interleave(4, -2).repeat_interleave(4, -1)
    frames = torch.einsum("oc,bcthw->bothw", w, under) + b.view(1, 3, 1, 1, 1)
    fit = latent_rgb_fit(z, frames, mean, std, spatial=4, temporal=4)
    torch.testing.assert_close(fit, torch.cat([w, b[:, None]], 1), rtol=0, atol=1e-4)
    for spare, atol in ((0.0, 1e-4), (1e-2, 0.05)):  # exactly; and up to the small random start of the rest
        student = TAEHV(student_config(vae, (32, 32, 32, 32), 2))
        linear_start_(student, fit, spare=spare)
        with torch.no_grad():
            out = student_frames(student, z, mean, std)
        torch.testing.assert_close(out, frames, rtol=0, atol=atol)
