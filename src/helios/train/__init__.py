"""Training data and stage ingredients (the training loop itself lives elsewhere).

* :mod:`helios.train.synthetic`  - procedural bouncing-shapes videos with captions (+ torch Dataset)
* :mod:`helios.train.video_data` - mp4 folder -> one-time VAE-latent / text-embedding cache, and its Dataset
* :mod:`helios.train.history`    - anchor + long/mid/short history layout, RoPE indices, sample cutting
* :mod:`helios.train.corrupt`    - Easy Anti-Drifting history degradation and T2V/I2V/V2V task dropout
* :mod:`helios.train.timesteps`  - timestep sampling, dynamic shifting, flow-matching targets, pyramid and DMD timesteps
* :mod:`helios.train.recipes`    - official stage 1-3 hyper-parameters as YAML under our key names

See docs/training-notes.md for how the official training works per stage.
"""
