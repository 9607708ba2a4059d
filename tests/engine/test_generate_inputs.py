"""Bad inputs to generation get clear errors and leave nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import helios
from helios.cli import app
from helios.engine.components import ModelFolderError
from helios.engine.pipeline import InputError, plan_frames
from helios.engine.prompts import PromptSchedule, PromptScheduleError
from helpers.tiny_pipelines import save_model_folder

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distilled")
    save_model_folder("distilled", folder, seed=3)
    return folder


def cli(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_cli_generates_an_mp4(model_dir, tmp_path):
    from helios.engine.video_io import video_info

    out = tmp_path / "v.mp4"
    r = cli("two red circles", "--model", model_dir, "--frames", 40, "--height", 64, "--width", 64, "--out", out)
    assert r.exit_code == 0, r.output
    assert "65 frames will be produced" in r.output and "wrote" in r.output
    assert video_info(out).frames == 65
    assert not list(tmp_path.glob("*.partial.mp4"))


@pytest.mark.parametrize("args,message", [
    (("", ), "prompt is empty"),
    (("x", "--frames", 0), "num_frames must be a positive integer"),
    (("x", "--frames", -5), "num_frames must be a positive integer"),
    (("x", "--then", "0:y"), "out of order"),
    (("x", "--then", "2:y", "--then", "1:z"), "out of order"),
    (("x", "--then", "3:"), "empty"),
    (("x", "--height", 100), "multiples of 64"),
    (("x", "--width", 0), "multiples of 64"),
])
def test_cli_bad_arguments(model_dir, tmp_path, args, message):
    out = tmp_path / "v.mp4"
    r = cli(*args, "--model", model_dir, "--out", out)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists() and not list(tmp_path.glob("*.mp4"))


def test_cli_bad_model_folders(model_dir, tmp_path):
    r = cli("x", "--model", tmp_path / "missing", "--out", tmp_path / "v.mp4")
    assert r.exit_code == 2 and "does not exist" in r.output
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "vae")
    r = cli("x", "--model", broken, "--out", tmp_path / "v.mp4")
    assert r.exit_code == 2 and "missing part(s) ['vae']" in r.output
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    r = cli("x", "--model", other, "--out", tmp_path / "v.mp4")
    assert r.exit_code == 2 and "not a Helios pipeline" in r.output
    assert not list(tmp_path.glob("*.mp4"))


def test_cli_unreadable_image_and_video(model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = cli("x", "--model", model_dir, "--image", bad, "--height", 64, "--width", 64, "--out", tmp_path / "v.mp4")
    assert r.exit_code == 2 and "not a readable image" in r.output
    r = cli("x", "--model", model_dir, "--video", tmp_path / "nope.mp4", "--height", 64, "--width", 64,
            "--out", tmp_path / "v.mp4")
    assert r.exit_code == 2 and "nope.mp4" in r.output
    r = cli("x", "--model", model_dir, "--image", bad, "--video", bad, "--out", tmp_path / "v.mp4")
    assert r.exit_code == 2 and "not both" in r.output


def test_video_too_short_for_v2v(model_dir):
    pipe = helios.load_pipeline(model_dir)
    with pytest.raises(InputError, match="needs at least 33"):
        next(pipe.stream("x", video=torch.zeros(3, 20, 64, 64), num_frames=33, height=64, width=64))


def test_image_of_the_wrong_size_or_shape(model_dir):
    pipe = helios.load_pipeline(model_dir)
    with pytest.raises(InputError, match="resize it"):
        next(pipe.stream("x", image=torch.zeros(3, 32, 64), num_frames=33, height=64, width=64))
    with pytest.raises(InputError, match="3 colour channels"):
        next(pipe.stream("x", image=torch.zeros(4, 64, 64), num_frames=33, height=64, width=64))


def test_preset_that_the_scheduler_cannot_run(model_dir):
    pipe = helios.load_pipeline(model_dir)
    with pytest.raises(InputError, match="preset 'base'"):
        next(pipe.stream("x", settings="base", num_frames=33, height=64, width=64))


def test_frame_plan_rounds_like_the_reference():
    assert plan_frames(33).frames == 33 and plan_frames(33).note is None
    assert (plan_frames(40).chunks, plan_frames(40).frames) == (2, 65)
    assert (plan_frames(132).chunks, plan_frames(132).frames) == (4, 129)
    assert plan_frames(1440).frames == 1449
    assert "1449 frames will be produced" in plan_frames(1440).note


def test_prompt_schedule_blends_like_the_official_interactive_mode():
    s = PromptSchedule(((0, "a"), (2, "b")), blend=3)
    assert s.at(1) == (("a", None), 0.0)
    assert s.at(2) == (("a", "b"), 0.0)
    assert s.at(3) == (("a", "b"), 0.5)
    assert s.at(4) == (("a", "b"), 1.0)
    assert s.at(5) == (("b", None), 0.0)
    with pytest.raises(PromptScheduleError, match="chunk 0"):
        PromptSchedule(((1, "a"),))


def test_a_model_folder_can_carry_its_own_sampling_defaults(model_dir, tmp_path):
    # The small bundled model samples at 20 steps, CFG 2 (model_index.json `helios_default_sampling`): they
    # apply to the model's own preset unless the caller says otherwise; another preset keeps its own values.
    own = tmp_path / "own"
    shutil.copytree(model_dir, own)
    index = json.loads((own / "model_index.json").read_text())
    (own / "model_index.json").write_text(json.dumps({**index, "helios_default_sampling": {
        "steps": 3, "guidance_scale": 2.0}}))
    spec = helios.load_pipeline(own).spec
    assert spec.default_preset == "distilled"
    s = spec.resolve_settings(None)
    assert (s.pyramid_steps, s.guidance_scale) == ((3, 3, 3), 2.0)
    assert spec.resolve_settings("distilled", guidance_scale=1.0).guidance_scale == 1.0  # the caller's wins
    mid = spec.resolve_settings("mid")
    assert (mid.pyramid_steps, mid.guidance_scale) == ((20, 20, 20), 5.0)  # another preset: the official one
    plain = helios.load_pipeline(model_dir).spec.resolve_settings(None)
    assert (plain.pyramid_steps, plain.guidance_scale) == ((2, 2, 2), 1.0)
    for bad, message in [({"steps": 0}, "steps must be a positive whole number, got 0"),
                         ({"guidance": 2}, "keys among ['steps', 'guidance_scale']"),
                         ({"guidance_scale": "high"}, "guidance_scale must be a number >= 0, got 'high'")]:
        (own / "model_index.json").write_text(json.dumps({**index, "helios_default_sampling": bad}))
        r = cli("x", "--model", own, "--out", tmp_path / "v.mp4")
        assert r.exit_code == 2 and message in r.output, r.output


# ---- checked before the model is loaded ---------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Fails a test whose command reaches the model load: every refusal below must come before it."""
    import helios.engine.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(pipeline, "load_pipeline", refuse)


@pytest.mark.parametrize("args,message", [
    (("x", "--height", 37), "multiples of 64"),
    (("x", "--frames", 100_000_000), "more than the limit of 7260"),
    (("x", "--frames", 2**62), "raise the limit with --max-frames"),
    (("x", "--frames", 400, "--max-frames", 300), "400 frames is more than the limit of 300"),
    (("x", "--then", "6:y"), "the last is chunk 3, from frame 99 (4.1 s at 24 fps)"),
    (("x", "--frames", 33, "--then", "1:y"), "1 chunk(s), numbered from 0: the last is chunk 0"),
    (("x", "--device", "cuda"), "no CUDA GPU is available here"),
    (("x", "--device", "gpu"), "is not a device: use cpu, cuda or cuda:N"),
    (("x", "--fps", 0), "--fps must be at least 1"),
])
def test_refused_before_loading(model_dir, tmp_path, no_loading, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "v.mp4"
    r = cli(*args, "--model", model_dir, "--out", out)
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output and not list(tmp_path.iterdir())


def test_output_paths_refused_before_loading(model_dir, tmp_path, no_loading):
    folder = tmp_path / "taken.mp4"
    folder.mkdir()
    r = cli("x", "--model", model_dir, "--out", folder)
    assert r.exit_code == 2 and "is a folder: give a file name" in r.output, r.output
    r = cli("x", "--model", model_dir, "--out", "/proc/helios-video.mp4")  # no file can be made under /proc
    assert r.exit_code == 2 and "cannot write in /proc" in r.output, r.output
    r = cli("x", "--model", model_dir, "--out", tmp_path / "v.avi")
    assert r.exit_code == 2 and "--out must end in .mp4" in r.output
    r = cli("x", "--model", model_dir, "--out", tmp_path / "nowhere" / "v.mp4")
    assert r.exit_code == 2 and "does not exist: create it first" in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["taken.mp4"]


def test_a_schedule_beyond_the_video_is_an_engine_error_too(model_dir):
    pipe = helios.load_pipeline(model_dir)
    with pytest.raises(InputError, match="starts at chunk 2, but 65 frames make 2 chunk"):
        next(pipe.stream(PromptSchedule(((0, "a"), (2, "b"))), num_frames=40, height=64, width=64))


def test_frames_round_up_to_a_whole_chunk_with_a_note(model_dir, tmp_path):
    r = cli("x", "--model", model_dir, "--frames", 1, "--height", 64, "--width", 64, "--out", tmp_path / "v.mp4")
    assert r.exit_code == 0, r.output
    assert "1 frames requested" in r.output and "33 frames will be produced" in r.output


def _interrupting_stream(chunks_before: int):
    def stream(self, *args, **kwargs):
        from helios.engine.pipeline import Chunk

        for k in range(chunks_before):
            yield Chunk(index=k, frames=torch.zeros(33, 64, 64, 3, dtype=torch.uint8), first_frame=33 * k,
                        prompt="x", seconds=0.0, total_chunks=4)
        raise KeyboardInterrupt

    return stream


def test_ctrl_c_before_the_first_chunk_says_nothing_was_written(model_dir, tmp_path, monkeypatch):
    from helios.engine.pipeline import HeliosVideoPipeline

    monkeypatch.setattr(HeliosVideoPipeline, "stream", _interrupting_stream(0))
    r = cli("x", "--model", model_dir, "--height", 64, "--width", 64, "--out", tmp_path / "v.mp4")
    assert r.exit_code == 130 and "nothing was written" in r.output and "partial" not in r.output, r.output
    assert not list(tmp_path.iterdir())


def test_ctrl_c_after_a_chunk_names_the_kept_file(model_dir, tmp_path, monkeypatch):
    from helios.engine.pipeline import HeliosVideoPipeline

    monkeypatch.setattr(HeliosVideoPipeline, "stream", _interrupting_stream(1))
    r = cli("x", "--model", model_dir, "--height", 64, "--width", 64, "--out", tmp_path / "v.mp4")
    kept = tmp_path / "v.partial.mp4"
    assert r.exit_code == 130 and f"33 frames written so far are kept in {kept}" in r.output, r.output
    assert kept.is_file() and not (tmp_path / "v.mp4").exists()


def test_missing_serve_extra_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    r = runner.invoke(app, ["serve"])
    assert r.exit_code == 2 and "needs the 'serve' extra (uvicorn not installed)" in r.output, r.output
    assert "pip install" in r.output and "Traceback" not in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"helios {helios.__version__}"


# ---- the bundled model: prompts it knows -----------------------------------------------------------------


def test_bundled_model_is_public_and_loads_by_default():
    folder = helios.bundled_model()
    assert (folder / "model_index.json").is_file()
    pipe = helios.load_pipeline()
    assert pipe.c.folder == folder and pipe.spec.example_prompt


def test_unknown_prompt_words_are_warned_about_in_one_line(tmp_path, no_loading):
    # The refusal of --height 37 comes after the warning, so nothing is generated.
    r = runner.invoke(app, ["generate", "a red fox running through snow", "--height", "37", "--out",
                            str(tmp_path / "v.mp4")])
    warning = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, r.output
    assert "never saw the word(s) fox, running, through, snow" in warning[0]
    assert '"two red circles bouncing on a blue background"' in warning[0]
    r = runner.invoke(app, ["generate", "three green squares bouncing on a yellow background", "--height", "37",
                            "--out", str(tmp_path / "v.mp4")])
    assert "warning" not in r.output and "multiples of" in r.output, r.output


def test_the_bundled_vocabulary_is_the_training_captions_words():
    from helios.scenes import caption_vocabulary
    from helios.train.synthetic import SyntheticConfig, SyntheticVideo

    spec = helios.load_pipeline().spec
    assert list(spec.vocabulary) == caption_vocabulary()
    for i in range(20):  # every word of real training captions is in it
        assert spec.unknown_words(SyntheticVideo.from_index(i, SyntheticConfig()).caption) == []


def test_info_describes_a_model_folder(model_dir):
    r = runner.invoke(app, ["info"])
    assert r.exit_code == 0, r.output
    assert "presets:         base (default base" in r.output and "default size:    64x64" in r.output
    assert "vocabulary:      a and background black" in r.output
    assert "transformer 8.1M" in r.output
    r = runner.invoke(app, ["info", str(model_dir)])
    assert r.exit_code == 0 and "presets:         distilled, mid (default distilled)" in r.output, r.output
    assert "vocabulary:      any" in r.output
    r = runner.invoke(app, ["info", str(model_dir / "vae")])
    assert r.exit_code == 2 and "has no model_index.json" in r.output


def test_models_lists_the_bundled_and_the_given_folders(model_dir, tmp_path):
    (tmp_path / "distilled").symlink_to(model_dir)
    (tmp_path / "not-a-model").mkdir()
    r = runner.invoke(app, ["models", str(tmp_path)])
    lines = r.output.splitlines()
    assert r.exit_code == 0 and len(lines) == 2, r.output
    assert lines[0].startswith(str(helios.bundled_model())) and "presets base, 64x64" in lines[0]
    assert lines[1].startswith(str(tmp_path / "distilled")) and "presets distilled/mid" in lines[1]


def test_missing_eval_extra_is_one_line(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = runner.invoke(app, ["eval", str(tmp_path / "v.mp4")])
    assert r.exit_code == 2 and "needs the 'eval' extra (matplotlib not installed)" in r.output, r.output
