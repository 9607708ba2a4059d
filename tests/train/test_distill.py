"""Stage 3 (Adversarial Hierarchical Distillation) components on tiny random transformers, CPU.

The "teacher" is a tiny HeliosTransformer whose weights are scaled up so that its velocity field is
far from the identity (at the default init every sampler returns almost its input noise, and there
would be nothing to distil). It plays both the multi-step pyramid teacher (ODE pairs) and the frozen
real score."""

from __future__ import annotations

import copy

import pytest
import torch

from helios.engine.history import HistoryLayout, split_history
from helios.sampling.dmd import DMDScheduler
from helios.sampling.sampler import SamplerSettings, denoise_chunk
from helios.sampling.schedulers import FlowScheduler, SchedulerConfig
from helios.train.corrupt import HistoryCorruptionConfig, TaskDropoutConfig
from helpers.distill_loop import StandaloneDistiller as Distiller, tiny_teacher
from helpers.train_runs import checkpoint_tensors, stage3_user
from helios.train.stage3 import (
    DistillBatch,
    DistillConfig,
    GANConfig,
    ScoreCritic,
    adapters_enabled,
    build_generator,
    discriminator_loss,
    dmd_loss,
    gan_crop,
    generator_gan_loss,
    generator_rollout,
    ode_regression_loss,
    prepare_histories,
    scaled_head_blocks,
    sigma_table,
    student_timesteps,
    teacher_trajectory,
)
from helios.train.recipes import load_recipe
from helios.train.timesteps import TimestepConfig

B, C, T, H, W = 2, 16, 9, 16, 16
SHAPE = (B, C, T, H, W)
TS = TimestepConfig(use_dynamic_shifting=True)


@pytest.fixture(autouse=True)
def _no_mkldnn():
    # torch's oneDNN path makes (B, L, D) linears ~30x slower than plain BLAS at these tiny sizes on CPU.
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = before


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher().eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(B, 8, 32, generator=g)
    history = torch.randn(B, C, 19, H, W, generator=g)
    anchor = torch.randn(B, C, 1, H, W, generator=g)
    layout = HistoryLayout()
    hist = {**split_history(history, layout, anchor), **layout.indices(B)}
    return {"text": text, "negative": torch.zeros(1, 8, 32), "history": history, "anchor": anchor,
            "layout": layout, "hist": hist, "real": torch.randn(SHAPE, generator=g)}


def dmd_scheduler() -> DMDScheduler:
    return DMDScheduler(use_dynamic_shifting=True)


def gan_cfg(**kw) -> GANConfig:
    return GANConfig(**{"head_blocks": scaled_head_blocks(2), "head_dim": 64, "start_step": 0, **kw})


def make_batch(inputs, hist=None) -> DistillBatch:
    h = hist or inputs["hist"]
    return DistillBatch(inputs["text"], inputs["negative"], h, h, inputs["real"])


def make_distiller(teacher, gan: GANConfig | None = None, **cfg_kw) -> Distiller:
    torch.manual_seed(2)
    gan = gan or gan_cfg()
    gen, params = build_generator(teacher, lora_rank=4)
    critic = ScoreCritic(copy.deepcopy(teacher), rank=4, gan=gan)
    return Distiller(gen, critic, DistillConfig(gan=gan, **cfg_kw), dmd_scheduler(), TS, generator_params=params)


# ---- (b) rollout --------------------------------------------------------------------------------


@pytest.mark.parametrize("amplify", [False, True])
def test_rollout_with_last_exits_is_the_distilled_sampler(teacher, inputs, amplify):
    """The rollout is the inference path: exiting at every stage's last step gives denoise_chunk's output
    with the distilled preset (same noise and block-noise draws)."""
    text, hist = inputs["text"], inputs["hist"]

    def predict(x, t, with_uncond):
        return teacher(x, t, text, **hist).sample, None

    settings = SamplerSettings(pyramid_steps=(2, 2, 2), guidance_scale=1.0, amplify_first_chunk=amplify)
    ref = denoise_chunk(predict, SHAPE, dmd_scheduler(), settings, torch.Generator().manual_seed(3),
                        torch.device("cpu"), first_chunk=True)
    last = [3, 3, 3] if amplify else [1, 1, 1]
    out = generator_rollout(teacher, text, hist, SHAPE, dmd_scheduler(), (2, 2, 2), torch.Generator().manual_seed(3),
                            amplify=amplify, exits=last, grad=False)
    assert out.steps == ([4, 4, 4] if amplify else [2, 2, 2])
    assert torch.equal(out.x0, ref)


@pytest.mark.parametrize("exits, graded", [([1, 1, 1], 1), ([0, 0, 0], 3), ([0, 1, 0], 2), ([1, 0, 0], 3),
                                           ([1, 1, 0], 2)])
def test_rollout_gradients_only_through_exit_steps(teacher, inputs, exits, graded):
    """Only exit-step forwards record gradients, and an earlier stage's exit forward is reached only
    when every later stage exits at its first step (its input is then that x0, upsampled and renoised)."""
    gen, _ = build_generator(teacher, lora_rank=2)
    calls, reached = [], []

    def hook(_m, _i, out):
        calls.append(out.sample.requires_grad)
        if out.sample.requires_grad:
            k = len(calls) - 1
            out.sample.register_hook(lambda g, k=k: reached.append(k))

    h = gen.register_forward_hook(hook)
    out = generator_rollout(gen, inputs["text"], inputs["hist"], SHAPE, dmd_scheduler(), (2, 2, 2),
                            torch.Generator().manual_seed(4), exits=exits)
    h.remove()
    assert out.forwards == sum(e + 1 for e in exits) == len(calls)
    assert sum(calls) == 3  # one graded forward per stage (its exit step)
    out.x0.square().mean().backward()
    assert len(reached) == graded
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters() if p.requires_grad)


# ---- models: one base for real and fake score -------------------------------------------------


def test_real_score_is_exactly_the_frozen_base(teacher, inputs):
    base = copy.deepcopy(teacher)
    critic = ScoreCritic(base, rank=4, gan=gan_cfg())
    with torch.no_grad():  # a trained-looking critic: the adapter changes the output
        for p in critic.transformer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    x, t, text, hist = inputs["real"], torch.tensor([500, 700]), inputs["text"], inputs["hist"]
    with torch.no_grad():
        ref = teacher(x, t, text, **hist).sample
        real = critic.real(x, t, text, hist)
        fake = critic.fake(x, t, text, hist)
        real_again = critic.real(x, t, text, hist)
    assert torch.equal(real, ref) and torch.equal(real_again, ref)
    assert (fake - ref).abs().max() > 1e-3  # the adapter is back on after real()
    # only the LoRA and the heads train; the base (shared by both scores) is frozen
    names = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("heads.") for n in names)
    assert critic.heads is not None and len(list(critic.heads.parameters())) > 0
    with adapters_enabled(critic.transformer, False), torch.no_grad():
        assert torch.equal(critic.transformer(x, t, text, **hist).sample, ref)


# ---- (c) DMD ------------------------------------------------------------------------------------


def test_dmd_gradient_is_the_normalised_score_difference(teacher, inputs):
    """d L_DMD / d x0 = (fake - real_cfg) / mean|x0 - real_cfg| / numel, with real_cfg = rc + 3 (rc - ru)."""
    critic = ScoreCritic(copy.deepcopy(teacher), rank=4, gan=None)
    with torch.no_grad():
        for p in critic.trainable_parameters():
            p.normal_(0, 0.3)
    x0 = inputs["real"].clone().requires_grad_(True)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    table = sigma_table(SHAPE, TS)
    t = torch.tensor([300, 800])
    loss, _ = dmd_loss(critic, x0, t, noise, table, inputs["text"], inputs["negative"], inputs["hist"], 3.0)
    loss.backward()
    with torch.no_grad():
        idx = torch.argmin((table.timesteps[None] - t.double()[:, None]).abs(), dim=1)
        s = table.sigmas[idx].view(-1, 1, 1, 1, 1)
        xt = ((1 - s) * x0 + s * noise).float()
        args = (inputs["hist"],)
        fake = xt - s * critic.fake(xt, t, inputs["text"], *args)
        rc = xt - s * critic.real(xt, t, inputs["text"], *args)
        ru = xt - s * critic.real(xt, t, inputs["negative"].expand(B, -1, -1), *args)
        real = rc + 3.0 * (rc - ru)
        g = (fake - real) / (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    err = (x0.grad.double() * x0.numel() - g).abs().max()
    assert err < 1e-4 * g.abs().max(), err
    assert all(p.grad is None for p in critic.parameters())  # no gradient to the scores


# ---- (e) GAN: where the gradients go -------------------------------------------------------------


def test_gan_gradients_reach_the_critic_only_where_intended(teacher, inputs):
    d = make_distiller(teacher)
    critic, gen = d.critic, d.generator
    table = sigma_table(SHAPE, TS)
    t = torch.tensor([400, 600])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    lora = [p for n, p in critic.named_parameters() if "lora_" in n]
    heads = list(critic.heads.parameters())

    # generator step: L_G reaches G through x0 and nothing of the critic
    x0 = generator_rollout(gen, inputs["text"], inputs["hist"], SHAPE, d.scheduler, (2, 2, 2),
                           torch.Generator().manual_seed(7), exits=[1, 1, 1]).x0
    lg = generator_gan_loss(critic, x0, t, noise, table, inputs["text"], inputs["hist"], 0.5,
                            torch.Generator().manual_seed(8))
    lg.backward()
    assert torch.isfinite(lg)
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.requires_grad for p in lora + heads)  # frozen only during the step
    assert sum(float(p.grad.abs().sum()) for p in d.generator_params if p.grad is not None) > 0
    gen.zero_grad(set_to_none=True)

    # critic step: L_D + R1 reach the heads and the critic LoRA (official is_separate_gan_grad: false),
    # never the frozen base or the generator
    ld, m = discriminator_loss(critic, x0.detach(), inputs["real"], t, noise, table, inputs["text"], inputs["hist"],
                               d.cfg.gan, torch.Generator().manual_seed(9))
    ld.backward()
    assert m["r1_loss"] > 0 and m["gan_d_loss"] > 0
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in heads)
    assert sum(float(p.grad.abs().sum()) for p in lora if p.grad is not None) > 0
    assert all(p.grad is None for n, p in critic.named_parameters() if not p.requires_grad)
    assert all(p.grad is None for p in gen.parameters())


def test_flow_loss_does_not_train_the_heads(teacher, inputs):
    d = make_distiller(teacher, gan=gan_cfg(start_step=10))  # before the GAN starts
    m = d.critic_backward(make_batch(inputs), 0, torch.Generator().manual_seed(1), torch.Generator().manual_seed(1),
                          lambda loss: loss.backward())
    assert "gan_d_loss" not in m
    assert all(p.grad is None for p in d.critic.heads.parameters())
    assert any(p.grad is not None for n, p in d.critic.named_parameters() if "lora_" in n)


def test_gan_crop_same_corners():
    x = torch.arange(2 * 16 * 9 * 16 * 16, dtype=torch.float32).view(2, 16, 9, 16, 16)
    a, corners = gan_crop(x, 0.5, torch.Generator().manual_seed(0))
    b, _ = gan_crop(x, 0.5, None, corners)
    assert a.shape == (2, 16, 9, 8, 8) and torch.equal(a, b)


# ---- (f) update schedule, optimisers, EMA --------------------------------------------------------


def test_update_ratio_optimisers_and_ema(teacher, inputs):
    d = make_distiller(teacher, gan=gan_cfg(start_step=3), ema_start_step=2, generator_lr=1e-3, critic_lr=1e-3)
    assert d.generator_opt.defaults["lr"] == 1e-3 and d.generator_opt.defaults["betas"] == (0.0, 0.999)
    assert d.generator_opt.defaults["weight_decay"] == 1e-3
    official = DistillConfig()
    assert (official.generator_lr, official.critic_lr, official.betas) == (2e-6, 4e-7, (0.0, 0.999))
    batch = make_batch(inputs)

    def snap(ps):
        return [p.detach().clone() for p in ps]

    def moved(a, b):
        return any(not torch.equal(x, y) for x, y in zip(a, b))

    gen_moves, critic_moves, heads_moves, losses = [], [], [], []
    for step in range(7):
        g0, c0, h0 = snap(d.generator_params), snap(d.critic_params), snap(d.critic.heads.parameters())
        m = d.train_step(batch, batch, torch.Generator().manual_seed(100 + step))
        gen_moves.append(moved(g0, d.generator_params))
        critic_moves.append(moved(c0, d.critic_params))
        heads_moves.append(moved(h0, list(d.critic.heads.parameters())))
        losses.append(m)
    assert gen_moves == [True, False, False, False, False, True, False]  # every 5th iteration
    assert all(critic_moves)
    assert heads_moves == [False, False, False, True, True, True, True]  # GAN from step 3
    assert all("gan_g_loss" not in m for m in losses[:1]) and "gan_g_loss" in losses[5]
    # EMA: every iteration before ema_start_step (0, 1), then generator iterations only (5)
    assert d.ema.updates == 3
    assert d.step == 7


def test_ema_decay_schedule():
    from helpers.distill_loop import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.99, start_step=2)
    decays = []
    for v in range(1, 8):
        with torch.no_grad():
            p.fill_(float(v))
        ema.update([("w", p)])
        decays.append(ema.current_decay())
    assert decays[:3] == [0.0, 0.0, 0.0]  # a copy up to start_step (+1, as diffusers)
    assert decays[3] == pytest.approx(2 / 11) and decays[-1] == pytest.approx(5 / 14)


def test_official_recipe_values():
    cfg = DistillConfig.from_recipe(load_recipe("stage3", "dmd"))
    assert (cfg.generator_lr, cfg.critic_lr, cfg.betas, cfg.weight_decay) == (2e-6, 4e-7, (0.0, 0.999), 1e-3)
    assert cfg.critic_updates_per_generator_update == 5 and cfg.rollout_steps == (2, 2, 2)
    assert (cfg.real_guidance_scale, cfg.fake_guidance_scale) == (3.0, 0.0)
    g = cfg.gan
    assert (g.head_blocks, g.final_head, g.g_weight, g.d_weight, g.r1_weight, g.r1_sigma, g.start_step) == \
        ((5, 15, 25, 35), True, 0.05, 0.01, 100.0, 0.1, 1000)
    assert (cfg.ema_decay, cfg.ema_start_step, cfg.ode_weight) == (0.99, 750, 80.0)
    assert cfg.generator_timesteps["sample_type"] == "beta" and cfg.critic_timesteps["sample_type"] == "uniform"
    assert scaled_head_blocks(40) == (5, 15, 25, 35) and scaled_head_blocks(2) == (0, 1)


# ---- a few full steps; distillation improves the few-step samples --------------------------------


def test_stage3_steps_have_finite_losses_that_move(teacher, inputs):
    d = make_distiller(teacher, generator_lr=1e-3, critic_lr=1e-3, critic_updates_per_generator_update=1)
    g = torch.Generator().manual_seed(11)
    scores, rollout, _ = prepare_histories(inputs["anchor"], inputs["history"], inputs["layout"],
                                           TaskDropoutConfig(t2v_ratio=0.0, v2v_ratio=0.0, i2v_ratio=0.0),
                                           HistoryCorruptionConfig(mode="random", saturation_enabled=True,
                                                                   clean_prob=0.0, saturation_clean_prob=0.0), g)
    assert not torch.equal(scores["latents_history_long"], rollout["latents_history_long"])  # saturation: rollout only
    batch = DistillBatch(inputs["text"], inputs["negative"], scores, rollout, inputs["real"])
    hist = [d.train_step(batch, batch, torch.Generator().manual_seed(20 + i)) for i in range(3)]
    keys = ("dmd_loss", "gan_g_loss", "critic_flow_loss", "gan_d_loss", "r1_loss")
    for k in keys:
        vals = [m[k] for m in hist]
        assert all(torch.isfinite(torch.tensor(v)) for v in vals), k
        assert len(set(vals)) == 3, k  # changes from step to step
    assert hist[0]["dmd_loss"] >= 0 and hist[0]["dmd_grad_norm"] > 0


def test_distillation_brings_few_step_samples_to_the_teacher(teacher, inputs):
    """Distance of G's 1+1+1-step samples to the teacher's 8+8+8-step samples for a held-out noise and
    fixed history, before vs after a short run: ODE-regression init on teacher trajectories (4 noise
    seeds), then a few DMD+GAN iterations. The per-noise match comes from the ODE phase (DMD matches
    distributions, not samples); the DMD phase must not undo it."""
    text, hist = inputs["text"], inputs["hist"]
    steps = (1, 1, 1)
    teacher_sched = FlowScheduler(SchedulerConfig(use_dynamic_shifting=True))
    settings = SamplerSettings(pyramid_steps=(8, 8, 8), guidance_scale=1.0)
    record = student_timesteps(dmd_scheduler(), SHAPE, steps)

    def trajectory(seed):
        return teacher_trajectory(teacher, text, hist, SHAPE, teacher_sched, settings,
                                  torch.Generator().manual_seed(seed), record)

    val = trajectory(1000)
    assert [s.states.shape[0] for s in val.stages] == [1, 1, 1]
    train = [trajectory(s) for s in range(4)]
    d = make_distiller(teacher, gan=gan_cfg(start_step=0), generator_lr=5e-3, critic_lr=1e-4, rollout_steps=steps,
                       amplify_first_chunk=False, ode_weight=1.0)

    def distance() -> float:
        with torch.no_grad():
            out = generator_rollout(d.generator, text, hist, SHAPE, d.scheduler, steps,
                                    torch.Generator().manual_seed(1000), exits=[0, 0, 0], grad=False)
        return float((out.x0 - val.final).square().mean())

    before = distance()
    with torch.no_grad():
        first = float(ode_regression_loss(d.generator, train[:1], torch.Generator().manual_seed(0), 1.0))
    for i in range(30):
        d.train_ode_step([train[i % 4]], torch.Generator().manual_seed(i))
    after_ode = distance()
    with torch.no_grad():
        last = float(ode_regression_loss(d.generator, train[:1], torch.Generator().manual_seed(0), 1.0))
    d.cfg.generator_lr = 1e-5
    for group in d.generator_opt.param_groups:
        group["lr"] = 1e-5
    batch = make_batch(inputs)
    for i in range(5):
        m = d.train_step(batch, batch, torch.Generator().manual_seed(50 + i))
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    after = distance()
    assert last < first / 3
    assert after_ode < before / 4, (before, after_ode)
    assert after < before / 4, (before, after_ode, after)


# ---- `helios train` with stage: 3 ----------------------------------------------------------------


def stage3_config(tmp_path, tiny_model, latent_cache, out: str, **over) -> dict:
    from helios.train.config import load_config

    return load_config(stage3_user(tmp_path, tiny_model, latent_cache, out), [f"{k}={v}" for k, v in over.items()])


def test_helios_train_stage3_distils_a_folder_that_loads_and_generates(tmp_path, tiny_model, latent_cache):
    import json

    import helios
    from helios.train.trainer import train

    r = train(stage3_config(tmp_path, tiny_model, latent_cache, "run"))
    assert r.step == 6 and all(torch.isfinite(torch.tensor(r.losses)))
    lines = [json.loads(x) for x in (r.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert ["dmd_loss" in m for m in lines] == [True, False, False, False, False, True]  # generator 1 in 5
    assert all("critic_flow_loss" in m and "grad_norm/critic" in m for m in lines)
    assert ["gan_d_loss" in m for m in lines] == [False, False, True, True, True, True]  # GAN from step 2
    ck = checkpoint_tensors(r.output_dir, tmp_path, 6)
    assert any(k.startswith(".model.critic.heads.") for k in ck)
    assert any(k.startswith(".model.generator.") and "lora_" in k for k in ck)
    assert not any(k.startswith(".model.critic.transformer.") and "lora_" not in k for k in ck)  # frozen base

    folder = r.export_dir
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    assert sched["_class_name"] == "HeliosDMDScheduler" and sched["gamma"] == 0.25  # the teacher's pyramid
    assert index["is_distilled"] is True and index["scheduler"] == ["diffusers", "HeliosDMDScheduler"]
    pipe = helios.load_pipeline(folder)
    assert pipe.default_preset == "distilled"
    video = pipe.generate("a red circle bouncing", num_frames=33, height=64, width=64, seed=0)
    assert video.shape == (33, 64, 64, 3) and video.dtype == torch.uint8


def test_helios_train_stage3_resume_is_bitwise_identical(tmp_path, tiny_model, latent_cache):
    from helios.train.trainer import train

    class Crash(RuntimeError):
        pass

    def crash_after_3(step, metrics):
        if step == 3:
            raise Crash

    whole = train(stage3_config(tmp_path, tiny_model, latent_cache, "whole", **{"export.enabled": False}))
    with pytest.raises(Crash):
        train(stage3_config(tmp_path, tiny_model, latent_cache, "crashed", **{"export.enabled": False}),
              on_step=crash_after_3)
    resumed = train(stage3_config(tmp_path, tiny_model, latent_cache, "crashed", **{"export.enabled": False}),
                    resume=True)
    assert resumed.losses == whole.losses[2:]
    a, b = checkpoint_tensors(whole.output_dir, tmp_path, 6), checkpoint_tensors(resumed.output_dir, tmp_path, 6)
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k


@pytest.mark.slow
def test_helios_train_stage3_under_fsdp_two_processes(tmp_path, tiny_model, latent_cache):
    """`helios train` under torchrun, 2 CPU processes (gloo, FSDP2 over the generator and the critic):
    runs, checkpoints, exports a distilled folder. (Per-batch draws differ from one process, so this
    checks that the sharded critic, adapter switching and cached-gradient GAN work, not equality.)"""
    import json
    import os
    import subprocess
    import sys

    import yaml

    import helios

    user = {**stage3_user(tmp_path, tiny_model, latent_cache, "fsdp"), "max_steps": 3}
    user["distill"]["gan"]["start_step"] = 0
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(user))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "helios.cli", "train", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and "dmd_loss" in lines[0] and "gan_g_loss" in lines[0]
    assert all(torch.isfinite(torch.tensor(v)) for m in lines for v in m.values())
    assert helios.load_pipeline(tmp_path / "fsdp" / "model").default_preset == "distilled"
