"""(a) The teacher's ODE trajectories (official ``get_ode-pairs.py`` with ``pipeline_helios_ode.py``) and
the ODE regression loss. The teacher samples with :func:`helios.sampling.sampler.denoise_chunk`, unchanged."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from helios.engine.history import HistoryBuffer, HistoryLayout
from helios.sampling.dmd import DMDScheduler
from helios.sampling.schedulers import flow_to_x0
from helios.sampling.sampler import SamplerSettings, denoise_chunk, stage_timesteps

from .critic import History
from .rollout import history_indices

__all__ = ["ODEStage", "ODEChunk", "student_timesteps", "teacher_trajectory", "teacher_video_trajectories",
           "ode_regression_loss"]


@dataclass
class ODEStage:
    states: torch.Tensor  # (n, B, C, T, h, w) teacher states at the student's timesteps
    timesteps: torch.Tensor  # (n,) int64 timesteps fed to the model at those states
    sigmas: torch.Tensor  # (n,) float64 local sigma of each state (x0 = x - sigma v)
    target: torch.Tensor  # (B, C, T, h, w) the stage's end point (teacher)


@dataclass
class ODEChunk:
    stages: list[ODEStage]
    history: History  # what the teacher was conditioned on
    text: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.stages[-1].target


def student_timesteps(scheduler: DMDScheduler, shape: Sequence[int], steps_per_stage: Sequence[int],
                      amplify: bool = False) -> list[list[float]]:
    """Timesteps the few-step sampler visits, per stage (where the ODE states are recorded)."""
    settings = SamplerSettings(pyramid_steps=tuple(steps_per_stage), guidance_scale=1.0, amplify_first_chunk=amplify)
    return stage_timesteps(scheduler, shape, settings, first_chunk=True)


class _RecordingScheduler:
    """Wraps the teacher's scheduler: every step's input sample, timestep and sigma, and each stage's
    final output, are kept. With ``record_at``, stage k's schedule also visits the timesteps
    ``record_at[k]`` (inserted, as the official ODE-pair generation does). Everything else is the
    wrapped scheduler's."""

    def __init__(self, sched, record_at: Sequence[Sequence[float]] | None = None):
        self._s = sched
        self._record_at = record_at
        self.stages: list[dict[str, list]] = []

    def __getattr__(self, name: str):
        return getattr(self._s, name)

    def set_timesteps(self, *args, **kwargs):
        if self._record_at is not None:
            kwargs["extra_timesteps"] = list(self._record_at[len(self.stages)])
        out = self._s.set_timesteps(*args, **kwargs)
        self.stages.append({"x": [], "t": [], "s": [], "out": None})
        return out

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, *rest) -> torch.Tensor:
        i = self._s.step_index
        rec = self.stages[-1]
        rec["x"].append(sample.detach().clone())
        rec["t"].append(float(self._s.timesteps_cpu[i]))
        rec["s"].append(float(self._s.sigmas[i]))
        out = self._s.step(model_output, sample, *rest)
        rec["out"] = out.detach().clone()
        return out


@torch.no_grad()
def teacher_trajectory(teacher: nn.Module, text: torch.Tensor, history: History, shape: Sequence[int],
                       scheduler, settings: SamplerSettings, rng: torch.Generator | None,
                       record_at: Sequence[Sequence[float]] | None = None,
                       negative_text: torch.Tensor | None = None, first_chunk: bool = False) -> ODEChunk:
    """Run the teacher's multi-step pyramid sampler (``denoise_chunk``, unchanged) on one chunk and keep,
    per stage, the states at the timesteps ``record_at[k]`` (see :func:`student_timesteps`; the teacher's
    schedule is made to visit them; None keeps every step) and the stage's end point (official
    ``get_ode-pairs.py``). The kept timesteps are truncated to integers, as the pyramid samplers feed them."""
    device = next(teacher.parameters()).device
    if settings.pyramid_steps is None:
        raise ValueError("the ODE pairs come from a pyramid sampler (settings.pyramid_steps)")

    def predict(x, t, with_uncond):
        cond = teacher(x, t, text, **history).sample
        if not with_uncond:
            return cond, None
        if negative_text is None:
            raise ValueError("guidance_scale > 1 needs negative_text")
        return cond, teacher(x, t, negative_text.expand_as(text), **history).sample

    rec = _RecordingScheduler(scheduler, record_at)
    final = denoise_chunk(predict, tuple(shape), rec, settings, rng, device, first_chunk=first_chunk)
    stages = []
    for k, r in enumerate(rec.stages):
        ts = torch.tensor(r["t"], dtype=torch.float64)
        keep = list(range(len(ts)))
        if record_at is not None:
            missed = [t for t in record_at[k] if float((ts - float(t)).abs().min()) > 1e-6]
            if missed:
                raise RuntimeError(f"the teacher's stage {k} does not visit the timesteps {missed}: its scheduler "
                                   "must take extra_timesteps (helios.sampling.schedulers.FlowScheduler)")
            keep = sorted({int(torch.argmin((ts - float(t)).abs())) for t in record_at[k]})
        stages.append(ODEStage(torch.stack([r["x"][i] for i in keep]), ts[keep].trunc().to(torch.int64),
                               torch.tensor([r["s"][i] for i in keep], dtype=torch.float64), r["out"]))
    if not torch.equal(stages[-1].target, final):
        raise RuntimeError("recorded trajectory does not end at the sampler's output")
    return ODEChunk(stages, history, text)


def teacher_video_trajectories(teacher: nn.Module, text: torch.Tensor, layout: HistoryLayout, shape: Sequence[int],
                               num_sections: int, scheduler, settings: SamplerSettings, rng: torch.Generator | None,
                               record_at: Callable[[int], Sequence[Sequence[float]] | None] | None = None,
                               negative_text: torch.Tensor | None = None) -> list[ODEChunk]:
    """A T2V video of ``num_sections`` chunks by the teacher, each conditioned on the teacher's own
    previous outputs (anchor = first latent frame of chunk 0), as the official ODE-pair data.
    ``record_at(k)`` gives chunk k's recording timesteps (the amplified first chunk visits more)."""
    b, c, _, h, w = shape
    device = next(teacher.parameters()).device
    buf = HistoryBuffer(b, c, h, w, layout, device=device)
    idx = history_indices(layout, b, device)
    out = []
    for k in range(num_sections):
        hist = {**{n: v.clone() for n, v in buf.model_inputs(torch.float32).items()}, **idx}
        chunk = teacher_trajectory(teacher, text, hist, shape, scheduler, settings, rng,
                                   record_at(k) if record_at else None, negative_text, first_chunk=(k == 0))
        if k == 0 and layout.keep_first_frame:
            buf.set_anchor(chunk.final[:, :, :1])
        buf.push(chunk.final)
        out.append(chunk)
    return out


def ode_regression_loss(generator: nn.Module, chunks: Sequence[ODEChunk], rng: torch.Generator | None,
                        weight: float = 80.0, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                        backward: Callable[..., None] | None = None) -> torch.Tensor:
    """Official ``_ode_regression_loss``: per chunk and pyramid stage one recorded state ``x`` (random),
    ``x0 = x - sigma G(x, t)``, ``0.5 MSE(x0, stage end)``; ``weight * mean`` over all of them.

    With ``backward``, each term's share is handed to ``backward(loss, last=...)`` right after its forward
    (the same gradient, with one forward's activations alive at a time) and the loss comes back detached."""
    terms = [(chunk, st) for chunk in chunks for st in chunk.stages]
    losses = []
    for n, (chunk, st) in enumerate(terms):
        j = int(torch.randint(len(st.timesteps), (1,), generator=rng).item())
        x = st.states[j]
        t = st.timesteps[j].expand(x.shape[0]).to(x.device)
        with autocast():
            x0 = flow_to_x0(generator(x, t, chunk.text, **chunk.history).sample, x, float(st.sigmas[j]))
        loss = 0.5 * F.mse_loss(x0.float(), st.target.float())
        if backward is not None:
            backward(loss * (weight / len(terms)), last=n == len(terms) - 1)
            loss = loss.detach()
        losses.append(loss)
    return weight * torch.stack(losses).mean()
