"""The TAEHV tiny autoencoder (helios.model.taehv): layout, parity with a reference, streaming, loading errors."""

from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helios.model.taehv import (CONFIG_METADATA_KEY, TAEHV, DecodeStream, TAEHVConfig, TAEHVLoadError, load_taehv,
                                run_sequence)

REFERENCE_WHEEL = "streamdiffusionv2==0.1.1"
REFERENCE_FILE = "models/wan/taehv_wrapper.py"


def published_decoder_layout(latent: int = 16, widths=(256, 128, 64, 64), time_grow=(1, 2, 2)) -> dict:
    """Key -> shape of the published taew2_1 decoder, written out from its documented architecture
    (independently of the model's builder): Clamp, conv, ReLU, then per stage three MemBlocks, Upsample,
    TGrow, conv without bias; ReLU, conv to RGB."""
    out = {"decoder.1.weight": (widths[0], latent, 3, 3), "decoder.1.bias": (widths[0],)}
    index = 3
    for s in range(3):
        w = widths[s]
        for _ in range(3):
            out[f"decoder.{index}.conv.0.weight"] = (w, 2 * w, 3, 3)
            out[f"decoder.{index}.conv.0.bias"] = (w,)
            for j in (2, 4):
                out[f"decoder.{index}.conv.{j}.weight"] = (w, w, 3, 3)
                out[f"decoder.{index}.conv.{j}.bias"] = (w,)
            index += 1
        index += 1  # Upsample: no weights
        out[f"decoder.{index}.conv.weight"] = (w * time_grow[s], w, 1, 1)
        out[f"decoder.{index + 1}.weight"] = (widths[s + 1], w, 3, 3)
        index += 2
    out[f"decoder.{index + 1}.weight"] = (3, widths[3], 3, 3)
    out[f"decoder.{index + 1}.bias"] = (3,)
    return out


def published_encoder_layout(latent: int = 16, pools=(2, 2, 1)) -> dict:
    out = {"encoder.0.weight": (64, 3, 3, 3), "encoder.0.bias": (64,)}
    index = 2
    for s in range(3):
        out[f"encoder.{index}.conv.weight"] = (64, 64 * pools[s], 1, 1)
        out[f"encoder.{index + 1}.weight"] = (64, 64, 3, 3)
        index += 2
        for _ in range(3):
            for j, c_in in ((0, 128), (2, 64), (4, 64)):
                out[f"encoder.{index}.conv.{j}.weight"] = (64, c_in, 3, 3)
                out[f"encoder.{index}.conv.{j}.bias"] = (64,)
            index += 1
    out[f"encoder.{index}.weight"] = (latent, 64, 3, 3)
    out[f"encoder.{index}.bias"] = (latent,)
    return out


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights of a scale that keeps activations O(1) through the network (fan-in scaled)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5 if p.dim() > 1
                    else torch.randn(p.shape, generator=g) * 0.1)
    return model


def small_config(**kw) -> TAEHVConfig:
    return TAEHVConfig(**{"widths": (32, 24, 16, 16), "encoder_width": 16, **kw})


# ---- layout ------------------------------------------------------------------------------------------
def test_state_dict_has_the_published_taew2_1_key_names_and_shapes():
    own = {k: tuple(v.shape) for k, v in TAEHV().state_dict().items()}
    want = {**published_decoder_layout(), **published_encoder_layout()}
    assert own == want


def test_wan_layout_frame_counts_match_the_wan_vae():
    model = randomize_(TAEHV(small_config()))
    z = torch.randn(1, 9, 16, 4, 6)
    with torch.no_grad():
        frames = model.decode_video(z)
        latents = model.encode_video(torch.rand(1, 36, 3, 32, 48))
    assert frames.shape == (1, 33, 3, 32, 48)  # 1 + 4 * (9 - 1), 8x in space
    assert frames.min() >= 0 and frames.max() <= 1
    assert latents.shape == (1, 9, 16, 4, 6)


# ---- parity with the reference implementation -------------------------------------------------------
@pytest.fixture(scope="module")
def reference_module(tmp_path_factory):
    """The TAEHV class shipped in the streamdiffusionv2 wheel (Apache-2.0), loaded on its own: the wheel's
    heavy pins make it unfit as a dependency, so it is fetched with `pip download --no-deps` and only that
    file is executed, with the two project modules it imports stubbed."""
    cache = Path.home() / ".cache" / "helios-tests"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("streamdiffusionv2-0.1.1-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                            REFERENCE_WHEEL], capture_output=True, text=True, timeout=300)
        wheels = sorted(cache.glob("streamdiffusionv2-0.1.1-*.whl"))
        if r.returncode or not wheels:
            pytest.skip(f"the reference wheel {REFERENCE_WHEEL} could not be downloaded: {r.stderr[-300:]}")
    source = zipfile.ZipFile(wheels[0]).read(REFERENCE_FILE).decode()
    stubs = {"models": {}, "models.wan": {},
             "models.model_interface": {"VAEInterface": type("VAEInterface", (torch.nn.Module,), {})},
             "models.wan.wan_wrapper": {"WanVAEWrapper": object}}
    saved = {name: sys.modules.get(name) for name in stubs}
    try:
        for name, attrs in stubs.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
        ref = types.ModuleType("reference_taehv")
        ref.__file__ = str(tmp_path_factory.mktemp("ref") / "taehv_wrapper.py")
        exec(compile(source, REFERENCE_FILE, "exec"), ref.__dict__)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return ref


def test_equals_the_reference_taehv_over_chunks_in_a_row(reference_module, tmp_path):
    ours = randomize_(TAEHV(), seed=1).eval()
    path = tmp_path / "random.pth"
    torch.save(ours.state_dict(), path)
    ref = reference_module.TAEHV(checkpoint_path=str(path)).eval()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 7, 16, 4, 6, generator=g) * 2
    with torch.no_grad():
        whole = ref.decode_video(z, parallel=True)[:, ref.frames_to_trim:]
        stepwise = ref.decode_video(z, parallel=False)[:, ref.frames_to_trim:]
        stream = DecodeStream()
        ours_chunks = torch.cat([ours.decode_video(z[:, a:b], stream, clamp=False)
                                 for a, b in ((0, 1), (1, 4), (4, 7))], dim=1)
        frames = torch.rand(1, 12, 3, 32, 48, generator=g)
        enc_ref, enc_ours = ref.encode_video(frames), ours.encode_video(frames)
    assert whole.abs().mean() > 0.1  # the weights are not a degenerate case that decodes to ~0
    assert ours_chunks.shape == whole.shape == (1, 25, 3, 32, 48)
    torch.testing.assert_close(ours_chunks, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_chunks, stepwise, rtol=0, atol=1e-5)
    torch.testing.assert_close(enc_ours, enc_ref, rtol=0, atol=1e-5)


# ---- streaming ---------------------------------------------------------------------------------------
def test_chunk_by_chunk_decode_equals_the_whole_decode():
    model = randomize_(TAEHV(small_config(space_upscale=(False, True, True))), seed=3)
    z = torch.randn(2, 10, 16, 5, 5)
    with torch.no_grad():
        whole = model.decode_video(z)
        for cuts in ((1, 10), (3, 4, 10), (1, 2, 3, 9, 10)):
            stream, parts, start = DecodeStream(), [], 0
            for end in cuts:
                parts.append(model.decode_video(z[:, start:end], stream))
                start = end
            torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=1e-6)
    assert whole.shape == (2, 37, 3, 20, 20)


@pytest.mark.parametrize("space", [(True, True, True), (False, True, True)])
def test_the_reduced_decoder_equals_the_plain_layer_by_layer_decode_over_chunks(space):
    # decode_video moves TGrow before the upsampling, runs upsample + conv3 as four phases and skips
    # the startup frames; the plain stack (the published layer order, all frames) must give the same.
    model = randomize_(TAEHV(small_config(space_upscale=space)), seed=7)
    z = torch.randn(2, 6, 16, 4, 5)
    with torch.no_grad():
        stream, memory, ours, plain = DecodeStream(), {}, [], []
        for start, end in ((0, 1), (1, 4), (4, 6)):
            ours.append(model.decode_video(z[:, start:end], stream))
            plain.append(run_sequence(model.decoder, z[:, start:end], memory).clamp(0, 1))
    plain[0] = plain[0][:, model.frames_to_trim:]
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_training_through_the_reduced_decoder_gets_the_plain_decoders_gradients():
    # helios train-decoder backpropagates through decode_video: the folded final ReLU and the phase convolution
    # must pass the same gradients to the weights as the published layer order does.
    model = randomize_(TAEHV(small_config()), seed=9)
    z = torch.randn(1, 3, 16, 4, 4)
    ours = model.decode_video(z, clamp=False)
    grads_ours = torch.autograd.grad(ours.square().sum(), list(model.decoder.parameters()))
    plain = run_sequence(model.decoder, z)[:, model.frames_to_trim:]
    grads_plain = torch.autograd.grad(plain.square().sum(), list(model.decoder.parameters()))
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    for a, b in zip(grads_ours, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_fresh_decode_forgets_the_previous_chunk():
    model = randomize_(TAEHV(small_config()), seed=4)
    a, b = torch.randn(1, 3, 16, 4, 4), torch.randn(1, 3, 16, 4, 4)
    with torch.no_grad():
        alone = model.decode_video(b)
        stream = DecodeStream()
        model.decode_video(a, stream)
        continued = model.decode_video(b, stream)
    assert continued.shape[1] == alone.shape[1] + 3  # no startup frames dropped after the first call
    assert not torch.allclose(continued[:, 3:], alone)  # the memory of `a` changes the frames


# ---- weight files ------------------------------------------------------------------------------------
def test_loads_pth_and_safetensors_and_prefixed_keys(tmp_path):
    model = randomize_(TAEHV(), seed=5)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "taew2_1.pth")
    save_file({f"taehv.{k}": v.half() for k, v in sd.items()}, str(tmp_path / "lighttaew2_1.safetensors"))
    z = torch.randn(1, 2, 16, 3, 3)
    with torch.no_grad():
        want = model.decode_video(z)
        for name, atol in (("taew2_1.pth", 0.0), ("lighttaew2_1.safetensors", 2e-2)):
            loaded = load_taehv(tmp_path / name, latent_channels=16, spatial_factor=8)
            assert loaded.cfg == TAEHVConfig()
            torch.testing.assert_close(loaded.decode_video(z), want, rtol=0, atol=atol)


def test_a_tgrow_stored_with_more_frames_keeps_its_last_frames(tmp_path):
    model = randomize_(TAEHV(), seed=6)
    sd = dict(model.state_dict())
    key = "decoder.7.conv.weight"  # stage 0's TGrow: stride 1 in the Wan layout, stored at 2 by some files
    sd[key] = torch.cat([torch.randn_like(sd[key]), sd[key]], 0)
    torch.save(sd, tmp_path / "w.pth")
    loaded = load_taehv(tmp_path / "w.pth")
    assert loaded.cfg.time_upscale == (False, True, True)
    torch.testing.assert_close(loaded.state_dict()[key], model.state_dict()[key], rtol=0, atol=0)


def test_own_files_carry_their_architecture(tmp_path):
    cfg = small_config(space_upscale=(False, True, True), blocks=2, encoder=False)
    model = randomize_(TAEHV(cfg), seed=7)
    save_file(dict(model.state_dict()), str(tmp_path / "own.safetensors"), metadata={CONFIG_METADATA_KEY: cfg.to_json()})
    loaded = load_taehv(tmp_path / "own.safetensors", latent_channels=16, spatial_factor=4)
    assert loaded.cfg == cfg
    z = torch.randn(1, 3, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode_video(z), model.decode_video(z), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["missing", "shape", "extra", "channels", "spatial", "not-a-state-dict",
                                  "no-file"])
def test_wrong_files_are_refused_naming_the_file_and_what_is_wrong(tmp_path, case):
    sd = dict(TAEHV().state_dict())
    path = tmp_path / f"{case}.pth"
    expect = {"missing": "decoder.9.conv.2.weight", "shape": "decoder.14.weight", "extra": "decoder.99.weight",
              "channels": "48-channel", "spatial": "8x in space", "not-a-state-dict": "state dict",
              "no-file": "no such file"}[case]
    kwargs = {}
    if case == "missing":
        del sd["decoder.9.conv.2.weight"]
    elif case == "shape":
        sd["decoder.14.weight"] = torch.zeros(64, 128, 1, 1)
    elif case == "extra":
        sd["decoder.99.weight"] = torch.zeros(1)
    elif case == "channels":
        sd = dict(TAEHV(TAEHVConfig(latent_channels=48, patch_size=2)).state_dict())
        kwargs = {"latent_channels": 16}
    elif case == "spatial":
        kwargs = {"spatial_factor": 4}
    if case == "not-a-state-dict":
        torch.save([1, 2, 3], path)
    elif case != "no-file":
        torch.save(sd, path)
    with pytest.raises(TAEHVLoadError) as e:
        load_taehv(path, **kwargs)
    assert str(path) in str(e.value) and expect in str(e.value), str(e.value)
