"""Our engine reproduces the diffusers reference pipelines frame for frame (same seed, same settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import helios
from helpers.tiny_pipelines import contiguous_outputs, save_model_folder

PRESET_ARGS = {
    "base": (dict(num_inference_steps=3, guidance_scale=5.0), dict(steps=3, guidance_scale=5.0)),
    "mid": (dict(pyramid_num_inference_steps_list=[2, 2, 2], guidance_scale=5.0),
            dict(steps=2, guidance_scale=5.0)),
    "distilled": (dict(pyramid_num_inference_steps_list=[2, 2, 2], guidance_scale=1.0, is_amplify_first_chunk=True),
                  dict(steps=2)),
}
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module", params=list(PRESET_ARGS))
def models(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    ref = save_model_folder(kind, folder, seed=7)
    contiguous_outputs(ref.transformer)
    return kind, ref, helios.load_pipeline(folder)


def random_pil_frames(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(64, 64, 3))
    return [Image.fromarray(np.clip(base + 4 * i, 0, 255).astype(np.uint8)) for i in range(n)]


def to_model_range(frames: list[Image.Image]) -> torch.Tensor:
    """PIL frames -> (3, T, H, W) in [-1, 1], the same arithmetic as the reference's preprocessing."""
    arr = torch.from_numpy(np.stack([np.asarray(f) for f in frames]).astype(np.float32) / 255.0)
    return (arr * 2 - 1).permute(3, 0, 1, 2)


def compare(ref_frames: torch.Tensor, ours: torch.Tensor) -> None:
    expected = ref_frames.permute(0, 2, 3, 1) * 255  # (T, H, W, 3) in 0..255, unrounded
    assert ours.shape == expected.shape and ours.dtype == torch.uint8
    # ours is rounded to uint8, so an exact match is within half a level
    assert (ours.float() - expected).abs().max().item() <= 0.5 + 1e-3


@pytest.mark.parametrize("frames", [33, 40])
def test_text_to_video(models, frames):
    kind, ref, ours = models
    ref_kw, our_kw = PRESET_ARGS[kind]
    seed = 11 + frames
    expected = ref("two red circles bouncing", negative_prompt="blurry video", num_frames=frames, output_type="pt",
                   generator=torch.Generator().manual_seed(seed), **SIZE, **ref_kw).frames[0]
    got = ours.generate("two red circles bouncing", negative_prompt="blurry video", num_frames=frames,
                        generator=torch.Generator().manual_seed(seed), settings=kind, **SIZE, **our_kw)
    compare(expected, got)


def test_image_to_video(models):
    kind, ref, ours = models
    ref_kw, our_kw = PRESET_ARGS[kind]
    image = random_pil_frames(1, seed=5)[0]
    expected = ref("a red fox running", image=image, num_frames=33, output_type="pt",
                   generator=torch.Generator().manual_seed(21), **SIZE, **ref_kw).frames[0]
    got = ours.generate("a red fox running", image=to_model_range([image])[:, 0], num_frames=33,
                        generator=torch.Generator().manual_seed(21), settings=kind, **SIZE, **our_kw)
    compare(expected, got)


def test_video_to_video(models):
    kind, ref, ours = models
    ref_kw, our_kw = PRESET_ARGS[kind]
    clip = random_pil_frames(37, seed=9)  # one 33-frame window, aligned to the end: 4 oldest frames dropped
    expected = ref("a blue dog running", video=clip, num_frames=33, output_type="pt",
                   generator=torch.Generator().manual_seed(31), **SIZE, **ref_kw).frames[0]
    got = ours.generate("a blue dog running", video=to_model_range(clip), num_frames=33,
                        generator=torch.Generator().manual_seed(31), settings=kind, **SIZE, **our_kw)
    compare(expected, got)


def test_fast_start_is_the_reference_without_the_amplified_first_chunk(models):
    # --fast-start samples the first chunk with the preset's steps: the reference's is_amplify_first_chunk=False.
    kind, ref, ours = models
    if kind != "distilled":
        pytest.skip("only the distilled preset amplifies its first chunk")
    ref_kw = {**PRESET_ARGS[kind][0], "is_amplify_first_chunk": False}
    expected = ref("two red circles bouncing", num_frames=66, output_type="pt",
                   generator=torch.Generator().manual_seed(3), **SIZE, **ref_kw).frames[0]
    steps: list[int] = []
    got = torch.cat([c.frames for c in ours.stream("two red circles bouncing", num_frames=66, settings=kind, steps=2,
                                                   amplify_first_chunk=False, generator=torch.Generator().manual_seed(3),
                                                   on_step=lambda k, stage, i: steps.append(k), **SIZE)])
    compare(expected, got)
    assert steps.count(0) == steps.count(1) == 6  # 2/2/2 in both chunks; amplified, the first has 12
    amplified = ours.generate("two red circles bouncing", num_frames=66, settings=kind, steps=2,
                              generator=torch.Generator().manual_seed(3), **SIZE)
    assert not torch.equal(amplified, got)
