"""Stage 3's settings: the defaults are the official GAN recipe (src/helios/train/recipes/stage3.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from helios.sampling.schedulers import config_from_dict

__all__ = ["GANConfig", "DistillConfig", "OFFICIAL_NEGATIVE_PROMPT", "distilled_scheduler_config", "ema_decay_at"]


@dataclass
class GANConfig:
    enabled: bool = True
    start_step: int = 1000  # iteration (critic step) from which the GAN losses are on
    head_blocks: tuple[int, ...] = (5, 15, 25, 35)  # 0-based blocks whose noisy tokens feed a head
    final_head: bool = True  # one more head on the unpatchified output
    head_dim: int = 768  # conv width of every head (GroupNorm(32) needs a multiple of 32)
    g_weight: float = 5e-2
    d_weight: float = 1e-2
    crop_scale: float = 0.5  # D sees random (H*scale) x (W*scale) crops
    r1_weight: float = 100.0
    r1_sigma: float = 0.1
    # The official code crops the real sample and its perturbed copy independently (a quirk); True
    # compares D on the same crop, which is what the approximate R1 formula means.
    r1_same_crop: bool = True


@dataclass
class DistillConfig:
    rollout_steps: tuple[int, ...] = (2, 2, 2)  # generator steps per pyramid stage (the distilled preset)
    amplify_first_chunk: bool = True  # 2x steps per stage when the history is empty
    real_guidance_scale: float = 3.0  # real = cond + 3 (cond - uncond)  (= CFG 4)
    fake_guidance_scale: float = 0.0  # fake score: conditional only
    generator_lr: float = 2e-6
    critic_lr: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 1e-3
    eps: float = 1e-8
    grad_clip: float | None = 10.0  # official YAML; DeepSpeed ZeRO-2's 1.0 is the clip that acted
    critic_grad_clip: float | None = 10.0
    critic_updates_per_generator_update: int = 5  # generator trains when step % 5 == 0
    generator_timesteps: dict[str, Any] = field(
        default_factory=lambda: {"sample_type": "beta", "alpha": 4.0, "beta": 1.5, "decay_steps": 500})
    critic_timesteps: dict[str, Any] = field(default_factory=lambda: {"sample_type": "uniform"})
    min_step: int = 20
    max_step: int = 980
    ema_decay: float = 0.99
    ema_start_step: int = 750
    ode_weight: float = 80.0
    gan: GANConfig = field(default_factory=GANConfig)

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any]) -> "DistillConfig":
        """Read a stage-3 recipe / training config (``distill``, ``optim``, ``ema`` sections)."""
        d, o, e = recipe.get("distill", {}), recipe.get("optim", {}), recipe.get("ema", {})
        g = dict(d.get("gan", {}))
        r1 = g.pop("r1", {}) or {}
        g.pop("r2", None)  # weight 0 in every released config: not implemented
        gan_keys = {f.name for f in fields(GANConfig)}
        gan = GANConfig(**{k: (tuple(v) if k == "head_blocks" else v) for k, v in g.items() if k in gan_keys})
        gan.r1_weight = float(r1.get("weight", gan.r1_weight))
        gan.r1_sigma = float(r1.get("sigma", gan.r1_sigma))
        return cls(
            rollout_steps=tuple(d.get("rollout_steps_per_stage", cls.rollout_steps)),
            amplify_first_chunk=bool(d.get("amplify_first_chunk", True)),
            real_guidance_scale=float(d.get("real_guidance_scale", 3.0)),
            fake_guidance_scale=float(d.get("fake_guidance_scale", 0.0)),
            generator_lr=float(o.get("lr", 2e-6)), critic_lr=float(d.get("critic_lr", 4e-7)),
            betas=tuple(o.get("betas", (0.0, 0.999))), weight_decay=float(o.get("weight_decay", 1e-3)),
            eps=float(o.get("eps", 1e-8)), grad_clip=o.get("grad_clip", 10.0),
            critic_grad_clip=d.get("critic_grad_clip", 10.0),
            critic_updates_per_generator_update=int(d.get("critic_updates_per_generator_update", 5)),
            generator_timesteps=dict(d.get("generator_timesteps", cls().generator_timesteps)),
            critic_timesteps=dict(d.get("critic_timesteps", {"sample_type": "uniform"})),
            min_step=int(d.get("min_step", 20)), max_step=int(d.get("max_step", 980)),
            ema_decay=float(e.get("decay", 0.99)), ema_start_step=int(e.get("start_step", 750)),
            ode_weight=float((d.get("ode") or {}).get("weight", 80.0)), gan=gan)


# The official default negative prompt (helios/utils/train_config.py), used by the real score's CFG.
OFFICIAL_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")


def distilled_scheduler_config(pyramid_config: dict[str, Any], use_dynamic_shifting: bool = True,
                               time_shift_type: str = "linear") -> dict[str, Any]:
    """The HeliosDMDScheduler config of the few-step model distilled from a pyramid model whose scheduler
    config is ``pyramid_config``: same stages / gamma / table, DMD stepping. The rollout during training
    and the exported model folder use this one config, so training and inference sample alike."""
    base = config_from_dict(pyramid_config)
    if base.stages < 2:
        raise ValueError(f"stage 3 distils a pyramid model; this scheduler has {base.stages} stage(s)")
    dmd = dataclasses.replace(base, scheduler_type="dmd", use_dynamic_shifting=use_dynamic_shifting,
                              time_shift_type=time_shift_type)
    return dmd.to_dict()


def ema_decay_at(iteration: int, start_step: int, ratio: int, decay: float) -> float | None:
    """The EMA decay the official loop applies after 0-based ``iteration`` (None: no EMA update then),
    i.e. what :class:`EMA` gives when updated on every iteration before ``start_step`` and on generator
    iterations (``iteration % ratio == 0``) after. Needs no state, so a resumed run continues exactly."""
    if iteration >= start_step and iteration % ratio:
        return None
    n = min(iteration + 1, start_step)
    if iteration >= start_step:
        n += iteration // ratio - (start_step - 1) // ratio  # generator iterations in [start_step, iteration]
    s = n - start_step - 1
    return 0.0 if s <= 0 else min((1 + s) / (10 + s), decay)
