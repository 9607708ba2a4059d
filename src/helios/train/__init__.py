"""Training: data, stage ingredients and the loop.

* :mod:`helios.train.synthetic`  - procedural bouncing-shapes videos with captions (+ torch Dataset)
* :mod:`helios.train.video_data` - mp4 folder -> one-time VAE-latent / text-embedding cache, and its Dataset
* :mod:`helios.train.history`    - (anchor, history, target) samples cut from a video's latent sections
  (the layout and the split into memory terms are :mod:`helios.engine.history`'s)
* :mod:`helios.train.corrupt`    - Easy Anti-Drifting history degradation and T2V/I2V/V2V task dropout
* :mod:`helios.train.timesteps`  - training timestep sampling and flow-matching targets (the schedule
  tables, shifts and pyramid levels are :mod:`helios.sampling`'s)
* :mod:`helios.train.recipes`    - official stage 1-3 hyper-parameters as YAML under our key names
* :mod:`helios.train.config`     - recipe + user YAML + ``--set`` -> a checked config dict
* :mod:`helios.train.data`       - the cache / synthetic sources and the resumable batch order
* :mod:`helios.train.modeling`   - init weights (Helios or Wan2.1), LoRA, FSDP2 sharding, export
* :mod:`helios.train.stages`     - what one step computes for stage 1 and stage 2, and the stage registry
* :mod:`helios.train.stage3`     - stage 3: critic and GAN heads, rollout, losses, ODE pairs, both phases
  in the loop (the pairs: ``python -m helios.train.ode``)
* :mod:`helios.train.checkpoint` - atomic DCP checkpoints with every rank's RNG state
* :mod:`helios.train.trainer`    - the loop (``helios train CONFIG.yaml``)

See docs/training.md for running it and docs/training-notes.md for how the official training works.
"""
