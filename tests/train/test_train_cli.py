"""`helios train` as a new user meets it: the help names the three stages and where the recipes are,
the packaged recipes are listed and usable by name, and a missing or relative path says so."""

from __future__ import annotations

from typer.testing import CliRunner

from helios.cli import app

runner = CliRunner()


def test_help_names_all_three_stages_and_the_recipes():
    r = runner.invoke(app, ["train", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0
    assert "stage 1 (autoregressive), 2 (pyramid) or 3 (distillation)" in text, text
    assert "--list-recipes" in text and "recipe:NAME" in text and "configs/tiny/" in text


def test_list_recipes_names_each_with_its_stage():
    r = runner.invoke(app, ["train", "--list-recipes"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    for name, stage in [("stage1", 1), ("stage2", 2), ("stage3", 3), ("tiny", 1)]:
        assert any(line.startswith(f"recipe:{name} ") and f"stage {stage}," in line for line in lines), r.output


def test_a_recipe_by_name_is_checked_like_a_config(tmp_path):
    r = runner.invoke(app, ["train", "recipe:tiny"])
    assert r.exit_code == 2 and "config key 'output_dir' = None: required" in r.output, r.output
    r = runner.invoke(app, ["train", "recipe:stage9", "--set", f"output_dir={tmp_path}"])
    assert r.exit_code == 2 and "no recipe 'stage9'" in r.output and "'stage1'" in r.output, r.output
    # The 14B recipe starts from a Hugging Face repo id, which training never downloads.
    r = runner.invoke(app, ["train", "recipe:stage1", "--set", f"output_dir={tmp_path}", "--set",
                            f"data.cache_dir={tmp_path}"])
    assert r.exit_code == 2 and "training reads local folders only: download it first" in r.output, r.output


def test_no_config_and_a_missing_config_are_one_line(tmp_path):
    r = runner.invoke(app, ["train"])
    assert r.exit_code == 2 and "give a config YAML" in r.output and "--list-recipes" in r.output
    r = runner.invoke(app, ["train", str(tmp_path / "stage1.yaml")])
    assert r.exit_code == 2 and "stage1.yaml does not exist" in r.output and "Traceback" not in r.output


def test_a_missing_train_extra_is_one_line(monkeypatch, tmp_path):
    import sys

    import helios

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    r = runner.invoke(app, ["train", "recipe:tiny", "--set", f"output_dir={tmp_path}", "--set",
                            f"model.init_from={helios.bundled_model()}", "--set", "finetune=lora"])
    assert r.exit_code == 2 and "needs the 'train' extra (peft not installed)" in r.output, r.output
    assert not list(tmp_path.iterdir())  # refused before anything was written
