"""Stage 3 in `helios train`: distillation of a pyramid model into a few-step model, in two phases.

* ``phase: ode`` (:class:`helios.train.stage3.ode.ODERegressionStage`): the generator regresses onto the
  teacher's ODE pairs (made once by :mod:`helios.train.stage3.ode`); no critic.
* ``phase: dmd`` (:class:`DistillStage`): DMD + GAN. The trainer's model is the generator (LoRA or full,
  from ``model.init_from``, official: the ODE-phase result); this stage adds the critic
  (:class:`helios.train.stage3.critic.ScoreCritic`: the frozen real score from ``model.real_score_from`` with
  the critic LoRA and the GAN heads) as a second trainable module with its own optimiser parameter group
  (``distill.critic_lr``, ``distill.critic_grad_clip``). Each iteration trains the critic; every
  ``distill.critic_updates_per_generator_update``-th also the generator. Both are stepped together at the
  end of the iteration (the official loop steps the generator before the critic's rollout of the same
  iteration: one iteration of staleness in 5).

Both export a folder that carries the few-step scheduler (HeliosDMDScheduler from the components
folder's pyramid config) and ``is_distilled: true``, so ``helios.load_pipeline`` samples it with the
distilled preset, and the DMD phase can start from the ODE phase's export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from helios.model.loading import load_transformer
from helios.model_folder import ModelFolderError, read_scheduler_config
from helios.runtime import seeded_generator
from helios.sampling.loading import load_scheduler

from ..config import ConfigError
from ..modeling import transformer_folder
from ..stages import Stage, StepContext, register_stage
from .config import OFFICIAL_NEGATIVE_PROMPT, DistillConfig, distilled_scheduler_config, ema_decay_at
from .critic import ScoreCritic
from .distiller import DistillBatch, Distiller
from .memory import BaseResidency, MemoryConfig
from .rollout import history_is_empty, prepare_histories

__all__ = ["FewStepStage", "DistillStage", "real_score_folder", "pyramid_scheduler_config",
           "few_step_scheduler_config"]


def real_score_folder(cfg: dict[str, Any]) -> Path:
    """``model.real_score_from/model.real_score_subfolder`` when it exists, else ``model.real_score_from``."""
    return transformer_folder(cfg, "real_score")


def _on_every_rank(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every process (decisions that change the number of forwards must
    agree across ranks when the transformers are sharded)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def pyramid_scheduler_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The components folder's (teacher's) pyramid scheduler config."""
    try:
        return read_scheduler_config(cfg["model"]["components_from"])
    except ModelFolderError as e:
        raise ConfigError(f"config key 'model.components_from': cannot read the scheduler config: {e}") from e


def few_step_scheduler_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The generator's HeliosDMDScheduler config: the pyramid config with DMD stepping and the dynamic
    shift of ``timesteps.*`` (what the rollout, the ODE pairs' timesteps and the export use)."""
    pyramid = pyramid_scheduler_config(cfg)
    t = cfg["timesteps"]
    try:
        out = distilled_scheduler_config(pyramid, bool(t["use_dynamic_shifting"]), str(t["time_shift_type"]))
    except ValueError as e:
        raise ConfigError(f"config key 'model.components_from': cannot make the few-step scheduler: {e}") from e
    steps = list(cfg["distill"]["rollout_steps_per_stage"])
    if len(steps) != int(out.get("stages", 1)):
        raise ConfigError(f"config key 'distill.rollout_steps_per_stage' = {steps}: the model's scheduler "
                          f"has {out.get('stages')} pyramid stages")
    return out


class FewStepStage(Stage):
    """What both stage-3 phases share: the recipe's distillation settings, the few-step scheduler the
    generator samples with (and is exported with) and the official EMA schedule, updated after every
    ``generator_every``-th iteration once ``ema.start_step`` is reached."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.dcfg = DistillConfig.from_recipe(cfg)
        self.scheduler_config = few_step_scheduler_config(cfg)
        self.scheduler = load_scheduler(self.scheduler_config)
        self.generator_every = 1

    def ema_decay(self, steps_done: int) -> float | None:
        return ema_decay_at(steps_done - 1, int(self.cfg["ema"]["start_step"]), self.generator_every,
                            float(self.cfg["ema"]["decay"]))

    def inference_overrides(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        return self.scheduler_config, {"is_distilled": True, "is_cfg_zero_star": False,
                                       "scheduler": ["diffusers", self.scheduler_config["_class_name"]]}


@register_stage("3-dmd")
class DistillStage(FewStepStage):
    name = "stage3"

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self.generator_every = self.dcfg.critic_updates_per_generator_update
        self.critic: ScoreCritic | None = None
        self.distiller: Distiller | None = None
        self.negative: torch.Tensor | None = None
        try:
            self.memory = MemoryConfig.from_recipe(cfg)  # the trainer reads optimizer_states / ema too
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'distill.memory': {e}") from e

    # ---- trainer hooks ----
    def build(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
        """The critic: the real-score transformer (frozen, ``dtype``) + critic LoRA + GAN heads."""
        if self.memory.any_host and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError("config key 'distill.memory': the host-memory options are for one process; "
                              "sharded runs (FSDP) split the states over the GPUs instead: set them to gpu")
        cl = self.cfg["distill"]["critic_lora"]
        base = load_transformer(real_score_folder(self.cfg), dtype=dtype, device=device)
        base.enable_gradient_checkpointing(bool(self.cfg["model"]["gradient_checkpointing"]))
        gan = self.dcfg.gan if self.dcfg.gan.enabled else None
        try:
            self.critic = ScoreCritic(base, rank=int(cl["rank"]), alpha=float(cl["alpha"]), gan=gan)
        except ValueError as e:
            raise ConfigError(f"config key 'distill.gan': {e}") from e
        self.critic.train()
        params = [p for p in model.parameters() if p.requires_grad]
        residency = None
        if self.memory.idle_base == "host":  # one frozen base on the device at a time
            residency = BaseResidency({"generator": model, "critic": base})
            residency.use("generator")
        self.distiller = Distiller(model, self.critic, self.dcfg, self.scheduler, self.timesteps,
                                   generator_params=params, residency=residency)
        return {"critic": self.critic}

    def shard(self, modules: dict[str, nn.Module], mesh, mp_policy) -> None:
        from torch.distributed.fsdp import fully_shard

        from ..modeling import shard_model

        kw = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
        critic = modules["critic"]
        shard_model(critic.transformer, mesh, mp_policy)
        if critic.heads is not None:
            fully_shard(critic.heads, **kw)
        fully_shard(critic, **kw)

    def bind_parts(self, parts) -> None:
        """Embed the real score's negative prompt once (``data.negative_prompt``; default: the official one)."""
        prompt = self.cfg["data"].get("negative_prompt")
        self.negative = parts.encode_text(OFFICIAL_NEGATIVE_PROMPT if prompt is None else prompt)[None]

    def param_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": params, "name": "", "clip": self.cfg["optim"]["grad_clip"]},
                {"params": self.critic.trainable_parameters(), "name": "critic", "lr": self.dcfg.critic_lr,
                 "clip": self.dcfg.critic_grad_clip}]

    # ---- one iteration ----
    def train_step(self, ctx: StepContext, batch: dict[str, Any]) -> dict[str, float]:
        if self.distiller is None or self.negative is None:
            raise RuntimeError("DistillStage.build and bind_parts must run before train_step")
        d = self.distiller
        d.autocast = ctx.autocast
        rng = ctx.batch_generator()  # noise, timesteps, crops, task dropout, corruption
        shared = seeded_generator(ctx.seed, 12, ctx.step, ctx.micro)  # exit steps: the same on every rank
        scores, rollout, tasks = prepare_histories(batch["anchor"], batch["history"], ctx.layout, self.task_dropout,
                                                   self.corruption, rng)
        text = self.text(ctx, batch["prompt_embeds"])
        negative = self.negative.to(text.device, text.dtype)
        amplify = self.dcfg.amplify_first_chunk and _on_every_rank(history_is_empty(rollout), text.device)
        b = DistillBatch(text, negative, scores, rollout, batch["target"])

        def backward(loss: torch.Tensor) -> None:
            ctx.backward(loss, last=True)

        metrics: dict[str, float] = {}
        if d.trains_generator(ctx.step):
            metrics.update(d.generator_backward(b, ctx.step, rng, shared, backward, amplify=amplify))
        metrics.update(d.critic_backward(b, ctx.step, rng, shared, backward, amplify=amplify))
        metrics["loss"] = metrics["critic_loss"]
        return {**metrics, **self.task_metrics(tasks)}
