"""Stage 3: Adversarial Hierarchical Distillation (DMD + GAN) of a pyramid Helios into a few-step sampler.

How the official code does it is in docs/training-notes.md (section 3); these modules are the same
recipe as plain functions around any :class:`~helios.model.transformer.HeliosTransformer` size:

* :mod:`.config` - the settings (defaults: the official recipe), the few-step scheduler config, the EMA schedule.
* :mod:`.critic` - the *generator* G is its own transformer (full or LoRA). The *real score* and the *fake
  score* share ONE frozen base transformer: the fake score is the base plus a peft LoRA adapter (the
  critic), the real score is the same module with the adapter switched off, so it is exactly the frozen
  teacher. The GAN heads read the critic's noisy-token features after a few blocks and its output.
* :mod:`.trajectories` - (a) ODE init: the teacher's multi-step pyramid sampler (``denoise_chunk``,
  unchanged) made to also visit the student's timesteps, and the ODE regression loss (weight 80).
* :mod:`.rollout` - (b) the distilled inference sampler with one random *exit* step per pyramid stage,
  run by the sampler's own loop through :class:`helios.sampling.sampler.ChunkHooks`.
* :mod:`.losses` - (c) DMD (real score under CFG), (d) the critic's flow matching, (e) the GAN terms
  with approximate R1 on random half-size crops.
* :mod:`.distiller` - one iteration's generator and critic losses (generator every 5th iteration).
* :mod:`.stage` - phase ``dmd`` in ``helios train`` (generator + critic, two optimiser groups).
* :mod:`.ode` - phase ``ode``: making the teacher's pairs (``python -m helios.train.ode``) and the
  regression phase in ``helios train``.

Randomness comes only from ``torch.Generator`` arguments. Two kinds are kept apart so that sharded
(FSDP) runs stay in lock-step: ``shared`` draws decide *how many* forwards run (exit steps, which
model trains) and must be identical on every rank; ``rng`` draws are per batch (noise, timesteps,
crops) and may differ.
"""

from .config import OFFICIAL_NEGATIVE_PROMPT, DistillConfig, GANConfig, distilled_scheduler_config, ema_decay_at
from .critic import (GANHead, GANHeads, History, ScoreCritic, adapters_enabled, add_lora, build_generator,
                     lora_targets, scaled_head_blocks)
from .distiller import DistillBatch, Distiller
from .losses import (SigmaTable, critic_flow_loss, discriminator_loss, dmd_loss, gan_crop, gan_loss,
                     generator_gan_loss, sigma_table)
from .ode import ODEPairDataset, ODERegressionStage, make_ode_pairs, ode_chunks
from .rollout import RolloutResult, generator_rollout, history_is_empty, prepare_histories
from .stage import DistillStage, FewStepStage, few_step_scheduler_config, pyramid_scheduler_config, real_score_folder
from .trajectories import (ODEChunk, ODEStage, ode_regression_loss, student_timesteps, teacher_trajectory,
                           teacher_video_trajectories)

__all__ = [
    "OFFICIAL_NEGATIVE_PROMPT", "DistillBatch", "DistillConfig", "DistillStage", "Distiller", "FewStepStage",
    "GANConfig", "GANHead", "GANHeads", "History", "ODEChunk", "ODEPairDataset", "ODERegressionStage", "ODEStage",
    "RolloutResult", "ScoreCritic", "SigmaTable", "adapters_enabled", "add_lora", "build_generator",
    "critic_flow_loss", "discriminator_loss", "distilled_scheduler_config", "dmd_loss", "ema_decay_at",
    "few_step_scheduler_config", "gan_crop", "gan_loss", "generator_gan_loss", "generator_rollout",
    "history_is_empty", "lora_targets", "make_ode_pairs", "ode_chunks", "ode_regression_loss", "prepare_histories",
    "pyramid_scheduler_config", "real_score_folder", "scaled_head_blocks", "sigma_table", "student_timesteps",
    "teacher_trajectory", "teacher_video_trajectories",
]
