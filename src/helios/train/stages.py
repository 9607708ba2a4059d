"""What one training step computes, per stage. The loop (trainer.py) owns everything else.

A stage gets a batch and a :class:`StepContext` and must: run the model under ``ctx.autocast()``,
call ``ctx.backward(loss, last=...)`` once or more (gradients accumulate; ``last=True`` on the final
call of the micro-batch lets FSDP reduce them once), and return float metrics (``"loss"`` is shown
in the progress bar). Randomness comes only from ``ctx.sample_generator(row)`` (per sample: the
same draws whatever the number of processes) and ``ctx.batch_generator()`` (per batch decisions,
as the official task dropout and corruption), both derived from (seed, step, ...) so a resumed run
redraws exactly what an uninterrupted one draws.

* Stage 1 (:class:`FlowMatchingStage`): history-conditioned flow matching, official timesteps.
* Stage 2 (:class:`PyramidStage`): Pyramid Unified Predictor-Corrector training, 3 scales.
* Stage 3 (the package :mod:`helios.train.stage3`, which registers its phases with :func:`register_stage`):
  phase ``dmd`` (``DistillStage``), DMD + GAN distillation, also trains a critic through the hooks below
  (``build``, ``param_groups``, ``ema_decay``, ``inference_overrides``); phase ``ode``
  (``ODERegressionStage``) regresses on the teacher's ODE pairs, its own ``dataset``.

Both share :meth:`Stage.history_inputs`: split the real history into the memory terms, apply the
T2V/I2V/V2V task dropout, then Easy Anti-Drifting corruption (each switchable in the config; the
first-frame anchor is ``data.keep_anchor``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .corrupt import (
    HistoryCorruptionConfig,
    ModelInputCorruptionConfig,
    TaskDropoutConfig,
    apply_task_dropout,
    corrupt_model_input,
    degrade_history,
)
from .config import is_ode_phase
from helios.runtime import seeded_generator

from .data import build_dataset
from .history import HistoryLayout, model_history_inputs
from .timesteps import (
    TimestepConfig,
    add_noise,
    build_pyramid_schedule,
    flow_matching_loss,
    flow_target,
    per_sample_noise,
    sample_pyramid_training_inputs_per_sample,
    sample_training_sigmas_per_sample,
)

__all__ = ["StepContext", "Stage", "FlowMatchingStage", "PyramidStage", "STAGES", "make_stage"]


@dataclass
class StepContext:
    model: nn.Module
    layout: HistoryLayout
    seed: int
    step: int  # optimiser step being computed (0-based)
    micro: int  # micro-batch within the step (gradient accumulation)
    rank: int
    sample_ids: list[int]  # each row's index within the global batch
    backward: Callable[..., None]  # backward(loss, last=True)
    autocast: Callable[[], ContextManager] = field(default=contextlib.nullcontext)

    def sample_generator(self, row: int) -> torch.Generator:
        return seeded_generator(self.seed, 10, self.step, self.micro, self.sample_ids[row])

    def sample_generators(self, batch: int) -> list[torch.Generator]:
        """One fresh generator per row (CPU: the draws are host work, batched before they reach the device)."""
        return [self.sample_generator(i) for i in range(batch)]

    def batch_generator(self) -> torch.Generator:
        return seeded_generator(self.seed, 11, self.step, self.micro, self.rank)


class Stage:
    """Shared parts: config objects and the history inputs (task dropout + corruption)."""

    name = "stage"

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.timesteps = TimestepConfig.from_dict(cfg["timesteps"])
        self.task_dropout = TaskDropoutConfig.from_dict(cfg["task_dropout"])
        self.corruption = HistoryCorruptionConfig.from_dict(cfg["corruption"])
        self.input_corruption = ModelInputCorruptionConfig.from_dict(cfg["model_input_corruption"])
        self.caption_dropout = float(cfg["data"]["caption_dropout"])

    def train_step(self, ctx: StepContext, batch: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    # ---- hooks for stages that train more than the model (stage 3's critic); defaults: stages 1-2 ----
    def build(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
        """Extra trainable modules, checkpointed with the model under their names."""
        return {}

    def shard(self, modules: dict[str, nn.Module], mesh, mp_policy) -> None:
        """FSDP2 for the modules :meth:`build` returned."""

    def dataset(self, layout: HistoryLayout, parts) -> Dataset:
        """What this stage trains on: by default the ``data.source`` dataset."""
        return build_dataset(self.cfg, layout, parts)

    def bind_parts(self, parts) -> None:
        """Called once with the model folder's VAE / text encoder (when the run loads them)."""

    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """Optimiser parameter groups (``clip``: that group's gradient clipping; ``name``: its metric suffix)."""
        return [{"params": params, "name": "", "clip": self.cfg["optim"]["grad_clip"]}]

    def ema_decay(self, steps_done: int) -> float | None:
        """EMA decay after ``steps_done`` optimiser steps (0: copy the weights; None: no update)."""
        e = self.cfg["ema"]
        return 0.0 if steps_done <= int(e["start_step"]) else float(e["decay"])

    def inference_overrides(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(scheduler config, model_index.json updates) of the trained model; None: the components folder's."""
        return None, {}

    def history_inputs(self, ctx: StepContext, anchor: torch.Tensor, history: torch.Tensor,
                       gen: torch.Generator) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Real history -> task dropout -> memory terms -> corruption -> the model's history kwargs."""
        layout = ctx.layout
        long, mid, last = history.split(list(layout.term_sizes), dim=2)
        a = anchor if layout.keep_first_frame else None
        a, long, mid, last, tasks = apply_task_dropout(a, long, mid, last, self.task_dropout, gen,
                                                       window=layout.chunk_frames)
        kw = model_history_inputs(torch.cat([long, mid, last], dim=2), a, layout)
        short, mid, long, _ = degrade_history(kw["latents_history_short"], kw["latents_history_mid"],
                                              kw["latents_history_long"], self.corruption, gen, layout)
        kw.update(latents_history_short=short, latents_history_mid=mid, latents_history_long=long)
        return kw, tasks

    def text(self, ctx: StepContext, embeds: torch.Tensor) -> torch.Tensor:
        """Caption dropout: a sample's prompt embeddings are zeroed with ``data.caption_dropout``."""
        if self.caption_dropout <= 0:
            return embeds
        draws = torch.cat([torch.rand(1, generator=g) for g in ctx.sample_generators(embeds.shape[0])])
        keep = (draws >= self.caption_dropout).to(embeds.device, embeds.dtype)  # one host -> device copy
        return embeds * keep.view(-1, 1, 1)

    @staticmethod
    def task_metrics(tasks: list[str]) -> dict[str, float]:
        n = len(tasks)
        return {f"task/{k}": sum(t.startswith(k) for t in tasks) / n for k in ("t2v", "i2v", "v2v", "full")}


class FlowMatchingStage(Stage):
    """Stage 1: ``x_t = (1 - s) x0 + s eps``, the model predicts ``eps - x0`` given the history."""

    name = "stage1"

    def train_step(self, ctx: StepContext, batch: dict[str, Any]) -> dict[str, float]:
        x0 = batch["target"]
        # per-sample draws on the host (each generator: timestep, then noise), moved to the device once
        gens = ctx.sample_generators(x0.shape[0])
        sigmas, timesteps = sample_training_sigmas_per_sample(self.timesteps, x0.shape, gens)
        sigmas, timesteps = sigmas.to(x0.device), timesteps.to(x0.device)
        noise = per_sample_noise(x0.shape[1:], gens).to(x0.device, x0.dtype)
        gen = ctx.batch_generator()
        history, tasks = self.history_inputs(ctx, batch["anchor"], batch["history"], gen)
        x_in, _ = corrupt_model_input(x0, self.input_corruption, gen)  # off in every released config
        noisy = add_noise(x_in, noise, sigmas)
        target = flow_target(x0, noise)
        text = self.text(ctx, batch["prompt_embeds"])
        with ctx.autocast():
            pred = ctx.model(noisy, timesteps, text, **history).sample
        loss = flow_matching_loss(pred, target, sigmas, self.timesteps.weighting_scheme)
        ctx.backward(loss, last=True)
        return {"loss": float(loss.detach()), "sigma": float(sigmas.mean()), **self.task_metrics(tasks)}


class PyramidStage(Stage):
    """Stage 2: for each pyramid level ``k`` (lowest resolution first) ``sample_ratios[k]`` draws of
    ``x = s start_k + (1 - s) end_k`` with the level's global timestep, target ``start_k - end_k``
    (docs/training-notes.md section 2). The official NaViT pack puts all draws of a video in one
    forward with block-diagonal attention; separate forwards are the same computation, and the
    loss is the mean over the draws of the per-draw MSE."""

    name = "stage2"

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        p = cfg["pyramid"]
        self.schedule = build_pyramid_schedule(int(p["num_stages"]), tuple(p["stage_range"]), float(p["gamma"]),
                                               float(p["timestep_shift"]), self.timesteps.num_train_timesteps)
        self.ratios = [int(r) for r in p["sample_ratios"]]

    def train_step(self, ctx: StepContext, batch: dict[str, Any]) -> dict[str, float]:
        x0 = batch["target"]
        if x0.shape[-1] % 2 ** (self.schedule.num_stages - 1) or x0.shape[-2] % 2 ** (self.schedule.num_stages - 1):
            raise ValueError(f"latents {x0.shape[-2]}x{x0.shape[-1]} cannot be halved {self.schedule.num_stages - 1} "
                             "times: choose data.height/width divisible by (VAE scale) * 2 ** (pyramid.num_stages - 1) * 2")
        # per-sample draws (each row its own generator), the pyramid maths once for the batch: one
        # entry per (level, draw), lowest level first
        draws = sample_pyramid_training_inputs_per_sample(x0, self.schedule, self.ratios, self.timesteps,
                                                          ctx.sample_generators(x0.shape[0]))
        history, tasks = self.history_inputs(ctx, batch["anchor"], batch["history"], ctx.batch_generator())
        text = self.text(ctx, batch["prompt_embeds"])
        n = len(draws)
        metrics: dict[str, float] = {"loss": 0.0}
        for j, d in enumerate(draws):
            with ctx.autocast():
                pred = ctx.model(d.noisy, d.timesteps.to(x0.device), text, **history).sample
            loss = flow_matching_loss(pred, d.target, d.sigmas.to(x0.device), "none")
            ctx.backward(loss / n, last=(j == n - 1))
            metrics["loss"] += float(loss.detach()) / n
            key = f"loss/level{d.stage}"
            metrics[key] = metrics.get(key, 0.0) + float(loss.detach()) / self.ratios[d.stage]
        return {**metrics, **self.task_metrics(tasks)}


STAGES: dict[str, type[Stage]] = {}  # stage key (see stage_key) -> its class; packages add theirs


def register_stage(key: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: ``make_stage`` builds this class for configs whose :func:`stage_key` is ``key``."""
    def register(cls: type[Stage]) -> type[Stage]:
        STAGES[key] = cls
        return cls
    return register


def stage_key(cfg: dict[str, Any]) -> str:
    """``"1"``, ``"2"``, or for stage 3 its phase: ``"3-ode"`` / ``"3-dmd"``."""
    if cfg["stage"] == 3:
        return "3-ode" if is_ode_phase(cfg) else "3-dmd"
    return str(cfg["stage"])


def make_stage(cfg: dict[str, Any]) -> Stage:
    key = stage_key(cfg)
    if key not in STAGES:
        raise ValueError(f"stage {key} is not implemented here (registered: {sorted(STAGES)}; "
                         "stage 3 registers when helios.train.stage3 is imported)")
    return STAGES[key](cfg)


register_stage("1")(FlowMatchingStage)
register_stage("2")(PyramidStage)
