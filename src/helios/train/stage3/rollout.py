"""What the generator is conditioned on (real history, pure teacher forcing) and its few-step rollout
through the sampler's own pyramid loop (:func:`helios.sampling.sampler.denoise_chunk` with hooks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from helios.engine.history import HistoryLayout, split_history
from helios.sampling.dmd import DMDScheduler
from helios.sampling.sampler import ChunkHooks, SamplerSettings, denoise_chunk

from ..corrupt import (HistoryCorruptionConfig, TaskDropoutConfig, apply_task_dropout, degrade_history,
                       saturate_history)
from .critic import History

__all__ = ["history_indices", "prepare_histories", "history_is_empty", "RolloutResult", "generator_rollout"]


def history_indices(layout: HistoryLayout, batch: int, device: torch.device) -> History:
    return {k: v.to(device) for k, v in layout.indices(batch).items()}


def prepare_histories(anchor: torch.Tensor | None, history: torch.Tensor, layout: HistoryLayout,
                      task_dropout: TaskDropoutConfig, corruption: HistoryCorruptionConfig,
                      rng: torch.Generator | None) -> tuple[History, History, list[str]]:
    """Real history (B, C, 19, h, w) + anchor -> ``(scores_history, rollout_history, tasks)``.

    As the official stage 3: task dropout, then noise/downsample corruption; that history is what the
    real/fake scores see. The generator rollout additionally gets the saturation pass (official quirk:
    only the rollout sees saturated history)."""
    long, mid, last = history.split(list(layout.term_sizes), dim=2)
    a = anchor if layout.keep_first_frame else None
    a, long, mid, last, tasks = apply_task_dropout(a, long, mid, last, task_dropout, rng, window=layout.chunk_frames)
    terms = split_history(torch.cat([long, mid, last], dim=2), layout, a)
    short, mid, long, _ = degrade_history(terms["latents_history_short"], terms["latents_history_mid"],
                                          terms["latents_history_long"], corruption, rng, layout,
                                          with_saturation=False)
    idx = history_indices(layout, history.shape[0], history.device)
    scores = {"latents_history_short": short, "latents_history_mid": mid, "latents_history_long": long, **idx}
    if corruption.style == "official":  # (the paper's per-frame style draws saturation in the pass above)
        short, mid, long, _ = saturate_history(short, mid, long, corruption, rng, layout)
    rollout = {"latents_history_short": short, "latents_history_mid": mid, "latents_history_long": long, **idx}
    return scores, rollout, tasks


def history_is_empty(history: History) -> bool:
    """All history latents zero (a T2V start): the official rule for the amplified first chunk."""
    return all(float(v.abs().sum()) == 0 for k, v in history.items() if k.startswith("latents_"))


@dataclass
class RolloutResult:
    x0: torch.Tensor  # (B, C, T, H, W) full-resolution x0 of the last stage (grad at its exit step)
    exits: list[int]  # exit step per stage
    steps: list[int]  # steps of each stage's schedule (doubled when amplified)
    forwards: int  # generator forwards run


def generator_rollout(generator: nn.Module, text: torch.Tensor, history: History, shape: Sequence[int],
                      scheduler: DMDScheduler, steps_per_stage: Sequence[int], rng: torch.Generator | None,
                      shared: torch.Generator | None = None, amplify: bool = False,
                      exits: Sequence[int] | None = None, grad: bool = True,
                      noise_dtype: torch.dtype | None = None) -> RolloutResult:
    """Backward simulation with the distilled sampler (official ``inference_with_trajectory_stage2``).

    Exactly the inference path (:func:`helios.sampling.sampler.denoise_chunk` with a DMDScheduler,
    same draws from ``rng``: the chunk noise, then one block noise per stage > 0), except that every
    stage stops at its exit step ``e_k`` (``randint(steps)`` from ``shared``, or ``exits``): steps
    before it run without gradients; the exit step runs with gradients (when ``grad``) and its x0 starts
    the next stage. Gradients therefore reach G through the last stage's exit forward and, when a stage
    exits at its first step, through the previous stage's exit forward too, as in the official code.
    With ``exits`` = the last step of every stage the output equals the sampler's.
    """
    device = next(generator.parameters()).device
    used_exits, used_steps = [], []

    def exit_step(stage: int, num_steps: int) -> int:
        e = int(exits[stage]) if exits is not None else int(torch.randint(num_steps, (1,), generator=shared).item())
        used_exits.append(e)
        used_steps.append(num_steps)
        return e

    def model_context(stage: int, step: int, exiting: bool):
        return torch.set_grad_enabled(grad and torch.is_grad_enabled()) if exiting else torch.no_grad()

    def predict(x, t, with_uncond):
        return generator(x, t, text, **history).sample, None

    settings = SamplerSettings(pyramid_steps=tuple(steps_per_stage), guidance_scale=1.0, amplify_first_chunk=amplify)
    x = denoise_chunk(predict, tuple(shape), scheduler, settings, rng, device, first_chunk=True,
                      noise_dtype=noise_dtype, hooks=ChunkHooks(exit_step, model_context))
    return RolloutResult(x, used_exits, used_steps, sum(e + 1 for e in used_exits))
