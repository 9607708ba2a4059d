"""tests/train: the tensors here are small, so run torch single-threaded (intra-op threads only add
contention on a loaded 2-core CI box); the previous setting is restored after each test.

Training-loop tests share one tiny random model folder (the reference layout, 64x64 frames ->
8x8 latents) and one latent cache of three synthetic videos encoded with that folder's VAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_threaded_torch():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model(reference_model_folder) -> Path:
    return reference_model_folder("mid")


@pytest.fixture(scope="session")
def latent_cache(tmp_path_factory, tiny_model) -> Path:
    """Three 132-frame synthetic videos -> 4 sections of 9 latent frames each (8x8)."""
    from helios.runtime import seeded_generator
    from helios.train.data import ModelParts
    from helios.train.synthetic import SyntheticConfig, export_synthetic_videos
    from helios.train.video_data import build_latent_cache

    root = tmp_path_factory.mktemp("train-cache")
    captions = export_synthetic_videos(root / "videos", 3, SyntheticConfig(height=64, width=64, num_frames=132))
    parts = ModelParts(tiny_model, text_max_length=16)
    gen = seeded_generator(0)
    build_latent_cache(root / "videos", captions, root / "cache", lambda v: parts.encode_video(v, gen),
                       parts.encode_text, num_frames=132, size=(64, 64), embed_dtype=torch.float32, verbose=False)
    return root / "cache"


@pytest.fixture
def make_config(tmp_path, tiny_model, latent_cache):
    """A quiet CPU config on the tiny model and cache; keyword arguments are dotted-key overrides."""
    from helios.train.config import load_config

    def make(out: str = "run", **over: Any) -> dict:
        base = {
            "recipe": "tiny", "output_dir": str(tmp_path / out), "device": "cpu", "max_steps": 4,
            "model": {"init_from": str(tiny_model)},
            "data": {"source": "cache", "cache_dir": str(latent_cache), "text_max_length": 16},
            "batch": {"per_gpu": 2},
            "logging": {"progress": False, "tensorboard": False},
            "validation": {"enabled": False, "height": 64, "width": 64, "num_frames": 33,
                           "pyramid_steps": [1, 1, 1], "guidance_scale": 1.0},
            "export": {"enabled": False},
            "checkpointing": {"every_steps": 2, "keep_last": 2},
        }
        sets = [f"{k}={v}" for k, v in over.items()]
        return load_config(base, sets)

    return make
