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
