"""Fixtures for every test folder. Shared builders and drivers live in tests/helpers (`import helpers`:
pytest puts tests/ on the path, see pyproject.toml), so no test reaches into another folder."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import pytest


@pytest.fixture(scope="session")
def reference_model_folder(tmp_path_factory) -> Callable[..., Path]:
    """``folder(kind, seed=0)``: a tiny random model folder ('base', 'mid' or 'distilled') saved by the
    diffusers reference pipeline, made once per session for each (kind, seed)."""
    from helpers.tiny_pipelines import save_model_folder

    made: dict[tuple[str, int], Path] = {}

    def folder(kind: str, seed: int = 0) -> Path:
        if (kind, seed) not in made:
            path = tmp_path_factory.mktemp(f"model-{kind}-{seed}") / f"helios-tiny-{kind}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                save_model_folder(kind, path, seed=seed)
            made[kind, seed] = path
        return made[kind, seed]

    return folder
