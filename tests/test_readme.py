"""The README's commands run as written (those that need no GPU and no downloaded weights), on the
bundled model, and say what the README says they do; a README command this test does not know fails it,
so the README cannot drift from the code.

To stay fast, `helios generate` runs with `--steps 2` added and `helios train` with `--set max_steps=2`
(and its output folder under the test's temporary folder); everything else is as in the README.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import helios
from helios.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Commands left out, and why: each needs a GPU, downloaded weights, a server left running, or is the
# install or the test suite itself.
NOT_RUN = ("pip install", "--model /models/", "torchrun", "python3 -m pytest", "helios serve", "run.yaml")

# What each README command must print (a fragment of its output); commands are matched by their start.
EXPECTED = {
    'helios generate "two red circles bouncing on a blue background" --out circles.mp4':
        "wrote circles.mp4: 129 frames",
    'helios generate "two red circles bouncing on a blue background" --then':
        "wrote steer.mp4: 129 frames",
    "helios info": "vocabulary:      a and background black blue bouncing",
    "helios models": str(helios.bundled_model()),
    "helios eval circles.mp4": "circles",
    "helios train --list-recipes": "recipe:stage3",
    "helios train configs/tiny/cpu.yaml": "trained to step 2",
}


def shell_commands(text: str) -> list[str]:
    """Every command line of the README's bash blocks, without its trailing comment."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def runnable() -> list[str]:
    return [c for c in shell_commands(README) if not any(skip in c for skip in NOT_RUN)]


def expected_for(command: str) -> str:
    matches = [fragment for start, fragment in EXPECTED.items() if command.startswith(start)]
    assert len(matches) == 1, f"the README command {command!r} is not known to tests/test_readme.py: add it"
    return matches[0]


def test_every_runnable_readme_command_is_known():
    commands = runnable()
    assert len(commands) == len(EXPECTED), commands
    for command in commands:
        expected_for(command)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all the commands, in README order (eval reads the video generate wrote)."""
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("command", runnable())
def test_readme_command(command, workdir, monkeypatch):
    args = shlex.split(command)
    assert args[0] == "helios", command
    args = args[1:]
    if args[0] == "generate":
        args += ["--steps", "2"]
    if args[:2] == ["train", "configs/tiny/cpu.yaml"]:
        args = ["train", str(ROOT / "configs/tiny/cpu.yaml"), "--set", "max_steps=2",
                "--set", f"output_dir={workdir / 'runs'}"]
        monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository root, as the README says
    else:
        monkeypatch.chdir(workdir)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (command, result.output)
    assert expected_for(command) in result.output, (command, result.output)
    if args[0] == "generate":
        assert (workdir / args[args.index("--out") + 1]).is_file()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippet_runs_as_written(tmp_path):
    (snippet,) = python_blocks(README)
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["0 (33, 64, 64, 3)", "1 (32, 64, 64, 3)"], run.stdout
    from helios.engine.video_io import video_info

    assert video_info(tmp_path / "circles-py.mp4").frames == 33
