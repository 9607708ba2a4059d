"""End to end against the real diffusers pipelines (stub transformer and VAE, tiny CPU tensors).

The reference `HeliosPipeline` / `HeliosPyramidPipeline.__call__` run their full chunk loop;
our loops in _drivers.py use only helios.sampling. Same seed -> same latents and the same
model calls (timesteps, resolutions), for the base, mid and distilled presets.
"""

import pytest
import torch
from diffusers import HeliosDMDScheduler, HeliosScheduler

from helios.sampling import load_scheduler
from helios.sampling.pyramid import block_noise_cholesky

from ._drivers import base_chunk, pyramid_chunk, run_chunks
from ._reference import StubTransformer, base_pipeline, pyramid_pipeline

H, W, C, LATENT_FRAMES = 64, 96, 4, 9  # latent 8x12, pyramid 2x3 -> 4x6 -> 8x12
NUM_CHUNKS = 2
NUM_FRAMES = NUM_CHUNKS * ((LATENT_FRAMES - 1) * 4 + 1)


def use_our_cholesky(monkeypatch, gamma):
    """The reference's float32 block-noise factorisation fails on CPU at gamma=1/3 (see test_pyramid)."""
    L = block_noise_cholesky(gamma)
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a: L.to(a.dtype))


def ours_from(ref_sched):
    return load_scheduler({"_class_name": type(ref_sched).__name__, **ref_sched.config})


def prompts(gen, dtype):
    return (torch.randn(1, 5, 8, generator=gen).to(dtype), torch.randn(1, 5, 8, generator=gen).to(dtype))


def compare(ref_out, ours, ref_model, our_model):
    assert ours.shape == ref_out.shape
    torch.testing.assert_close(ours, ref_out, rtol=0, atol=1e-6)
    assert len(ref_model.calls) == len(our_model.calls)
    for (t_ref, s_ref), (t_ours, s_ours) in zip(ref_model.calls, our_model.calls):
        assert s_ref == s_ours and t_ref.dtype == t_ours.dtype and torch.equal(t_ref, t_ours)


@pytest.mark.parametrize("num_steps,dynamic", [(50, False), (12, True)])
def test_base_preset(gen, num_steps, dynamic):
    """Helios-Base: single-stage UniPC, CFG 5.0."""
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    prompt, negative = prompts(gen, torch.float32)
    ref_sched = HeliosScheduler(stages=1, use_dynamic_shifting=dynamic)
    ref_model, our_model = StubTransformer(C), StubTransformer(C)
    ref_out = base_pipeline(ref_sched, ref_model)(
        prompt_embeds=prompt, negative_prompt_embeds=negative, height=H, width=W, num_frames=NUM_FRAMES,
        num_inference_steps=num_steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
        num_latent_frames_per_chunk=LATENT_FRAMES, output_type="latent", return_dict=False)[0]
    ours = run_chunks(base_chunk, NUM_CHUNKS, sched=ours_from(ref_sched), model=our_model,
                      shape=(1, C, LATENT_FRAMES, H // 8, W // 8), generator=torch.Generator().manual_seed(seed),
                      prompt=prompt, negative=negative, scale=5.0, num_steps=num_steps)
    compare(ref_out, ours, ref_model, our_model)


@pytest.mark.parametrize("solver,dynamic,zero_init",
                         [("unipc", False, True), ("euler", True, True), ("unipc", True, False)])
def test_mid_preset(gen, monkeypatch, solver, dynamic, zero_init):
    """Helios-Mid: pyramid 20/20/20 (smaller here for speed), CFG-Zero* with zero-init."""
    use_our_cholesky(monkeypatch, 1 / 3)
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    prompt, negative = prompts(gen, torch.float32)
    steps = [20, 20, 20] if solver == "unipc" and not dynamic else [6, 5, 4]
    ref_sched = HeliosScheduler(stages=3, scheduler_type=solver, use_dynamic_shifting=dynamic)
    ref_model, our_model = StubTransformer(C), StubTransformer(C)
    ref_out = pyramid_pipeline(ref_sched, ref_model, is_cfg_zero_star=True)(
        prompt_embeds=prompt, negative_prompt_embeds=negative, height=H, width=W, num_frames=NUM_FRAMES,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), num_latent_frames_per_chunk=LATENT_FRAMES,
        pyramid_num_inference_steps_list=steps, use_zero_init=zero_init, zero_steps=1,
        output_type="latent", return_dict=False)[0]
    ours = run_chunks(pyramid_chunk, NUM_CHUNKS, sched=ours_from(ref_sched), model=our_model,
                      shape=(1, C, LATENT_FRAMES, H // 8, W // 8), generator=torch.Generator().manual_seed(seed),
                      prompt=prompt, negative=negative, scale=5.0, steps=steps, zero_star=True,
                      use_zero_init=zero_init, zero_steps=1)
    compare(ref_out, ours, ref_model, our_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amplify", [True, False])
def test_distilled_preset(gen, monkeypatch, dtype, amplify):
    """Helios-Distilled: pyramid 2/2/2 DMD, no CFG, amplified first chunk."""
    use_our_cholesky(monkeypatch, 1 / 3)
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    prompt, _ = prompts(gen, dtype)
    ref_sched = HeliosDMDScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    ref_model, our_model = StubTransformer(C, dtype), StubTransformer(C, dtype)
    ref_out = pyramid_pipeline(ref_sched, ref_model, is_distilled=True)(
        prompt_embeds=prompt, height=H, width=W, num_frames=NUM_FRAMES, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed), num_latent_frames_per_chunk=LATENT_FRAMES,
        pyramid_num_inference_steps_list=[2, 2, 2], is_amplify_first_chunk=amplify,
        output_type="latent", return_dict=False)[0]
    ours = run_chunks(pyramid_chunk, NUM_CHUNKS, sched=ours_from(ref_sched), model=our_model,
                      shape=(1, C, LATENT_FRAMES, H // 8, W // 8), generator=torch.Generator().manual_seed(seed),
                      prompt=prompt, negative=None, scale=1.0, steps=[2, 2, 2], amplify_first_chunk=amplify)
    compare(ref_out, ours, ref_model, our_model)
    assert len(our_model.calls) == (12 if amplify else 6) + 6
