"""The stage-3 update rule: the generator's and the critic's losses of one iteration."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn as nn

from helios.sampling.dmd import DMDScheduler
from helios.sampling.pyramid import noise_like

from ..timesteps import TimestepConfig
from .config import DistillConfig
from .critic import History, ScoreCritic
from .losses import (SigmaTable, critic_flow_loss, discriminator_loss, dmd_loss, generator_gan_loss, sample_timesteps,
                     sigma_table)
from .memory import BaseResidency
from .rollout import RolloutResult, generator_rollout, history_is_empty

__all__ = ["DistillBatch", "Distiller"]


@dataclass
class DistillBatch:
    """One step's real data: prompt embeddings, the histories (:func:`prepare_histories`) and the real
    target latents (the GAN's real samples)."""

    text: torch.Tensor  # (B, L, D)
    negative_text: torch.Tensor  # (1 or B, L, D): the real score's unconditional prompt
    history: History  # what the real / fake scores see
    rollout_history: History  # what the generator sees (+ saturation)
    real: torch.Tensor  # (B, C, T, H, W) real target latents

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.real.shape)


class Distiller:
    """The stage-3 update rule on a generator and a :class:`ScoreCritic`.

    Iteration ``step`` (0-based): when ``step % critic_updates_per_generator_update == 0`` the generator
    is updated (DMD + GAN from ``gan.start_step``) with its critic parameters frozen; the critic is
    updated every iteration (flow matching, + GAN + R1 from ``gan.start_step``). The ``*_backward``
    methods only compute losses and call ``backward``: the trainer owns sharding, clipping, the
    optimisers and the EMA (:class:`DistillStage`)."""

    def __init__(self, generator: nn.Module, critic: ScoreCritic, cfg: DistillConfig, scheduler: DMDScheduler,
                 timesteps: TimestepConfig, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 generator_params: Sequence[nn.Parameter] | None = None, residency: BaseResidency | None = None):
        self.generator, self.critic, self.cfg, self.scheduler = generator, critic, cfg, scheduler
        # the frozen bases take turns on the device (distill.memory.idle_base: host); None: both resident
        self.residency = residency
        self.timestep_cfg, self.autocast = timesteps, autocast
        gp = list(generator_params) if generator_params is not None else [
            p for p in generator.parameters() if p.requires_grad]
        ids = {id(p) for p in gp}
        self.generator_named = [(n, p) for n, p in generator.named_parameters() if id(p) in ids]
        self.generator_params = [p for _, p in self.generator_named]
        self.critic_params = critic.trainable_parameters()
        self._tables: dict[tuple[int, ...], SigmaTable] = {}

    # ---- schedule ----
    def trains_generator(self, step: int) -> bool:
        return step % self.cfg.critic_updates_per_generator_update == 0

    def uses_gan(self, step: int) -> bool:
        return self.cfg.gan.enabled and self.critic.heads is not None and step >= self.cfg.gan.start_step

    def use(self, model: str) -> None:
        """Make ``"generator"`` or ``"critic"``'s frozen base resident before that model runs (no-op
        when both stay resident)."""
        if self.residency is not None:
            self.residency.use(model)

    def table(self, shape: Sequence[int]) -> SigmaTable:
        key = tuple(shape[1:])
        if key not in self._tables:
            self._tables[key] = sigma_table(shape, self.timestep_cfg)
        return self._tables[key]

    def rollout(self, batch: DistillBatch, rng: torch.Generator | None, shared: torch.Generator | None,
                grad: bool, amplify: bool | None = None, exits: Sequence[int] | None = None) -> RolloutResult:
        if amplify is None:
            amplify = self.cfg.amplify_first_chunk and history_is_empty(batch.rollout_history)
        self.use("generator")
        with self.autocast():
            return generator_rollout(self.generator, batch.text, batch.rollout_history, batch.shape, self.scheduler,
                                     self.cfg.rollout_steps, rng, shared, amplify=amplify, exits=exits, grad=grad)

    # ---- losses ----
    def generator_backward(self, batch: DistillBatch, step: int, rng: torch.Generator | None,
                           shared: torch.Generator | None, backward: Callable[[torch.Tensor], None],
                           amplify: bool | None = None, exits: Sequence[int] | None = None) -> dict[str, float]:
        cfg = self.cfg
        out = self.rollout(batch, rng, shared, grad=True, amplify=amplify, exits=exits)
        x0 = out.x0
        table = self.table(x0.shape)
        B = x0.shape[0]
        t = sample_timesteps(B, table, cfg.generator_timesteps, cfg, step, rng)
        self.use("critic")  # G's saved activations stay; its frozen weights return for the backward
        with self.autocast():
            loss, m = dmd_loss(self.critic, x0, t, noise_like(x0, rng), table, batch.text, batch.negative_text,
                               batch.history, cfg.real_guidance_scale, cfg.fake_guidance_scale)
            metrics = {"dmd_loss": float(loss.detach()), **m, "rollout_forwards": float(out.forwards)}
            if self.uses_gan(step):
                lg = generator_gan_loss(self.critic, x0, t, noise_like(x0, rng), table, batch.text, batch.history,
                                        cfg.gan.crop_scale, rng)
                metrics["gan_g_loss"] = float(lg.detach())
                loss = loss + cfg.gan.g_weight * lg
        self.use("generator")  # the critic's part kept no graph (DMD: no_grad; GAN: its input gradient)
        backward(loss)
        metrics["generator_loss"] = float(loss.detach())
        return metrics

    def critic_backward(self, batch: DistillBatch, step: int, rng: torch.Generator | None,
                        shared: torch.Generator | None, backward: Callable[[torch.Tensor], None],
                        amplify: bool | None = None, exits: Sequence[int] | None = None) -> dict[str, float]:
        cfg = self.cfg
        with torch.no_grad():
            x0 = self.rollout(batch, rng, shared, grad=False, amplify=amplify, exits=exits).x0
        table = self.table(x0.shape)
        t = sample_timesteps(x0.shape[0], table, cfg.critic_timesteps, cfg, step, rng)
        noise = noise_like(x0, rng)
        self.use("critic")
        with self.autocast():
            flow = critic_flow_loss(self.critic, x0, t, noise, table, batch.text, batch.history)
        backward(flow)  # first, on its own: its activations are freed before the GAN forward
        metrics = {"critic_flow_loss": float(flow.detach())}
        if self.uses_gan(step):
            with self.autocast():
                ld, m = discriminator_loss(self.critic, x0, batch.real, t, noise, table, batch.text, batch.history,
                                           cfg.gan, rng)
            backward(ld)
            metrics.update(m)
            metrics["critic_loss"] = float(flow.detach()) + float(ld.detach())
        else:
            metrics["critic_loss"] = float(flow.detach())
        self.use("generator")  # what the next rollout, validation and export read
        return metrics
