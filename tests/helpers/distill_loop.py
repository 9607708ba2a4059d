"""A self-contained stage-3 loop around :class:`helios.train.stage3.Distiller`, for tests on tiny models.

``helios train`` steps the distiller inside its own loop (sharding, clipping, optimisers, EMA: the
trainer's); this driver gives the tests the same update schedule without that machinery: two AdamW
optimisers (the official 2e-6 / 4e-7, betas (0, 0.999)), the generator every
``critic_updates_per_generator_update``-th iteration, and an EMA of the generator updated as the official
loop does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from helios.train.stage3 import DistillBatch, Distiller, ODEChunk, ode_regression_loss


class EMA:
    """EMA of the generator's trainable parameters (official diffusers EMAModel, ``update_after_step``):
    ``decay_n = 0`` (copy) for the first ``start_step`` updates, then ``min((1 + s) / (10 + s), decay)``
    with ``s = n - start_step - 1``. The official loop updates it every iteration before ``start_step``
    and then only on generator iterations (:meth:`StandaloneDistiller.train_step` does the same)."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]], decay: float = 0.99, start_step: int = 750):
        self.decay, self.start_step = decay, start_step
        self.shadow = {n: p.detach().clone().float() for n, p in named}
        self.updates = 0

    def current_decay(self) -> float:
        s = self.updates - self.start_step - 1
        return 0.0 if s <= 0 else min((1 + s) / (10 + s), self.decay)

    @torch.no_grad()
    def update(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.updates += 1
        d = self.current_decay()
        for n, p in named:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


class StandaloneDistiller(Distiller):
    """:class:`Distiller` with its own optimisers and EMA, stepped by :meth:`train_step`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.generator_opt = torch.optim.AdamW(self.generator_params, lr=cfg.generator_lr, betas=tuple(cfg.betas),
                                               eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.critic_opt = torch.optim.AdamW(self.critic_params, lr=cfg.critic_lr, betas=tuple(cfg.betas),
                                            eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.ema = EMA(self.generator_named, cfg.ema_decay, cfg.ema_start_step)
        self.step = 0

    def train_step(self, generator_batch: DistillBatch, critic_batch: DistillBatch, rng: torch.Generator | None,
                   shared: torch.Generator | None = None) -> dict[str, float]:
        """One iteration (generator update when due, critic update, EMA); returns float metrics."""
        step, metrics = self.step, {}
        shared = shared if shared is not None else rng
        if self.trains_generator(step):
            self.generator_opt.zero_grad(set_to_none=True)
            metrics.update(self.generator_backward(generator_batch, step, rng, shared, lambda loss: loss.backward()))
            metrics["generator_grad_norm"] = _clip(self.generator_params, self.cfg.grad_clip)
            self.generator_opt.step()
            self.generator_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        metrics.update(self.critic_backward(critic_batch, step, rng, shared, lambda loss: loss.backward()))
        metrics["critic_grad_norm"] = _clip(self.critic_params, self.cfg.critic_grad_clip)
        self.critic_opt.step()
        self.critic_opt.zero_grad(set_to_none=True)
        if step < self.cfg.ema_start_step or self.trains_generator(step):
            self.ema.update(self.generator_named)
        self.step += 1
        metrics["trained_generator"] = float(self.trains_generator(step))
        return metrics

    def train_ode_step(self, chunks: Sequence[ODEChunk], rng: torch.Generator | None) -> dict[str, float]:
        """One ODE-regression update of the generator (phase "ode"; EMA every step before its start)."""
        self.generator_opt.zero_grad(set_to_none=True)
        loss = ode_regression_loss(self.generator, chunks, rng, self.cfg.ode_weight, self.autocast)
        loss.backward()
        norm = _clip(self.generator_params, self.cfg.grad_clip)
        self.generator_opt.step()
        self.generator_opt.zero_grad(set_to_none=True)
        self.ema.update(self.generator_named)
        self.step += 1
        return {"ode_loss": float(loss.detach()), "generator_grad_norm": norm}

    @torch.no_grad()
    def ema_state_into(self, model: nn.Module) -> nn.Module:
        """Copy the EMA weights into ``model`` (same parameter names as the generator)."""
        params = dict(model.named_parameters())
        for n, v in self.ema.shadow.items():
            params[n].copy_(v.to(params[n].dtype))
        return model


def _clip(params: Sequence[torch.Tensor], clip: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if clip is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
    return float(torch.nn.utils.clip_grad_norm_(grads, float(clip)))


def tiny_teacher():
    """The tiny transformer with its matrices scaled up 6x (seed 0, frozen): a teacher whose outputs move
    enough for the distillation tests' losses and updates to be visible."""
    import torch

    from helios.model.config import named_config
    from helios.model.transformer import build_transformer

    torch.manual_seed(0)
    model = build_transformer(named_config("tiny"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2 and "scale_shift" not in n:
                p.mul_(6.0)
    return model.requires_grad_(False)
