"""Our transformer equals the diffusers reference (HeliosTransformer3DModel) in float32."""

from __future__ import annotations

import pytest
import torch

import helios
from helios.model.config import HeliosConfig
from helios.model.transformer import HeliosTransformer
from helpers_reference import generator_for, random_inputs, randomized_reference, relative_error

TOL = 1e-5

CASES = {
    "no_history": dict(terms=()),
    "short_only": dict(terms=("short",)),
    # The reference reads the RoPE grid of the mid and long terms off the short term, so it cannot run
    # them without it: each coarse term is checked next to the short one.
    "short_and_mid": dict(terms=("short", "mid")),
    "short_and_long": dict(terms=("short", "long")),
    "all_terms": dict(terms=("short", "mid", "long")),
    "odd_frames_and_padding": dict(terms=("short", "mid", "long"), frames=5, height=6, width=10),
    "batch_2": dict(terms=("short", "mid", "long"), batch=2),
    "zero_history_timestep_off": dict(terms=("short", "mid", "long"), config=dict(zero_history_timestep=False)),
    "guidance_cross_attn_off": dict(terms=("short", "mid", "long"), config=dict(guidance_cross_attn=False)),
    "amplify_history_per_head": dict(terms=("short", "mid", "long"), config=dict(is_amplify_history=True)),
    "amplify_history_scalar": dict(terms=("short", "mid", "long"),
                                   config=dict(is_amplify_history=True, history_scale_mode="scalar")),
    "no_cross_attn_norm": dict(terms=("short",), config=dict(cross_attn_norm=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, tmp_path, request):
    spec = CASES[case]
    gen = generator_for(request.node.name)
    ref = randomized_reference(gen, **spec.get("config", {}))
    ref.save_pretrained(tmp_path)
    ours = helios.load_transformer(tmp_path)
    kw = random_inputs(gen, batch=spec.get("batch", 1), frames=spec.get("frames", 9),
                       height=spec.get("height", 8), width=spec.get("width", 8), terms=spec["terms"])
    with torch.no_grad():
        expected = ref(**kw).sample
        got = ours(**kw).sample
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert relative_error(got, expected) < TOL


def test_precomputed_text_and_layout_give_the_same_output(request):
    gen = generator_for(request.node.name)
    ref = randomized_reference(gen)
    ours = HeliosTransformer(HeliosConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    kw = random_inputs(gen)
    with torch.no_grad():
        direct = ours(**kw).sample
        text = ours.prepare_text(kw["encoder_hidden_states"])
        again = ours(**{**kw, "encoder_hidden_states": text}).sample
    assert torch.equal(direct, again)
    assert relative_error(direct, ref(**kw).sample) < TOL


def test_scalar_timestep_broadcasts_over_batch(request):
    gen = generator_for(request.node.name)
    ref = randomized_reference(gen)
    ours = HeliosTransformer(HeliosConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    kw = random_inputs(gen, batch=2)
    kw["timestep"] = torch.full((2,), 321.0)
    with torch.no_grad():
        expected = ours(**kw).sample
        kw["timestep"] = torch.tensor(321.0)
        assert torch.equal(ours(**kw).sample, expected)


def test_tuple_output_when_return_dict_false(request):
    gen = generator_for(request.node.name)
    ref = randomized_reference(gen)
    ours = HeliosTransformer(HeliosConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    kw = random_inputs(gen, terms=())
    with torch.no_grad():
        out = ours(**kw, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == kw["hidden_states"].shape


def test_14b_config_has_the_reference_parameter_count():
    from diffusers import HeliosTransformer3DModel

    with torch.device("meta"):
        ref = HeliosTransformer3DModel()
        ours = HeliosTransformer(HeliosConfig())
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_ref
    assert 14.0e9 < n_ours < 14.5e9
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_gradient_checkpointing_gives_the_same_gradients(request):
    gen = generator_for(request.node.name)
    ref = randomized_reference(gen)
    ours = HeliosTransformer(HeliosConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict())
    kw = random_inputs(gen, terms=("short", "mid"))

    def grads(ckpt: bool):
        ours.zero_grad()
        ours.enable_gradient_checkpointing(ckpt)
        ours(**kw).sample.square().mean().backward()
        return {k: p.grad.clone() for k, p in ours.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("term", ["mid", "long"])
def test_coarse_term_alone_adds_its_patch_count(term, request):
    """Without the short term (which the reference requires) each coarse term still patchifies as specified."""
    gen = generator_for(request.node.name)
    ref = randomized_reference(gen)
    ours = HeliosTransformer(HeliosConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    kw = random_inputs(gen, terms=(term,))
    history = ours._history_terms((None, None), (kw.get("latents_history_mid"), kw.get("indices_latents_history_mid")),
                                  (kw.get("latents_history_long"), kw.get("indices_latents_history_long")))
    layout = ours.token_layout(tuple(kw["hidden_states"].shape), kw["indices_hidden_states"], history)
    # 8x8 latents: mid 2x4x4 patches of 2 frames -> 1*2*2; long 4x8x8 of 16 frames -> 4*1*1.
    expected = {"mid": 4, "long": 4}[term]
    assert layout.num_history == expected
    with torch.no_grad():
        out = ours(**kw).sample
    assert torch.isfinite(out).all() and out.shape == kw["hidden_states"].shape
