"""Training configuration: a recipe (the official hyper-parameters) + a YAML of overrides + ``--set``.

    recipe: stage1            # stage1 | stage2 | tiny | path/to/recipe.yaml  (helios.train.recipes)
    phase: init               # a phase of the recipe (default: its first)
    output_dir: runs/base
    model: {init_from: /models/Helios-Base}
    optim: {lr: 3.0e-5}

The result is a plain nested dict with every key present: our run keys (:data:`RUN_DEFAULTS`) under
the recipe's keys under the user's. A key that exists nowhere, a value of the wrong type or out of
range raises :class:`ConfigError` naming the key (``optim.lr``), before anything heavy is loaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from helios.model_folder import CHUNK_FRAMES, LATENT_CHUNK_FRAMES, frames_for_latents

from .recipes import deep_merge, load_recipe, recipe_path

__all__ = ["ConfigError", "RUN_DEFAULTS", "load_config", "parse_set", "check_config", "check_folder", "is_ode_phase"]


class ConfigError(ValueError):
    """A training config that cannot be run; the message names the key."""


# Keys of ours that no recipe carries (a recipe's value wins where both exist).
RUN_DEFAULTS: dict[str, Any] = {
    "recipe": "stage1",
    "phase": None,  # None: the recipe's first phase
    "output_dir": None,  # required: checkpoints/, tensorboard/, validation/, model/ go here
    "device": "auto",  # auto (cuda when available) | cpu | cuda
    "finetune": "lora",  # lora (official) | full
    "max_steps": 1000,
    "max_seconds": None,  # stop early (checkpoint + export as usual) after this much training wall time
    "model": {
        "init_from": None,  # Helios model folder (model_index.json + transformer/...), a transformer
        "init_subfolder": "transformer",  # folder, or a Wan2.1 transformer folder (stage-1 init)
        # folder with vae/, text_encoder/, tokenizer/, scheduler/, model_index.json; unless the user's
        # config sets it, it is init_from (the recipes' value only names the official source)
        "components_from": None,
    },
    "data": {
        "source": None,  # cache | synthetic (None: cache when data.precomputed_latents else synthetic)
        "cache_dir": None,  # folder written by helios.train.video_data.build_latent_cache
        "num_workers": 0,  # DataLoader workers (cache source; the synthetic source encodes in-process)
        "preload": False,  # cache source: read every entry into memory at start (small latents, many steps)
        "text_max_length": 512,  # synthetic source: tokens per prompt (umT5: 512)
        # validation's negative prompt; stage 3's real-score CFG (None: the official negative prompt there)
        "negative_prompt": None,
    },
    "synthetic": {  # -> helios.train.synthetic.SyntheticConfig + dataset size and clip length
        "height": 64, "width": 64, "num_frames": 1440, "fps": 24, "min_objects": 1, "max_objects": 3,
        "max_groups": 2, "seed": 0, "num_videos": 64, "clip_frames": 132,
        "grammar": "classic",  # caption grammar (helios.scenes): classic | wide (+ triangles, more wordings)
        "shapes": None,  # None: the grammar's shapes
    },
    "pyramid": {
        "enabled": False, "num_stages": 3, "stage_range": [0.0, 1 / 3, 2 / 3, 1.0], "gamma": 1 / 3,
        "timestep_shift": 1.0, "sample_ratios": [1, 2, 1], "navit_pack": True, "efficient_sample": False,
    },
    "model_input_corruption": {  # -> helios.train.corrupt.ModelInputCorruptionConfig (off officially)
        "enabled": False, "mode": "noise", "noise_mode_prob": 0.9, "frame_independent": True, "noise_max": 1 / 3,
        "clean_prob": 0.1, "downsample_min": 0.9, "downsample_max": 1.0,
    },
    "checkpointing": {"every_steps": 500, "keep_last": 3, "resume": "latest"},
    "validation": {
        "enabled": True,
        "every_steps": 500,
        "prompt": "two red circles and a green square bouncing on a blue background",
        "seed": 0,
        "num_frames": CHUNK_FRAMES,
        "height": 384,
        "width": 640,
        "guidance_scale": 5.0,
        "num_inference_steps": 50,  # single-resolution sampler (Helios-Base-like folders)
        "pyramid_steps": [20, 20, 20],  # pyramid sampler (Helios-Mid-like folders)
        "use_dynamic_shifting": True,
        "time_shift_type": "exponential",
    },
    "logging": {"every_steps": 1, "tensorboard": True, "progress": True},
    "export": {"enabled": True, "dir": None, "use_ema": True},  # dir None: OUTPUT_DIR/model
}

# Keys whose value may legitimately take several types.
_MULTI_TYPED = {"lora.targets": (str, list), "phase": (str, type(None)), "data.source": (str, type(None)),
                "max_seconds": (int, float, type(None)),
                "model.mixed_precision": (str, bool)}  # YAML reads an unquoted `no` as false
_SCHEDULES = ("constant", "constant_with_warmup", "cosine")
_WEIGHTINGS = ("logit_normal", "none", "mode", "sigma_sqrt", "cosmap")


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "lora.rank=8"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {e}") from e
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} was given a value and sub-keys")
        node[parts[-1]] = value
    return out


def load_config(source: str | os.PathLike | dict[str, Any] | None, overrides: list[str] | None = None,
                check_paths: bool = True) -> dict[str, Any]:
    """Read a YAML file (or take a dict), merge it over its recipe and our defaults, apply ``--set``
    overrides, and check it. Relative paths in a file are relative to the current directory."""
    if source is None:
        user: dict[str, Any] = {}
    elif isinstance(source, dict):
        user = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(user, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(user).__name__}")
    user = deep_merge(user, parse_set(overrides or []))

    recipe_name = user.get("recipe", RUN_DEFAULTS["recipe"])
    phase = user.get("phase")
    try:
        recipe_path(recipe_name)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'recipe': {e}") from e
    try:
        recipe = load_recipe(recipe_name, phase or "first")
    except KeyError as e:
        raise ConfigError(f"config key 'phase': {e.args[0]}") from e
    base = deep_merge(RUN_DEFAULTS, recipe)
    base["recipe"] = str(recipe_name)
    cfg = _merge_checked(base, {k: v for k, v in user.items() if k != "recipe"}, "")
    cfg["phase"] = recipe.get("phase", phase)
    if cfg["model"]["mixed_precision"] is False:
        cfg["model"]["mixed_precision"] = "no"
    if "components_from" not in (user.get("model") or {}):  # the recipe's value names the official source
        cfg["model"]["components_from"] = cfg["model"]["init_from"]
    if cfg["stage"] == 3 and "real_score_from" not in (user.get("model") or {}):  # likewise (official: Base)
        cfg["model"]["real_score_from"] = cfg["model"]["init_from"]
    if cfg["data"]["source"] is None:
        cfg["data"]["source"] = "cache" if cfg["data"].get("precomputed_latents", True) else "synthetic"
    check_config(cfg, check_paths=check_paths)
    return cfg


def _type_ok(key: str, default: Any, value: Any) -> bool:
    if key in _MULTI_TYPED:
        return isinstance(value, _MULTI_TYPED[key])
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or float(value).is_integer())
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _merge_checked(base: dict[str, Any], over: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{key}'; known keys at {where}: {sorted(base)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' must be a mapping of sub-keys {sorted(base[k])}, got {v!r}")
            out[k] = _merge_checked(base[k], v, key + ".")
            continue
        if isinstance(v, str) and isinstance(base[k], (int, float)) and not isinstance(base[k], bool):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                v = float(v)
            except ValueError:
                pass
        if not _type_ok(key, base[k], v):
            raise ConfigError(f"config key '{key}' = {v!r} has the wrong type: expected "
                              f"{type(base[k]).__name__} like the default {base[k]!r}")
        if isinstance(base[k], int) and not isinstance(base[k], bool) and isinstance(v, float):
            v = int(v)
        out[k] = copy.deepcopy(v)
    return out


def _need(cond: bool, key: str, message: str, cfg: dict[str, Any]) -> None:
    if not cond:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        raise ConfigError(f"config key '{key}' = {node!r}: {message}")


def check_config(cfg: dict[str, Any], check_paths: bool = True) -> None:
    """Value checks; each error names its key. ``check_paths`` also checks that folders exist."""
    n = _need
    n(cfg["stage"] in (1, 2, 3), "stage", "must be 1, 2 or 3", cfg)
    n(isinstance(cfg["output_dir"], str) and bool(cfg["output_dir"]), "output_dir",
      "required: the folder for checkpoints, logs, validation videos and the exported model", cfg)
    n(cfg["device"] in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda", cfg)
    n(cfg["finetune"] in ("lora", "full"), "finetune", "must be lora or full", cfg)
    n(cfg["max_steps"] >= 1, "max_steps", "must be >= 1", cfg)
    n(isinstance(cfg["seed"], int), "seed", "must be an integer", cfg)
    from helios.scenes import GRAMMARS, SHAPES

    n(cfg["synthetic"]["grammar"] in GRAMMARS, "synthetic.grammar", f"must be one of {', '.join(GRAMMARS)}", cfg)
    shapes = cfg["synthetic"]["shapes"]
    n(shapes is None or (bool(shapes) and set(shapes) <= set(SHAPES)), "synthetic.shapes",
      f"must be null (the grammar's) or a list of {', '.join(SHAPES)}", cfg)

    m = cfg["model"]
    n(isinstance(m["init_from"], str) and bool(m["init_from"]), "model.init_from",
      "required: a local Helios model folder (or transformer / Wan2.1 transformer folder) to start from", cfg)
    n(m["mixed_precision"] in ("bf16", "no", "fp32"), "model.mixed_precision", "must be bf16 or no", cfg)
    n(not m["restrict_self_attn"], "model.restrict_self_attn", "the restricted history path is not implemented "
      "(it is off in every released config)", cfg)
    n(not m["restrict_lora"], "model.restrict_lora", "restricted-history LoRAs are not implemented", cfg)

    lo = cfg["lora"]
    if cfg["finetune"] == "lora":
        n(lo["rank"] >= 1, "lora.rank", "must be >= 1", cfg)
        n(lo["alpha"] > 0, "lora.alpha", "must be > 0", cfg)
        n(0 <= lo["dropout"] < 1, "lora.dropout", "must be in [0, 1)", cfg)
        n(lo["init"] in ("gaussian", "default", True, False), "lora.init", "must be gaussian or default", cfg)
        n(lo["targets"] == "all-linear" or (isinstance(lo["targets"], list) and lo["targets"]), "lora.targets",
          "must be all-linear or a non-empty list of module names", cfg)

    d = cfg["data"]
    ode = is_ode_phase(cfg)  # trains on the ODE-pair cache; data.cache_dir only feeds its generation
    n(d["source"] in ("cache", "synthetic"), "data.source", "must be cache or synthetic", cfg)
    sizes = d["history_sizes"]
    n(isinstance(sizes, list) and len(sizes) == 3 and all(isinstance(x, int) and x >= 1 for x in sizes),
      "data.history_sizes", "must be three positive integers (long, mid, short)", cfg)
    n(d["latent_window"] >= 1, "data.latent_window", "must be >= 1", cfg)
    n(d["section_frames"] == frames_for_latents(d["latent_window"]), "data.section_frames",
      f"must be (latent_window - 1) * 4 + 1 RGB frames ({CHUNK_FRAMES} for {LATENT_CHUNK_FRAMES} latent frames)", cfg)
    n(0 <= d["caption_dropout"] <= 1, "data.caption_dropout", "must be in [0, 1]", cfg)
    n(d["num_workers"] >= 0, "data.num_workers", "must be >= 0", cfg)
    if d["source"] == "synthetic":
        s = cfg["synthetic"]
        n(s["num_videos"] >= 1, "synthetic.num_videos", "must be >= 1", cfg)
        n(s["clip_frames"] >= d["section_frames"] and s["clip_frames"] % d["section_frames"] == 0,
          "synthetic.clip_frames", f"must be a positive multiple of data.section_frames={d['section_frames']}", cfg)
        n(s["clip_frames"] <= s["num_frames"], "synthetic.clip_frames", "must be <= synthetic.num_frames", cfg)
        n((s["height"], s["width"]) == (d["height"], d["width"]), "synthetic.height",
          f"synthetic frames must be data.height x data.width = {d['height']}x{d['width']}", cfg)
    elif not ode:
        n(isinstance(d["cache_dir"], str) and bool(d["cache_dir"]), "data.cache_dir",
          "required with data.source: cache (a folder written by helios.train.video_data.build_latent_cache)", cfg)

    b = cfg["batch"]
    n(b["per_gpu"] >= 1, "batch.per_gpu", "must be >= 1", cfg)
    n(b["grad_accum"] >= 1, "batch.grad_accum", "must be >= 1", cfg)

    o = cfg["optim"]
    n(o["name"] == "adamw", "optim.name", "only adamw is implemented (the official optimiser)", cfg)
    n(o["lr"] > 0, "optim.lr", "must be > 0", cfg)
    n(isinstance(o["betas"], list) and len(o["betas"]) == 2 and all(0 <= x < 1 for x in o["betas"]),
      "optim.betas", "must be two numbers in [0, 1)", cfg)
    n(o["weight_decay"] >= 0, "optim.weight_decay", "must be >= 0", cfg)
    n(o["eps"] > 0, "optim.eps", "must be > 0", cfg)
    n(o["grad_clip"] is None or o["grad_clip"] > 0, "optim.grad_clip", "must be > 0 (or null: no clipping)", cfg)
    n(o["lr_schedule"] in _SCHEDULES, "optim.lr_schedule", f"must be one of {list(_SCHEDULES)}", cfg)
    n(o["warmup_steps"] >= 0, "optim.warmup_steps", "must be >= 0", cfg)

    e = cfg["ema"]
    n(0 < e["decay"] < 1, "ema.decay", "must be in (0, 1)", cfg)
    n(e["start_step"] >= 0, "ema.start_step", "must be >= 0", cfg)

    t = cfg["timesteps"]
    n(t["weighting_scheme"] in _WEIGHTINGS, "timesteps.weighting_scheme", f"must be one of {list(_WEIGHTINGS)}", cfg)
    n(t["time_shift_type"] in ("linear", "exponential"), "timesteps.time_shift_type", "must be linear or exponential",
      cfg)
    td = cfg["task_dropout"]
    for k in ("t2v_ratio", "v2v_ratio", "i2v_ratio"):
        n(0 <= td[k] <= 1, f"task_dropout.{k}", "must be a probability in [0, 1]", cfg)
    c = cfg["corruption"]
    n(c["style"] in ("official", "per_frame"), "corruption.style", "must be official or per_frame", cfg)
    n(c["mode"] in ("noise", "downsample", "random"), "corruption.mode", "must be noise, downsample or random", cfg)
    for k in ("clean_prob", "noise_mode_prob", "saturation_clean_prob", "p_saturation", "p_noise", "p_downsample",
              "p_clean"):
        n(0 <= c[k] <= 1, f"corruption.{k}", "must be a probability in [0, 1]", cfg)
    n(0 < c["downsample_min"] <= c["downsample_max"] <= 1, "corruption.downsample_min",
      "need 0 < downsample_min <= downsample_max <= 1", cfg)

    p = cfg["pyramid"]
    if cfg["stage"] == 2:
        n(p["enabled"], "pyramid.enabled", "stage 2 is pyramid training: set it to true", cfg)
        n(p["num_stages"] >= 1, "pyramid.num_stages", "must be >= 1", cfg)
        n(len(p["stage_range"]) == p["num_stages"] + 1, "pyramid.stage_range",
          "needs num_stages + 1 increasing values from 0 to 1", cfg)
        n(len(p["sample_ratios"]) == p["num_stages"] and all(int(r) >= 0 for r in p["sample_ratios"])
          and sum(p["sample_ratios"]) > 0, "pyramid.sample_ratios",
          "needs one non-negative count per pyramid stage, not all zero", cfg)
        n(not p["efficient_sample"], "pyramid.efficient_sample", "not implemented (false in every released config)",
          cfg)

    if cfg["stage"] == 3:
        _check_stage3(cfg)

    ck = cfg["checkpointing"]
    n(ck["every_steps"] >= 0, "checkpointing.every_steps", "must be >= 0 (0: only at the end)", cfg)
    n(ck["keep_last"] >= 1, "checkpointing.keep_last", "must be >= 1", cfg)
    n(ck["resume"] in ("latest", "never"), "checkpointing.resume",
      "must be latest (continue from the newest checkpoint in output_dir when there is one) or never", cfg)
    v = cfg["validation"]
    n(v["every_steps"] >= 0, "validation.every_steps", "must be >= 0 (0: never)", cfg)
    n(v["num_frames"] >= 1, "validation.num_frames", "must be >= 1", cfg)
    n(isinstance(v["prompt"], str) and v["prompt"].strip() != "", "validation.prompt", "must be a non-empty prompt",
      cfg)
    n(cfg["logging"]["every_steps"] >= 1, "logging.every_steps", "must be >= 1", cfg)

    if check_paths:
        check_folder(cfg, "model.init_from")
        check_folder(cfg, "model.components_from")
        if ode:
            check_folder(cfg, "distill.ode.data", " (make the ODE pairs first: python -m helios.train.ode CONFIG)")
        elif cfg["stage"] == 3:
            check_folder(cfg, "model.real_score_from")
        if d["source"] == "cache" and not ode:
            check_folder(cfg, "data.cache_dir")


def is_ode_phase(cfg: dict[str, Any]) -> bool:
    """Stage 3's ODE-regression phase (official ``is_use_ode_regression`` + ``is_only_ode_regression``)."""
    ode = (cfg.get("distill") or {}).get("ode") or {}
    return cfg.get("stage") == 3 and bool(ode.get("enabled")) and bool(ode.get("only"))


def _check_stage3(cfg: dict[str, Any]) -> None:
    """Stage 3 (helios.train.stage3, helios.train.ode): the ODE phase or the DMD + GAN phase of the stage3 recipe."""
    n = _need
    d = cfg.get("distill")
    n(isinstance(d, dict), "recipe", "stage 3 needs a recipe with a 'distill' section (recipe: stage3)", cfg)
    o = d["ode"]
    n(not (d["train_dmd"] and o["enabled"]), "distill.ode.enabled", "ODE regression during the DMD phase (official "
      "is_use_ode_regression with is_train_dmd) is not implemented; run phase ode, then phase dmd from its export", cfg)
    n(bool(d["train_dmd"]) or is_ode_phase(cfg), "distill.train_dmd", "nothing to train: set distill.train_dmd "
      "(phase: dmd) or distill.ode.enabled and distill.ode.only (phase: ode)", cfg)
    if is_ode_phase(cfg):
        _check_ode(cfg)
    n(cfg["pyramid"]["enabled"], "pyramid.enabled", "stage 3 distils a pyramid model: set it to true", cfg)
    steps = d["rollout_steps_per_stage"]
    n(isinstance(steps, list) and len(steps) == cfg["pyramid"]["num_stages"] and all(int(x) >= 1 for x in steps),
      "distill.rollout_steps_per_stage", "needs one positive step count per pyramid stage", cfg)
    n(d["critic_updates_per_generator_update"] >= 1, "distill.critic_updates_per_generator_update", "must be >= 1",
      cfg)
    n(d["critic_lr"] > 0, "distill.critic_lr", "must be > 0", cfg)
    n(d["critic_grad_clip"] is None or d["critic_grad_clip"] > 0, "distill.critic_grad_clip",
      "must be > 0 (or null: no clipping)", cfg)
    n(d["critic_lora"]["rank"] >= 1, "distill.critic_lora.rank", "must be >= 1", cfg)
    g = d["gan"]
    n(not g["enabled"] or (g["head_dim"] >= 32 and g["head_dim"] % 32 == 0), "distill.gan.head_dim",
      "must be a multiple of 32 (the heads' GroupNorm(32))", cfg)
    n(not g["enabled"] or 0 < g["crop_scale"] <= 1, "distill.gan.crop_scale", "must be in (0, 1]", cfg)
    n(not g["enabled"] or g["final_head"] or bool(g["head_blocks"]), "distill.gan.head_blocks",
      "the GAN needs at least one tapped block or the final head", cfg)
    n(not g["enabled"] or float((g.get("r2") or {}).get("weight", 0.0)) == 0.0, "distill.gan.r2",
      "R2 is not implemented (weight 0 in every released config)", cfg)
    for key in ("vae_decode_reencode", "multi_pyramid_stage_backward_simulated", "last_step_only",
                "last_section_grad_only"):
        n(not d[key], f"distill.{key}", "not implemented (false in every released config)", cfg)
    n(d["rollout_sections"]["max"] == 1 and d["use_gt_history"], "distill.rollout_sections",
      "only pure teacher forcing (one section on real history, the released setting) is implemented", cfg)
    n(d["num_critic_input_frames"] == cfg["data"]["latent_window"], "distill.num_critic_input_frames",
      "must equal data.latent_window (one section)", cfg)


def _check_ode(cfg: dict[str, Any]) -> None:
    """The ODE phase: its loss, the sections it trains on and the teacher run that makes its data."""
    n, o = _need, cfg["distill"]["ode"]
    n(isinstance(o["data"], str) and bool(o["data"]), "distill.ode.data",
      "required: the ODE-pair folder (written by python -m helios.train.ode CONFIG)", cfg)
    n(o["weight"] > 0, "distill.ode.weight", "must be > 0", cfg)
    n(1 <= o["sections"]["min"] <= o["sections"]["max"], "distill.ode.sections", "needs 1 <= min <= max", cfg)
    n(o["dynamic"]["sample_type"] in ("uniform", "beta"), "distill.ode.dynamic.sample_type", "must be uniform or beta",
      cfg)
    te = o["teacher"]
    steps = te["pyramid_steps"]
    n(isinstance(steps, list) and len(steps) == cfg["pyramid"]["num_stages"] and all(int(x) >= 1 for x in steps),
      "distill.ode.teacher.pyramid_steps", "needs one positive step count per pyramid stage", cfg)
    n(te["guidance_scale"] >= 0, "distill.ode.teacher.guidance_scale", "must be >= 0", cfg)
    n(te["num_sections"] >= o["sections"]["max"], "distill.ode.teacher.num_sections",
      "must be >= distill.ode.sections.max (the sections one step trains on)", cfg)


def check_folder(cfg: dict[str, Any], key: str, hint: str = "") -> None:
    """The folder at dotted config key ``key`` exists (None passes); else a ConfigError naming the key."""
    value: Any = cfg
    for part in key.split("."):
        value = value[part]
    if value is None:
        return
    if not Path(value).is_dir():
        if not hint:
            hint = _missing_folder_hint(str(value))
        raise ConfigError(f"config key '{key}' = {value!r}: folder not found{hint}")


def _missing_folder_hint(value: str) -> str:
    """Why a folder may be missing: an 'owner/name' Hugging Face repo id is not downloaded here (no
    network access is assumed); a relative path is read from the current folder."""
    parts = Path(value).parts
    if len(parts) == 2 and not value.startswith(("/", ".")) and not Path(parts[0]).exists():
        return (" (it looks like a Hugging Face repo id; training reads local folders only: download it first, e.g. "
                f"`huggingface-cli download {value} --local-dir models/{parts[1]}`, and give that folder)")
    if not Path(value).is_absolute():
        return f" (relative paths are read from the current folder, {Path.cwd()})"
    return ""
