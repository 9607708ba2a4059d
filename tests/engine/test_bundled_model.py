"""The small model shipped in the package: `helios generate PROMPT` with no --model runs on the CPU."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from helios.cli import app, default_model
from helios.engine.video_io import read_video


def test_bundle_is_a_complete_base_model_folder_within_30_mb():
    folder = default_model()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["is_distilled"] is False and index["_class_name"] == "HeliosPipeline"
    # Its own sampling, not the official base preset's CFG 5 (docs/tiny-model.md, "Run 10" and "Bundle default
    # CFG 1.5"), and the one `tiny bundle --kind base` writes.
    from helios.train.tiny import BASE_SAMPLING

    assert index["helios_default_sampling"] == BASE_SAMPLING == {"steps": 20, "guidance_scale": 1.5}
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 30e6, size


def test_generate_without_model_writes_a_moving_video(tmp_path):
    out = tmp_path / "circles.mp4"
    r = CliRunner().invoke(app, ["generate", "two red circles bouncing on a blue background", "--frames", "66",
                                 "--out", str(out), "--seed", "0"])
    assert r.exit_code == 0, r.output
    frames = read_video(out).numpy().astype(np.float32)
    assert frames.shape == (65, 64, 64, 3)
    # Not a still: consecutive frames differ, and the picture is not one flat colour.
    assert np.abs(np.diff(frames, axis=0)).mean() > 0.5
    assert frames.std(axis=(1, 2)).mean() > 5
    # The caption reaches the picture: the background is the caption's colour (the bundle before the
    # VAE fix drew the same colours whatever the prompt). Objects: the next test.
    from helios.eval.metrics import caption_adherence

    scores = caption_adherence(frames.astype(np.uint8), "two red circles bouncing on a blue background")
    assert scores["background_right"] > 0.9, scores


def test_fast_start_reaches_the_engine(tmp_path):
    # A distilled model's first chunk gets twice the steps unless --fast-start.
    from helpers.tiny_pipelines import save_model_folder

    save_model_folder("distilled", tmp_path / "distilled", seed=3)

    def video(*extra: str) -> np.ndarray:
        out = tmp_path / f"v{len(extra)}.mp4"
        r = CliRunner().invoke(app, ["generate", "a red circle bouncing on a blue background", "--frames", "33",
                                     "--out", str(out), "--seed", "0", "--model", str(tmp_path / "distilled"),
                                     "--height", "64", "--width", "64", *extra])
        assert r.exit_code == 0, r.output
        return read_video(out).numpy()

    amplified, fast = video(), video("--fast-start")
    assert amplified.shape == fast.shape == (33, 64, 64, 3)
    assert np.abs(amplified.astype(np.float32) - fast).mean() > 0.1  # random weights: small but clear


def test_bundle_draws_the_captioned_colours_on_held_out_captions():
    """One chunk per held-out caption (seed 0), scored against its caption by helios.eval: run 11's base
    model at its default (20 steps, CFG 1.5) paints the right background in 99% of these frames, blobs of
    the captioned object colours in 89% of (frame, object) pairs, the captioned counts in 30% of frames
    (at CFG 2: 88%, 87%, 28%); run 10's at CFG 2 88%, 81%, 28%; run 9's distilled model 88%, 33% and 5%;
    run 7's 50%, 0% and 0% (docs/tiny-model.md). The bounds sit below run 10 and above run 9: a bundle
    that stops drawing its objects fails."""
    import helios
    from helios.eval.metrics import as_uint8_numpy, caption_adherence
    from helios.train.tiny import held_out_captions

    pipe = helios.load_pipeline(default_model(), device="cpu", optimize=False)
    scores = [caption_adherence(as_uint8_numpy(pipe.generate(c, num_frames=33, seed=0)), c)
              for c in held_out_captions(8)]
    background = np.mean([s["background_right"] for s in scores])
    objects = np.mean([s["objects_present"] for s in scores])
    counts = np.mean([s["count_match"] for s in scores])
    assert background > 0.7, scores
    assert objects > 0.5, scores
    assert counts > 0.15, scores
