"""Stage 3: Adversarial Hierarchical Distillation (DMD + GAN) of a pyramid Helios into a few-step sampler.

How the official code does it is in docs/training-notes.md (section 3); this module is the same
recipe as plain functions around any :class:`~helios.model.transformer.HeliosTransformer` size:

* **models** - the *generator* G is its own transformer (full or LoRA). The *real score* and the
  *fake score* share ONE frozen base transformer: the fake score is the base plus a peft LoRA adapter
  (the critic), the real score is the same module with the adapter switched off, so it is exactly the
  frozen teacher. The GAN heads (:class:`GANHeads`) read the critic's noisy-token features after a few
  blocks and its output. :class:`ScoreCritic` bundles the three.
* **(a) ODE init** - :func:`teacher_trajectory` runs the teacher's multi-step pyramid sampler
  (:func:`helios.sampling.sampler.denoise_chunk`, unchanged), makes each stage's schedule also visit the
  timesteps the few-step student will visit (as the official ODE-pair pipeline) and records the states
  there plus every stage's end point; :func:`ode_regression_loss` regresses G's x0 prediction from those
  states onto the stage end points (weight 80). :mod:`helios.train.ode` stores them and trains on them.
* **(b) rollout** - :func:`generator_rollout` is the distilled inference sampler (DMDScheduler over the
  pyramid, 2 steps per stage) with one random *exit* step per stage: steps before it run without
  gradients, the exit step with them, and its x0 starts the next stage. Its output is x0 at full size.
* **(c) DMD** - :func:`dmd_loss`: re-noise x0, ``g = (fake - real) / mean|x0 - real|`` with the real score
  under CFG 3.0 (cond + 3 (cond - uncond)), ``L = 0.5 MSE(x0, x0 - g)``.
* **(d) critic** - :func:`critic_flow_loss`: flow matching of the fake score on re-noised G samples.
* **(e) GAN** - :func:`generator_gan_loss` (``softplus(D(fake))``, gradient to the input only) and
  :func:`discriminator_loss` (``0.01 [softplus(-D(fake)) + softplus(D(real))]`` + approximate R1
  ``100 MSE(D(real), D(real + 0.1 n))``), on random half-size crops.
* **(f) loop** - :class:`Distiller`: critic every step, generator every 5th, two AdamW optimisers
  (2e-6 / 4e-7, betas (0, 0.999)), EMA of G.

Randomness comes only from ``torch.Generator`` arguments. Two kinds are kept apart so that sharded
(FSDP) runs stay in lock-step: ``shared`` draws decide *how many* forwards run (exit steps, which
model trains) and must be identical on every rank; ``rng`` draws are per batch (noise, timesteps,
crops) and may differ.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from helios.engine.history import HistoryBuffer, HistoryLayout, split_history
from helios.model.transformer import HeliosTransformer
from helios.sampling.dmd import DMDScheduler, flow_to_x0
from helios.sampling.pyramid import noise_like
from helios.sampling.sampler import ChunkHooks, SamplerSettings, denoise_chunk, stage_timesteps
from helios.sampling.schedulers import config_from_dict

from .corrupt import HistoryCorruptionConfig, TaskDropoutConfig, apply_task_dropout, degrade_history, saturate_history
from .timesteps import TimestepConfig, dmd_sigma_table, noise_at_timestep, sample_dmd_timesteps

__all__ = [
    "GANConfig", "DistillConfig", "lora_targets", "add_lora", "adapters_enabled", "scaled_head_blocks",
    "GANHead", "GANHeads", "ScoreCritic", "build_generator", "History", "prepare_histories",
    "RolloutResult", "generator_rollout", "ODEStage", "ODEChunk", "student_timesteps", "teacher_trajectory",
    "teacher_video_trajectories", "ode_regression_loss", "SigmaTable", "sigma_table", "dmd_loss",
    "critic_flow_loss", "gan_crop", "gan_loss", "generator_gan_loss", "discriminator_loss", "EMA",
    "ema_decay_at", "distilled_scheduler_config", "OFFICIAL_NEGATIVE_PROMPT", "history_is_empty", "DistillBatch",
    "Distiller",
]

History = dict[str, torch.Tensor]  # the transformer's history keyword arguments (latents + RoPE indices)


# ----------------------------------------------------------------------------------------------
# configuration (defaults = the official stage-3 GAN recipe, src/helios/train/recipes/stage3.yaml)


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


# ----------------------------------------------------------------------------------------------
# LoRA (peft) on a plain transformer


def lora_targets(model: nn.Module, extra: Sequence[str] = (), exclude: Sequence[str] = ("down", "up")) -> list[str]:
    """Official ``all-linear`` targets: every nn.Linear whose name has no ``norm`` (minus modules named
    in ``exclude``), plus ``extra`` module names (e.g. the memory patch Conv3d's)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + list(extra)
    return [n for n in dict.fromkeys(names) if "norm" not in n and n.rsplit(".", 1)[-1] not in set(exclude)]


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None,
             adapter_name: str = "default", dropout: float = 0.0) -> list[nn.Parameter]:
    """Inject a peft LoRA adapter (official ``init_lora_weights="gaussian"``: A ~ N(0, 1/r), B = 0, so
    the adapted model starts equal to the base). Freezes everything else; returns the LoRA parameters
    (float32, as the official ``cast_training_params``)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                     init_lora_weights="gaussian", target_modules=list(targets or lora_targets(model)))
    inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    params = []
    for n, p in model.named_parameters():
        if f"lora_A.{adapter_name}." in n or f"lora_B.{adapter_name}." in n:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_enabled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Switch every LoRA adapter of ``model`` on/off inside the block (peft's disable_adapters): with
    them off each adapted layer runs its base layer only, i.e. exactly the base model. peft's switch
    also flips the adapters' requires_grad; they are kept as the caller set them (a frozen critic must
    stay frozen, and gradient checkpointing must recompute with the flags of the original forward)."""
    layers = _tuner_layers(model)
    before = [not m.disable_adapters for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(enabled)
    for p, g in grads:
        p.requires_grad_(g)
    try:
        yield
    finally:
        for m, on in zip(layers, before):
            m.enable_adapters(on)
        for p, g in grads:
            p.requires_grad_(g)


# ----------------------------------------------------------------------------------------------
# GAN heads and the critic (real score + fake score + discriminator over one base)


def scaled_head_blocks(num_layers: int, blocks: Sequence[int] = (5, 15, 25, 35),
                       reference_layers: int = 40) -> tuple[int, ...]:
    """The official tap points (for 40 blocks) at the same relative depths of a ``num_layers`` model."""
    return tuple(sorted({min(num_layers - 1, round(b * num_layers / reference_layers)) for b in blocks}))


class GANHead(nn.Module):
    """Official ``Discriminator3DHead``: Conv3d(k3) -> 2x Conv3d(k4, s2) -> 2x Conv3d(k3, s(2,1,1)) ->
    Conv3d(k(1,3,3)), each + GroupNorm(32) + SiLU, global average pool, Linear -> one logit."""

    def __init__(self, in_channels: int, width: int = 768):
        super().__init__()
        convs = [nn.Conv3d(in_channels, width, 3, 1, 1), nn.Conv3d(width, width, 4, 2, 1),
                 nn.Conv3d(width, width, 4, 2, 1), nn.Conv3d(width, width, 3, (2, 1, 1), 1),
                 nn.Conv3d(width, width, 3, (2, 1, 1), 1), nn.Conv3d(width, width, (1, 3, 3), 1, (0, 1, 1))]
        layers: list[nn.Module] = []
        for c in convs:
            layers += [c, nn.GroupNorm(32, width), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Small models / latents: zero-pad (T, H, W) up to 4 so both stride-2 convs have an input;
        # never triggers at the official sizes (token grid 9 x 12 x 20 and up).
        pad = [p for d in (x.shape[4], x.shape[3], x.shape[2]) for p in (0, max(0, 4 - d))]
        if any(pad):
            x = F.pad(x, pad)
        return self.net(x.to(self.net[0].weight.dtype)).float()


class GANHeads(nn.Module):
    """One head per tapped block (``dim`` channels of noisy-token features) + one on the output."""

    def __init__(self, dim: int, out_channels: int, blocks: Sequence[int], final: bool = True, width: int = 768):
        super().__init__()
        if width % 32:
            raise ValueError(f"GAN head width must be a multiple of 32 (GroupNorm(32)), got {width}")
        self.blocks = tuple(int(b) for b in blocks)
        self.final = GANHead(out_channels, width) if final else None
        self.taps = nn.ModuleDict({str(b): GANHead(dim, width) for b in self.blocks})
        if self.final is None and not self.blocks:
            raise ValueError("GAN heads need at least one tapped block or the final head")

    def forward(self, output: torch.Tensor, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, n_heads) logits, the final head first (official order)."""
        logits = [self.final(output)] if self.final is not None else []
        logits += [self.taps[str(b)](features[b]) for b in self.blocks]
        return torch.cat(logits, dim=1)


class ScoreCritic(nn.Module):
    """The frozen base transformer with the critic LoRA (fake score) and the GAN heads.

    ``real(...)`` runs with the adapter off (= the frozen teacher), ``fake(...)`` with it on,
    ``logits(...)`` runs the fake score and the heads on its block features. Only the LoRA and the
    heads are trainable; the base stays frozen (and may be bfloat16)."""

    def __init__(self, base: HeliosTransformer, rank: int = 256, alpha: float | None = None,
                 gan: GANConfig | None = None, adapter_name: str = "critic"):
        super().__init__()
        self.transformer = base
        self.lora_parameters = add_lora(base, rank, alpha, lora_targets(base), adapter_name)
        n = base.config.num_layers
        self.heads: GANHeads | None = None
        if gan is not None and gan.enabled:
            bad = [b for b in gan.head_blocks if not 0 <= b < n]
            if bad:
                raise ValueError(f"GAN head blocks {bad} outside the model's {n} blocks "
                                 f"(use scaled_head_blocks({n}))")
            self.heads = GANHeads(base.config.dim, base.config.out_channels, gan.head_blocks, gan.final_head,
                                  gan.head_dim).to(base.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def fake(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, history: History) -> torch.Tensor:
        with adapters_enabled(self.transformer, True):
            return self.transformer(x, t, text, **history).sample

    def real(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, history: History) -> torch.Tensor:
        with adapters_enabled(self.transformer, False):
            return self.transformer(x, t, text, **history).sample

    def logits(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, history: History) -> torch.Tensor:
        """Discriminator logits (B, n_heads) of noisy latents ``x`` (fake score, adapter on)."""
        if self.heads is None:
            raise RuntimeError("this critic has no GAN heads (gan.enabled is false)")
        feats: dict[int, torch.Tensor] = {}
        pt, ph, pw = self.transformer.config.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        n = grid[0] * grid[1] * grid[2]

        def tap(idx: int):
            def hook(_module, _inputs, out):  # the block's noisy tokens -> (B, D, f, h, w)
                feats[idx] = out[:, -n:].transpose(1, 2).unflatten(2, grid)
            return hook

        handles = [self.transformer.blocks[b].register_forward_hook(tap(b)) for b in self.heads.blocks]
        try:
            out = self.fake(x, t, text, history)
        finally:
            for h in handles:
                h.remove()
        return self.heads(out, feats)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """No parameter of the critic records gradients inside the block (the generator's GAN step)."""
        params = self.trainable_parameters()
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def build_generator(init: HeliosTransformer, lora_rank: int | None = 256, lora_alpha: float | None = None,
                    memory_patches: bool = True,
                    copy_model: bool = True) -> tuple[HeliosTransformer, list[nn.Parameter]]:
    """The generator: its own transformer (a copy of ``init`` unless ``copy_model=False``), with LoRA on
    all linears (+ the memory patchifiers, official ``is_train_lora_multi_term_memory_patchg``) or, with
    ``lora_rank=None``, fully trainable (float32). Returns ``(model, trainable parameters)``."""
    g = copy.deepcopy(init) if copy_model else init
    if lora_rank is None:
        g.requires_grad_(True)
        for p in g.parameters():
            p.data = p.data.float()
        return g, list(g.parameters())
    patches = memory_patches and g.config.has_multi_term_memory_patch
    extra = ("patch_short", "patch_mid", "patch_long") if patches else ()
    return g, add_lora(g, lora_rank, lora_alpha, lora_targets(g, extra), "generator")


# ----------------------------------------------------------------------------------------------
# history inputs (real history, pure teacher forcing)


def _indices(layout: HistoryLayout, batch: int, device: torch.device) -> History:
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
    idx = _indices(layout, history.shape[0], history.device)
    scores = {"latents_history_short": short, "latents_history_mid": mid, "latents_history_long": long, **idx}
    if corruption.style == "official":  # (the paper's per-frame style draws saturation in the pass above)
        short, mid, long, _ = saturate_history(short, mid, long, corruption, rng, layout)
    rollout = {"latents_history_short": short, "latents_history_mid": mid, "latents_history_long": long, **idx}
    return scores, rollout, tasks


def history_is_empty(history: History) -> bool:
    """All history latents zero (a T2V start): the official rule for the amplified first chunk."""
    return all(float(v.abs().sum()) == 0 for k, v in history.items() if k.startswith("latents_"))


# ----------------------------------------------------------------------------------------------
# (b) the generator's few-step pyramid rollout


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


# ----------------------------------------------------------------------------------------------
# (a) ODE pairs from the teacher and the ODE regression loss


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
    idx = _indices(layout, b, device)
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


# ----------------------------------------------------------------------------------------------
# (c) DMD and (d) critic losses


@dataclass
class SigmaTable:
    """Stage-3 re-noise table: ``sigmas = linspace(1, 1/1000, 1000)`` shifted by the dynamic factor of
    the critic input, ``timesteps = 1000 sigmas``, and that factor (also the timestep-sampling shift)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    shift: float


def sigma_table(latent_shape: Sequence[int], cfg: TimestepConfig) -> SigmaTable:
    """For a critic input of ``latent_shape`` (B, C, T, H, W) (official: ``(1, 16, 9, H, W)``)."""
    s, t, m = dmd_sigma_table((1, *latent_shape[1:]), cfg)
    return SigmaTable(s, t, m)


def sample_timesteps(batch: int, table: SigmaTable, spec: dict[str, Any], cfg: DistillConfig, step: int,
                     rng: torch.Generator | None) -> torch.Tensor:
    return sample_dmd_timesteps(batch, shift=table.shift, sample_type=spec.get("sample_type", "uniform"),
                                alpha=float(spec.get("alpha", 4.0)), beta=float(spec.get("beta", 1.5)),
                                global_step=step, dynamic_step=int(spec.get("decay_steps", 500)),
                                min_step=cfg.min_step, max_step=cfg.max_step, generator=rng)


def _renoise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             table: SigmaTable) -> tuple[torch.Tensor, torch.Tensor]:
    xt, s = noise_at_timestep(x0, noise, t, table.sigmas, table.timesteps)
    return xt.to(x0.dtype), s.to(x0.device)


def dmd_loss(critic: ScoreCritic, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table: SigmaTable,
             text: torch.Tensor, negative_text: torch.Tensor, history: History, real_guidance_scale: float = 3.0,
             fake_guidance_scale: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Official ``compute_distribution_matching_loss`` / ``compute_kl_grad`` (no gradient to the critic):

        x_t = (1 - s_t) x0 + s_t eps;  f = x0(fake(x_t));  r = rc + g (rc - ru)  (cond / negative prompt)
        grad = (f - r) / mean_{c,t,h,w} |x0 - r|  (nan -> 0);   L = 0.5 MSE(x0, (x0 - grad).detach())  in float64
    """
    with torch.no_grad():
        xt, s = _renoise(x0.detach(), noise, t, table)
        tt = t.to(x0.device)
        neg = negative_text.expand_as(text) if negative_text.shape[0] != text.shape[0] else negative_text
        fake = flow_to_x0(critic.fake(xt, tt, text, history), xt, s)
        if fake_guidance_scale != 0.0:
            fu = flow_to_x0(critic.fake(xt, tt, neg, history), xt, s)
            fake = fake + (fake - fu) * fake_guidance_scale
        real = flow_to_x0(critic.real(xt, tt, text, history), xt, s)
        if real_guidance_scale != 0.0:
            ru = flow_to_x0(critic.real(xt, tt, neg, history), xt, s)
            real = real + (real - ru) * real_guidance_scale
        norm = (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((fake - real) / norm)
    loss = 0.5 * F.mse_loss(x0.double(), (x0.double() - grad.double()).detach())
    return loss, {"dmd_grad_norm": float(grad.abs().mean())}


def critic_flow_loss(critic: ScoreCritic, x0_fake: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     table: SigmaTable, text: torch.Tensor, history: History) -> torch.Tensor:
    """Fake-score denoising loss: ``mean (fake(x_t, t) - (eps - x0))^2`` on detached generator samples."""
    x0_fake = x0_fake.detach()
    xt, _ = _renoise(x0_fake, noise, t, table)
    v = critic.fake(xt, t.to(xt.device), text, history)
    return torch.mean((v.float() - (noise - x0_fake).float()) ** 2)


# ----------------------------------------------------------------------------------------------
# (e) GAN losses


def gan_crop(x: torch.Tensor, scale: float, rng: torch.Generator | None,
             corners: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Random (H*scale) x (W*scale) crop per sample (official ``gan_crop_video_spatial``); returns the
    crops and their corners (pass ``corners`` to cut the same windows again)."""
    B, _, _, H, W = x.shape
    h, w = int(H * scale), int(W * scale)
    if corners is None:
        tops = torch.randint(0, H - h + 1, (B,), generator=rng).tolist()
        lefts = torch.randint(0, W - w + 1, (B,), generator=rng).tolist()
        corners = list(zip(tops, lefts))
    return torch.stack([x[i, :, :, a:a + h, c:c + w] for i, (a, c) in enumerate(corners)]), corners


def gan_loss(logits: torch.Tensor, label: int) -> torch.Tensor:
    """Official ``cal_gan_loss``: ``mean softplus(label * logits)`` over the batch and all heads
    (label 1: push logits down, -1: push them up). Real samples get low logits, fakes high."""
    return F.softplus(logits.float() * label).mean()


class _InputGradLoss(torch.autograd.Function):
    """Official ``Gan_D_Loss_With_Cached_Grad``: the loss and its gradient w.r.t. the input are computed
    in the forward (the critic's activations are freed right away); backward only hands that gradient on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            loss = fn(xd)
            (g,) = torch.autograd.grad(loss, xd)
        ctx.save_for_backward(g)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (g,) = ctx.saved_tensors
        return g * grad_output, None


def generator_gan_loss(critic: ScoreCritic, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       table: SigmaTable, text: torch.Tensor, history: History, crop_scale: float,
                       rng: torch.Generator | None) -> torch.Tensor:
    """``L_G = mean softplus(D(crop(renoise(x0, t))))``: gradient to x0 (hence G) only, never to the critic."""
    xt, _ = _renoise(x0, noise, t, table)  # differentiable in x0
    crop, _ = gan_crop(xt, crop_scale, rng)
    tt = t.to(x0.device)
    with critic.frozen():
        return _InputGradLoss.apply(crop, lambda c: gan_loss(critic.logits(c, tt, text, history), 1))


def discriminator_loss(critic: ScoreCritic, x0_fake: torch.Tensor, x0_real: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, table: SigmaTable, text: torch.Tensor, history: History, gan: GANConfig,
                       rng: torch.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic GAN loss (official ``_critic_loss``, GAN part): fake and real re-noised with the same eps and
    t, random crops, one batched D forward over [fake, real, real + sigma_r1 n]:

        L = d_w [mean softplus(-D(fake)) + mean softplus(D(real))] + r1_w MSE(D(real), D(real + 0.1 n))
    """
    xf, _ = _renoise(x0_fake.detach(), noise, t, table)
    xr, _ = _renoise(x0_real.to(x0_fake.dtype), noise, t, table)
    cf, _ = gan_crop(xf, gan.crop_scale, rng)
    cr, corners = gan_crop(xr, gan.crop_scale, rng)
    cp, _ = gan_crop(xr, gan.crop_scale, rng, corners if gan.r1_same_crop else None)
    cp = cp + gan.r1_sigma * noise_like(cp, rng)
    B = x0_fake.shape[0]
    rep = {k: torch.cat([v] * 3) for k, v in history.items()}
    logits = critic.logits(torch.cat([cf, cr, cp]), t.to(xf.device).repeat(3), torch.cat([text] * 3), rep)
    lf, lr, lp = logits[:B], logits[B:2 * B], logits[2 * B:]
    d_fake = gan_loss(lf, -1) * gan.d_weight
    d_real = gan_loss(lr, 1) * gan.d_weight
    r1 = gan.r1_weight * F.mse_loss(lr.float(), lp.float())
    loss = d_fake + d_real + r1
    return loss, {"gan_d_loss": float((d_fake + d_real).detach()), "r1_loss": float(r1.detach()),
                  "d_real_logit": float(lr.detach().mean()), "d_fake_logit": float(lf.detach().mean())}


# ----------------------------------------------------------------------------------------------
# (f) EMA and the update schedule


class EMA:
    """EMA of the generator's trainable parameters (official diffusers EMAModel, ``update_after_step``):
    ``decay_n = 0`` (copy) for the first ``start_step`` updates, then ``min((1 + s) / (10 + s), decay)``
    with ``s = n - start_step - 1``. The official loop updates it every iteration before ``start_step``
    and then only on generator iterations (:meth:`Distiller.train_step` does the same)."""

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


# The official default negative prompt (helios/utils/train_config.py), used by the real score's CFG.
OFFICIAL_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards")


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
    updated every iteration (flow matching, + GAN + R1 from ``gan.start_step``); then the EMA. The
    ``*_backward`` methods only compute losses and call ``backward``, so a training loop that owns
    sharding, clipping and optimisers can use them; :meth:`train_step` is the self-contained version."""

    def __init__(self, generator: nn.Module, critic: ScoreCritic, cfg: DistillConfig, scheduler: DMDScheduler,
                 timesteps: TimestepConfig, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 generator_params: Sequence[nn.Parameter] | None = None, own_optimizers: bool = True):
        self.generator, self.critic, self.cfg, self.scheduler = generator, critic, cfg, scheduler
        self.timestep_cfg, self.autocast = timesteps, autocast
        gp = list(generator_params) if generator_params is not None else [
            p for p in generator.parameters() if p.requires_grad]
        ids = {id(p) for p in gp}
        self.generator_named = [(n, p) for n, p in generator.named_parameters() if id(p) in ids]
        self.generator_params = [p for _, p in self.generator_named]
        self.critic_params = critic.trainable_parameters()
        self.generator_opt = self.critic_opt = self.ema = None  # a training loop may own them instead
        if own_optimizers:
            self.generator_opt = torch.optim.AdamW(self.generator_params, lr=cfg.generator_lr, betas=tuple(cfg.betas),
                                                   eps=cfg.eps, weight_decay=cfg.weight_decay)
            self.critic_opt = torch.optim.AdamW(self.critic_params, lr=cfg.critic_lr, betas=tuple(cfg.betas),
                                                eps=cfg.eps, weight_decay=cfg.weight_decay)
            self.ema = EMA(self.generator_named, cfg.ema_decay, cfg.ema_start_step)
        self.step = 0
        self._tables: dict[tuple[int, ...], SigmaTable] = {}

    # ---- schedule ----
    def trains_generator(self, step: int) -> bool:
        return step % self.cfg.critic_updates_per_generator_update == 0

    def uses_gan(self, step: int) -> bool:
        return self.cfg.gan.enabled and self.critic.heads is not None and step >= self.cfg.gan.start_step

    def table(self, shape: Sequence[int]) -> SigmaTable:
        key = tuple(shape[1:])
        if key not in self._tables:
            self._tables[key] = sigma_table(shape, self.timestep_cfg)
        return self._tables[key]

    def rollout(self, batch: DistillBatch, rng: torch.Generator | None, shared: torch.Generator | None,
                grad: bool, amplify: bool | None = None, exits: Sequence[int] | None = None) -> RolloutResult:
        if amplify is None:
            amplify = self.cfg.amplify_first_chunk and history_is_empty(batch.rollout_history)
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
        with self.autocast():
            loss, m = dmd_loss(self.critic, x0, t, noise_like(x0, rng), table, batch.text, batch.negative_text,
                               batch.history, cfg.real_guidance_scale, cfg.fake_guidance_scale)
            metrics = {"dmd_loss": float(loss.detach()), **m, "rollout_forwards": float(out.forwards)}
            if self.uses_gan(step):
                lg = generator_gan_loss(self.critic, x0, t, noise_like(x0, rng), table, batch.text, batch.history,
                                        cfg.gan.crop_scale, rng)
                metrics["gan_g_loss"] = float(lg.detach())
                loss = loss + cfg.gan.g_weight * lg
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
        return metrics

    # ---- self-contained step ----
    def train_step(self, generator_batch: DistillBatch, critic_batch: DistillBatch, rng: torch.Generator | None,
                   shared: torch.Generator | None = None) -> dict[str, float]:
        """One iteration (generator update when due, critic update, EMA); returns float metrics."""
        self._check_standalone()
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
        self._check_standalone()
        self.generator_opt.zero_grad(set_to_none=True)
        loss = ode_regression_loss(self.generator, chunks, rng, self.cfg.ode_weight, self.autocast)
        loss.backward()
        norm = _clip(self.generator_params, self.cfg.grad_clip)
        self.generator_opt.step()
        self.generator_opt.zero_grad(set_to_none=True)
        self.ema.update(self.generator_named)
        self.step += 1
        return {"ode_loss": float(loss.detach()), "generator_grad_norm": norm}

    def _check_standalone(self) -> None:
        if self.generator_opt is None:
            raise RuntimeError("this Distiller was built with own_optimizers=False: its training loop steps it")

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
