"""Stage 3, phase ode, on the tiny "mid" folder and latent cache (CPU): the teacher's ODE pairs (made at the
few-step generator's timesteps, resumable), the regression phase of `helios train` (loss falls, bitwise
resume), and its export as the start of the DMD phase."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from helpers.train_runs import Crash, checkpoint_tensors, crash_after, stage3_user

from helios.engine.history import HistoryBuffer
from helios.model.loading import load_transformer
from helios.sampling.dmd import flow_to_x0
from helios.sampling.pyramid import pyramid_stage_mus
from helios.sampling.loading import load_scheduler
from helios.train.config import ConfigError, load_config
from helios.train.stage3 import student_timesteps
from helios.train.stage3.ode import ODEPairDataset, make_ode_pairs, ode_chunks
from helios.train.recipes import history_layout
from helios.train.stage3 import few_step_scheduler_config
from helios.train.trainer import train
from helios.train.video_data import collate_samples

SECTIONS = 2


@contextlib.contextmanager
def plain_cpu():
    """One thread and no oneDNN (~30x slower than plain BLAS for these tiny linears), also for the module
    fixtures, which run before conftest's per-test setting: the pairs must be made alike everywhere."""
    before = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before[0]
        torch.set_num_threads(before[1])


@pytest.fixture(autouse=True)
def _plain_cpu():
    with plain_cpu():
        yield


def ode_user(root: Path, tiny_model: Path, latent_cache: Path, out: str, pairs: Path) -> dict:
    """The recipe's phase ode with a tiny teacher run (3+3+3 steps, 2 sections) and a tiny LoRA."""
    u = stage3_user(root, tiny_model, latent_cache, out)
    u.update(phase="ode", max_steps=6)
    u["distill"] = {"ode": {"data": str(pairs), "sections": {"min": 1, "max": SECTIONS},
                            "teacher": {"pyramid_steps": [3, 3, 3], "num_sections": SECTIONS, "seed": 0}}}
    u["optim"] = {"lr": 3e-3}
    u["export"] = {"enabled": False}
    return u


def ode_config(root: Path, tiny_model: Path, latent_cache: Path, out: str, pairs: Path, check_paths: bool = True,
               **over) -> dict:
    return load_config(ode_user(root, tiny_model, latent_cache, out, pairs), [f"{k}={v}" for k, v in over.items()],
                       check_paths=check_paths)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model, latent_cache) -> Path:
    """ODE pairs of the three cached captions, made in one uninterrupted run."""
    root = tmp_path_factory.mktemp("ode")
    with plain_cpu():
        report = make_ode_pairs(ode_config(root, tiny_model, latent_cache, "x", root / "pairs", check_paths=False),
                                verbose=False)
    assert len(report.built) == 3 and not report.existing
    return root / "pairs"


@pytest.fixture(scope="module")
def ode_run(tmp_path_factory, tiny_model, latent_cache, pairs):
    """An ODE phase of 8 steps that exports its model (trained weights, not the EMA)."""
    root = tmp_path_factory.mktemp("ode-run")
    cfg = ode_config(root, tiny_model, latent_cache, "run", pairs, max_steps=8,
                     **{"export.enabled": True, "export.use_ema": False, "checkpointing.every_steps": 0})
    with plain_cpu():
        return cfg, train(cfg)


def test_ode_pairs_are_the_teacher_states_at_the_generator_timesteps(tmp_path, tiny_model, latent_cache, pairs):
    cfg = ode_config(tmp_path, tiny_model, latent_cache, "x", pairs)
    ds = ODEPairDataset(cfg)
    assert len(ds) == 3
    item = ds[0]
    assert (item["num_sections"], item["num_stages"]) == (SECTIONS, 3)
    shape = (1, 16, 9, 8, 8)
    student = load_scheduler(few_step_scheduler_config(cfg))
    mus = pyramid_stage_mus(shape[2:], 3, student.config)
    for k in range(SECTIONS):  # the amplified first section visits 2 x 2 timesteps per stage, the others 2
        want = student_timesteps(student, shape, (2, 2, 2), amplify=(k == 0))
        for j in range(3):
            student.set_timesteps(2, stage_index=j, mu=mus[j], amplify=(k == 0))  # its x0 sigmas
            ts, sig = item[f"s{k}.p{j}.timesteps"], item[f"s{k}.p{j}.sigmas"]
            assert ts.tolist() == [int(t) for t in want[j]]  # exactly the generator's (truncated) timesteps
            torch.testing.assert_close(sig, torch.tensor(student._x0_sigmas, dtype=torch.float64), rtol=0, atol=1e-12)
            side = 2 << j  # 2x2, 4x4, 8x8 latents
            assert item[f"s{k}.p{j}.states"].shape == (len(want[j]), 16, 9, side, side)
            assert item[f"s{k}.p{j}.target"].shape == (16, 9, side, side)
    # training rebuilds each section's history from the stored outputs exactly as the teacher's buffer held it
    layout = history_layout(cfg)
    batch = collate_samples([item])
    chunks = ode_chunks(batch, layout, batch["prompt_embeds"])
    buf = HistoryBuffer(1, 16, 8, 8, layout)
    for k, chunk in enumerate(chunks):
        for name, v in buf.model_inputs(torch.float32).items():
            assert torch.equal(chunk.history[name], v), (k, name)
        if k == 0:
            buf.set_anchor(chunk.final[:, :, :1])
        buf.push(chunk.final)


def test_ode_pair_generation_resumes_without_recomputing(tmp_path, tiny_model, latent_cache, pairs):
    cfg = ode_config(tmp_path, tiny_model, latent_cache, "x", tmp_path / "pairs", check_paths=False)
    made = []

    def die_after_first(key: str) -> None:
        made.append(key)
        raise Crash(key)

    with pytest.raises(Crash):
        make_ode_pairs(cfg, on_entry=die_after_first, verbose=False)
    first = tmp_path / "pairs" / f"{made[0]}.safetensors"
    stamp = first.stat().st_mtime_ns
    (tmp_path / "pairs" / ".tmp-killed-while-writing.safetensors").write_bytes(b"partial")
    report = make_ode_pairs(cfg, verbose=False)
    assert report.existing == made and len(report.built) == 2 and made[0] not in report.built
    assert first.stat().st_mtime_ns == stamp  # not written again
    assert len(ODEPairDataset(load_config(ode_user(tmp_path, tiny_model, latent_cache, "x", tmp_path / "pairs")))) == 3
    for f in sorted(pairs.glob("*.safetensors")):  # bitwise what one uninterrupted run made
        a, b = load_file(f), load_file(tmp_path / "pairs" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name
    assert make_ode_pairs(cfg, verbose=False).built == []


def test_ode_errors_are_clear(tmp_path, tiny_model, latent_cache, pairs):
    with pytest.raises(ConfigError, match=r"'distill.ode.data' = .*folder not found.*python -m helios.train.ode"):
        ode_config(tmp_path, tiny_model, latent_cache, "x", tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"'model.init_from' = .*nowhere': folder not found"):
        make_ode_pairs(ode_config(tmp_path, tiny_model, latent_cache, "x", tmp_path / "p", check_paths=False,
                                  **{"model.init_from": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match=r"'data.cache_dir' = .*folder not found"):
        make_ode_pairs(ode_config(tmp_path, tiny_model, latent_cache, "x", tmp_path / "p", check_paths=False,
                                  **{"data.cache_dir": str(tmp_path / "nocache")}))
    with pytest.raises(ConfigError, match=r"other settings \(guidance_scale: 5.0 \(folder\) vs 2.0"):
        make_ode_pairs(ode_config(tmp_path, tiny_model, latent_cache, "x", pairs,
                                  **{"distill.ode.teacher.guidance_scale": 2.0}))
    with pytest.raises(ConfigError, match=r"made for other settings \(rollout_steps_per_stage"):
        ODEPairDataset(ode_config(tmp_path, tiny_model, latent_cache, "x", pairs,
                                  **{"distill.rollout_steps_per_stage": [1, 1, 1]}))
    with pytest.raises(ConfigError, match=r"'distill.ode.sections.max' = 3: the ODE pairs .* have 2 sections"):
        ODEPairDataset(ode_config(tmp_path, tiny_model, latent_cache, "x", pairs, **{
            "distill.ode.sections.max": 3, "distill.ode.teacher.num_sections": 3}))
    with pytest.raises(ConfigError, match=r"'distill.ode.enabled' = True: ODE regression during the DMD phase"):
        ode_config(tmp_path, tiny_model, latent_cache, "x", pairs, **{"distill.train_dmd": True})
    with pytest.raises(ConfigError, match=r"'distill.train_dmd' = False: nothing to train"):
        ode_config(tmp_path, tiny_model, latent_cache, "x", pairs, **{"distill.ode.only": False})


def _full_ode_loss(model: torch.nn.Module, cfg: dict) -> float:
    """Mean 0.5 MSE(x0, stage end) over every recorded state of every pair (no random choice)."""
    layout, losses = history_layout(cfg), []
    with torch.no_grad():
        for item in ODEPairDataset(cfg):
            batch = collate_samples([item])
            for chunk in ode_chunks(batch, layout, batch["prompt_embeds"]):
                for st in chunk.stages:
                    for x, t, s in zip(st.states, st.timesteps, st.sigmas):
                        x0 = flow_to_x0(model(x, t.view(1), chunk.text, **chunk.history).sample, x, float(s))
                        losses.append(0.5 * float((x0 - st.target).square().mean()))
    return sum(losses) / len(losses)


def test_ode_phase_loss_falls(ode_run, tiny_model):
    cfg, r = ode_run
    assert r.step == 8 and all(torch.isfinite(torch.tensor(r.losses)))
    before = _full_ode_loss(load_transformer(tiny_model / "transformer"), cfg)
    after = _full_ode_loss(load_transformer(r.export_dir / "transformer"), cfg)
    assert after < 0.8 * before, (before, after)


def test_ode_phase_resume_is_bitwise_identical(tmp_path, tiny_model, latent_cache, pairs):
    def run(out: str, **kw):
        return train(ode_config(tmp_path, tiny_model, latent_cache, out, pairs, max_steps=4), **kw)

    whole = run("whole")
    with pytest.raises(Crash):  # dies after step 3: the newest checkpoint is step 2
        run("crashed", on_step=crash_after(3))
    resumed = run("crashed", resume=True)
    assert resumed.losses == whole.losses[2:]
    a, b = checkpoint_tensors(whole.output_dir, tmp_path, 4), checkpoint_tensors(resumed.output_dir, tmp_path, 4)
    assert a.keys() == b.keys() and any(".ema." in k for k in a) and any("exp_avg" in k for k in a)
    for k in a:
        assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k


def test_ode_export_starts_the_dmd_phase(ode_run, tmp_path, tiny_model, latent_cache):
    import json

    from helios.train.modeling import load_init_transformer

    _, r = ode_run
    folder = r.export_dir
    index = json.loads((folder / "model_index.json").read_text())
    assert index["is_distilled"] and index["scheduler"] == ["diffusers", "HeliosDMDScheduler"]
    user = stage3_user(tmp_path, folder, latent_cache, "dmd")  # init_from = components_from = the ODE export
    user["model"]["real_score_from"] = str(tiny_model)  # the teacher stays the real score
    user.update(max_steps=1, export={"enabled": False})
    cfg = load_config(user)
    init = load_init_transformer(cfg, dtype=None).state_dict()
    exported, original = load_transformer(folder / "transformer").state_dict(), load_transformer(
        tiny_model / "transformer").state_dict()
    assert all(torch.equal(init[k], exported[k]) for k in init)
    assert not torch.equal(init["blocks.0.attn1.to_q.weight"], original["blocks.0.attn1.to_q.weight"])
    d = train(cfg)
    assert d.step == 1 and all(torch.isfinite(torch.tensor(d.losses)))
