"""Stage 3, phase ``ode``: the teacher's ODE pairs, and the regression phase of `helios train` on them.

Official (docs/training-notes.md section 3): ``tools/offload_data/get_ode-pairs.py`` runs Helios-Mid
(pyramid UniPC, 20+20+20 steps, CFG 5 with the negative prompt, linear dynamic shift) from seeded noise
as a 5-section T2V video per prompt, each section conditioned on the teacher's own earlier sections;
``pipeline_helios_ode.py`` inserts the few-step student's timesteps into each stage's schedule and keeps
the states there (4 per stage in the amplified first section, else 2) and each stage's end point.
``train_helios.py`` (``is_only_ode_regression``) then regresses the generator onto them with
``utils_helios_post._ode_regression_loss``: 3 of the 5 sections per step, the history rebuilt from the
teacher's outputs, one random state per stage, ``80 x mean 0.5 MSE(x0, stage end)``.

Here, with one config (the stage3 recipe's phase ``ode``) for both steps:

1. ``python -m helios.train.ode CONFIG [--set KEY=VALUE ...] [--limit N]`` (:func:`make_ode_pairs`): the
   teacher is ``model.init_from``; the captions and their prompt embeddings come from the latent cache
   ``data.cache_dir``; one safetensors file per caption goes to ``distill.ode.data``, written atomically.
   A rerun skips finished files, so an interrupted run continues where it stopped. Under ``torchrun``,
   rank r makes every WORLD_SIZE-th entry (no process group needed).
2. ``helios train CONFIG``: :class:`ODERegressionStage` on :class:`ODEPairDataset` (the trainer's loop,
   checkpoints, resume, EMA, export); phase ``dmd`` then starts from the export (``model.init_from``).

The teacher's sampler is :func:`helios.sampling.sampler.denoise_chunk` (via
:func:`helios.train.stage3.trajectories.teacher_video_trajectories`) and its history the engine's
:class:`~helios.engine.history.HistoryBuffer`; training rebuilds that history from the stored section
outputs with :func:`helios.train.history.history_from_sections` (the real-data path's function).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from helios.model.loading import write_text_atomic
from helios.runtime import local_device, seeded_generator
from helios.sampling.sampler import SamplerSettings
from helios.sampling.loading import load_scheduler
from helios.sampling.schedulers import FlowScheduler

from ..config import ConfigError, check_folder, is_ode_phase, load_config
from ..data import DataError, ModelParts
from ..history import HistoryLayout, history_from_sections, model_history_inputs
from ..modeling import load_init_transformer
from ..recipes import history_layout
from ..stages import StepContext, register_stage
from ..timesteps import sample_dynamic_unit
from ..video_data import LatentCacheDataset, is_valid_entry, save_safetensors_atomic
from .config import OFFICIAL_NEGATIVE_PROMPT
from .stage import FewStepStage, few_step_scheduler_config, pyramid_scheduler_config
from .trajectories import ODEChunk, ODEStage, ode_regression_loss, student_timesteps, teacher_video_trajectories

__all__ = ["ODE_FORMAT", "SETTINGS_NAME", "pair_settings", "ODEReport", "make_ode_pairs", "ODEPairDataset",
           "ode_chunks", "ODERegressionStage", "main"]

ODE_FORMAT = "helios-ode-pairs-v1"
SETTINGS_NAME = "ode_pairs.json"  # how the folder's pairs were made; a rerun must match it
_MAKE_HINT = "make them with `python -m helios.train.ode CONFIG` (the phase-ode config)"


def _key(section: int, stage: int, name: str) -> str:
    return f"s{section}.p{stage}.{name}"


# ----------------------------------------------------------------------------------------------
# settings: what a folder of pairs was made with


def pair_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What fixes the pairs' shapes and recorded timesteps; training refuses a folder made otherwise."""
    d, dist = cfg["data"], cfg["distill"]
    return {"format": ODE_FORMAT, "height": int(d["height"]), "width": int(d["width"]),
            "latent_window": int(d["latent_window"]), "history_sizes": [int(x) for x in d["history_sizes"]],
            "keep_anchor": bool(d["keep_anchor"]),
            "rollout_steps_per_stage": [int(x) for x in dist["rollout_steps_per_stage"]],
            "amplify_first_chunk": bool(dist["amplify_first_chunk"]),
            "use_dynamic_shifting": bool(cfg["timesteps"]["use_dynamic_shifting"]),
            "time_shift_type": str(cfg["timesteps"]["time_shift_type"])}


def _run_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides the pairs (a rerun into the same folder must agree on all of it)."""
    te = cfg["distill"]["ode"]["teacher"]
    return {**pair_settings(cfg), "teacher": str(Path(cfg["model"]["init_from"]).resolve()),
            "teacher_subfolder": cfg["model"]["init_subfolder"],
            "pyramid_steps": [int(x) for x in te["pyramid_steps"]], "guidance_scale": float(te["guidance_scale"]),
            "cfg_zero_star": bool(te["cfg_zero_star"]), "num_sections": int(te["num_sections"]),
            "seed": int(te["seed"]), "negative_prompt": _negative_prompt(cfg)}


def _negative_prompt(cfg: dict[str, Any]) -> str:
    prompt = cfg["data"].get("negative_prompt")
    return OFFICIAL_NEGATIVE_PROMPT if prompt is None else str(prompt)


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [f"{k}: {have.get(k)!r} (folder) vs {want[k]!r} (config)" for k in want if have.get(k) != want[k]]


def _claim_folder(out: Path, settings: dict[str, Any]) -> None:
    """Create the output folder, or check that the pairs already in it were made the same way."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_NAME
    if path.is_file():
        diff = _differences(json.loads(path.read_text()), settings)
        if diff:
            raise ConfigError(f"config key 'distill.ode.data' = {str(out)!r} holds ODE pairs made with other "
                              f"settings ({'; '.join(diff)}): use a new folder, or the settings it was made with")
        return
    write_text_atomic(path, json.dumps(settings, indent=2))


# ----------------------------------------------------------------------------------------------
# 1. making the pairs


@dataclass
class ODEReport:
    out_dir: Path
    built: list[str] = field(default_factory=list)  # entry keys made by this call
    existing: list[str] = field(default_factory=list)  # finished before this call (skipped)

    def summary(self) -> str:
        return (f"ODE pairs in {self.out_dir}: {len(self.built)} made now, {len(self.existing)} already there")


def _stable_index(key: str) -> int:
    """A per-caption number for the noise seed that does not move when the cache grows."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)


def _teacher_scheduler(cfg: dict[str, Any]) -> FlowScheduler:
    """The components folder's pyramid scheduler with the recipe's dynamic shift (official GOS:
    --use_dynamic_shifting --time_shift_type linear), the same shift the student's timesteps get."""
    t = cfg["timesteps"]
    sched = load_scheduler({**pyramid_scheduler_config(cfg), "use_dynamic_shifting": bool(t["use_dynamic_shifting"]),
                            "time_shift_type": str(t["time_shift_type"])})
    if not isinstance(sched, FlowScheduler) or sched.config.stages < 2:
        raise ConfigError("config key 'model.components_from': the ODE pairs come from a multi-step pyramid "
                          "(stage-2 / Mid) model; its scheduler is not one")
    return sched


def _record_timesteps(cfg: dict[str, Any], shape: tuple[int, ...]) -> dict[bool, list[list[float]]]:
    """The few-step generator's timesteps per stage, for the first section (amplified) and the others."""
    student = load_scheduler(few_step_scheduler_config(cfg))
    steps = [int(x) for x in cfg["distill"]["rollout_steps_per_stage"]]
    amplify = bool(cfg["distill"]["amplify_first_chunk"])
    return {first: student_timesteps(student, shape, steps, amplify=first and amplify) for first in (True, False)}


def _check_inputs(cfg: dict[str, Any]) -> None:
    if not is_ode_phase(cfg):
        raise ConfigError("config key 'phase': the ODE pairs are made with the phase-ode config (recipe: stage3, "
                          "phase: ode)")
    for key in ("model.init_from", "model.components_from", "data.cache_dir"):
        section, name = key.split(".")
        if not cfg[section][name]:
            raise ConfigError(f"config key '{key}' is required to make the ODE pairs")
        check_folder(cfg, key)


def make_ode_pairs(cfg: dict[str, Any], limit: int | None = None,
                   on_entry: Callable[[str], None] | None = None, verbose: bool = True) -> ODEReport:
    """Run the teacher for the captions of ``data.cache_dir`` (the first ``limit`` of them) and write
    their ODE pairs to ``distill.ode.data``; entries already there are skipped. ``on_entry(key)`` is
    called after each entry is written (tests use it to interrupt a run)."""
    _check_inputs(cfg)
    out = Path(cfg["distill"]["ode"]["data"])
    captions = LatentCacheDataset(cfg["data"]["cache_dir"])
    if not captions.files:
        raise DataError(f"data.cache_dir {cfg['data']['cache_dir']} holds no cache entries (*.safetensors); build "
                        "it with helios.train.video_data.build_latent_cache")
    _claim_folder(out, _run_settings(cfg))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    indices = list(range(len(captions)))[:limit][rank::world]
    report = ODEReport(out)
    todo = []
    for i in indices:
        key = Path(captions.files[i]).stem
        if is_valid_entry(str(out / f"{key}.safetensors"), ODE_FORMAT, "prompt_embeds"):
            report.existing.append(key)
        else:
            todo.append(i)
    if not todo:
        return report
    device = local_device(cfg["device"])
    bf16 = device.type == "cuda" and cfg["model"]["mixed_precision"] == "bf16"
    teacher = load_init_transformer(cfg, dtype=torch.bfloat16 if bf16 else torch.float32, device=device)
    teacher.eval().requires_grad_(False)
    parts = ModelParts(cfg["model"]["components_from"], "cpu", text_dtype=torch.bfloat16 if bf16 else torch.float32,
                       text_max_length=int(cfg["data"]["text_max_length"]))
    negative = parts.encode_text(_negative_prompt(cfg))[None].to(device)
    spatial = parts.codec.spatial
    del parts  # only the negative prompt is encoded: the captions' embeddings are in the latent cache
    make = _EntryMaker(cfg, teacher, negative, device, bf16, spatial)
    for i in todo:
        item = captions[i]
        key = item["key"]
        save_safetensors_atomic(*make(item), str(out / f"{key}.safetensors"))
        report.built.append(key)
        if verbose:
            print(f"[{len(report.built)}/{len(todo)}] {key}: {item['caption'][:60]!r}", flush=True)
        if on_entry is not None:
            on_entry(key)
    return report


class _EntryMaker:
    """One caption -> the tensors and metadata of its ODE-pair file."""

    def __init__(self, cfg: dict[str, Any], teacher: torch.nn.Module, negative: torch.Tensor, device: torch.device,
                 bf16: bool, spatial: int):
        te, d = cfg["distill"]["ode"]["teacher"], cfg["data"]
        self.teacher, self.negative, self.device = teacher, negative, device
        self.layout = history_layout(cfg)
        c = teacher.config.in_channels
        self.shape = (1, c, self.layout.chunk_frames, int(d["height"]) // spatial, int(d["width"]) // spatial)
        self.scheduler = _teacher_scheduler(cfg)
        self.settings = SamplerSettings(pyramid_steps=tuple(int(x) for x in te["pyramid_steps"]),
                                        guidance_scale=float(te["guidance_scale"]),
                                        cfg_zero_star=bool(te["cfg_zero_star"]))
        self.record = _record_timesteps(cfg, self.shape)
        self.sections, self.seed = int(te["num_sections"]), int(te["seed"])
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def __call__(self, item: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        emb = item["prompt_embeds"]
        text = emb[None].to(self.device, torch.float32)
        rng = seeded_generator(self.seed, 3, _stable_index(item["key"]))
        with self.autocast():
            chunks = teacher_video_trajectories(self.teacher, text, self.layout, self.shape, self.sections,
                                                self.scheduler, self.settings, rng,
                                                record_at=lambda k: self.record[k == 0], negative_text=self.negative)
        tensors = {"prompt_embeds": emb}
        for k, chunk in enumerate(chunks):
            for j, st in enumerate(chunk.stages):  # batch of one: stored without the batch dimension
                tensors.update({_key(k, j, "states"): st.states[:, 0].float().cpu(),
                                _key(k, j, "timesteps"): st.timesteps.cpu(), _key(k, j, "sigmas"): st.sigmas.cpu(),
                                _key(k, j, "target"): st.target[0].float().cpu()})
        meta = {"format": ODE_FORMAT, "caption": item["caption"], "key": item["key"],
                "num_sections": str(len(chunks)), "num_stages": str(len(chunks[0].stages))}
        return tensors, meta


# ----------------------------------------------------------------------------------------------
# 2. reading them back


class ODEPairDataset(Dataset):
    """The ODE-pair files of ``distill.ode.data``: one item per caption with every section's recorded
    states (``s{k}.p{j}.states`` (n, C, T, h, w), ``.timesteps`` (n,), ``.sigmas`` (n,), ``.target``),
    ``prompt_embeds`` (L, D), ``num_sections``, ``num_stages`` and, for the trainer's generic shape checks,
    ``target`` = the teacher's first section (C, T, h, w)."""

    def __init__(self, cfg: dict[str, Any]):
        folder = Path(cfg["distill"]["ode"]["data"])
        if not (folder / SETTINGS_NAME).is_file():
            raise ConfigError(f"config key 'distill.ode.data' = {str(folder)!r}: no ODE pairs there; {_MAKE_HINT}")
        settings = json.loads((folder / SETTINGS_NAME).read_text())
        diff = _differences(settings, pair_settings(cfg))
        if diff:
            raise ConfigError(f"config key 'distill.ode.data' = {str(folder)!r}: the ODE pairs were made for other "
                              f"settings ({'; '.join(diff)}); make them again for this config")
        need = int(cfg["distill"]["ode"]["sections"]["max"])
        if int(settings["num_sections"]) < need:
            raise ConfigError(f"config key 'distill.ode.sections.max' = {need}: the ODE pairs in {folder} have "
                              f"{settings['num_sections']} sections per caption")
        self.files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith(".tmp-"))
        if not self.files:
            raise DataError(f"distill.ode.data {folder} holds no finished ODE pairs yet; {_MAKE_HINT}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            with safe_open(str(path), framework="pt") as f:
                item: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}
                meta = dict(f.metadata() or {})
        except Exception as e:
            raise DataError(f"ODE-pair file {path} is unreadable: {type(e).__name__}: {e}") from e
        item["prompt_embeds"] = item["prompt_embeds"].float()
        item["num_sections"], item["num_stages"] = int(meta["num_sections"]), int(meta["num_stages"])
        item["target"] = item[_key(0, item["num_stages"] - 1, "target")]
        return item


def ode_chunks(batch: dict[str, Any], layout: HistoryLayout, text: torch.Tensor) -> list[ODEChunk]:
    """A collated batch of :class:`ODEPairDataset` items -> one :class:`ODEChunk` per section, each with the
    history the teacher had: its own earlier sections (anchor: the first frame of section 0)."""
    S, P = int(batch["num_sections"][0]), int(batch["num_stages"][0])
    finals = torch.stack([batch[_key(k, P - 1, "target")] for k in range(S)], dim=1)  # (B, S, C, T, h, w)
    chunks = []
    for k in range(S):
        rows = [history_from_sections(f, k, layout) for f in finals]
        anchor, history = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        stages = [ODEStage(batch[_key(k, j, "states")].transpose(0, 1), _same_rows(batch, _key(k, j, "timesteps")),
                           _same_rows(batch, _key(k, j, "sigmas")), batch[_key(k, j, "target")]) for j in range(P)]
        chunks.append(ODEChunk(stages, model_history_inputs(history, anchor, layout), text))
    return chunks


def _same_rows(batch: dict[str, Any], key: str) -> torch.Tensor:
    """Every row's recorded timesteps / sigmas are the same schedule; one row stands for the batch."""
    v = batch[key]
    if not all(torch.equal(v[0], r) for r in v[1:]):
        raise DataError(f"ODE pairs of one batch were recorded at different timesteps ({key})")
    return v[0]


# ----------------------------------------------------------------------------------------------
# 3. the phase in `helios train`


@register_stage("3-ode")
class ODERegressionStage(FewStepStage):
    """Phase ``ode``: per step, ``n`` sections of one ODE-pair item (``distill.ode.sections``; with
    min < max drawn per ``distill.ode.dynamic``), one random recorded state per pyramid stage of each,
    ``weight x mean 0.5 MSE(x0, stage end)``. Each term is back-propagated right after its forward. EMA:
    every step, the diffusers schedule from ``ema.start_step`` (official, ``not is_train_dmd``)."""

    name = "stage3-ode"

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        o = cfg["distill"]["ode"]
        self.sections = (int(o["sections"]["min"]), int(o["sections"]["max"]))
        self.dynamic = dict(o["dynamic"])

    def dataset(self, layout: HistoryLayout, parts) -> Dataset:
        """The teacher's ODE pairs (``distill.ode.data``), not ``data.source``."""
        return ODEPairDataset(self.cfg)

    def section_count(self, step: int, shared: torch.Generator) -> int:
        """Sections with gradients this step (official ``sample_dynamic_dmd_num_latent_sections``)."""
        lo, hi = self.sections
        if lo == hi:
            return lo
        u = float(sample_dynamic_unit(1, self.dynamic.get("sample_type", "uniform"), float(self.dynamic["alpha"]),
                                      float(self.dynamic["beta"]), step, int(self.dynamic["decay_steps"]), shared))
        return max(lo, min(hi, round(lo + u * (hi - lo))))

    def train_step(self, ctx: StepContext, batch: dict[str, Any]) -> dict[str, float]:
        chunks = ode_chunks(batch, ctx.layout, self.text(ctx, batch["prompt_embeds"]))
        # how many sections run decides the number of forwards: drawn alike on every rank (FSDP lock-step)
        n = self.section_count(ctx.step, seeded_generator(ctx.seed, 12, ctx.step, ctx.micro))
        rng = ctx.batch_generator()  # which sections, which recorded states
        picked = sorted(torch.randperm(len(chunks), generator=rng)[:n].tolist())
        loss = ode_regression_loss(ctx.model, [chunks[i] for i in picked], rng, self.dcfg.ode_weight,
                                   ctx.autocast, ctx.backward)
        return {"loss": float(loss), "ode_loss": float(loss), "ode_sections": float(n)}


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helios.train.ode",
                                description="Make the stage-3 ODE pairs of a phase-ode training config.")
    p.add_argument("config", help="the YAML of `helios train` (recipe: stage3, phase: ode)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--limit", type=int, default=None, help="only the first N captions of data.cache_dir")
    args = p.parse_args(argv)
    try:
        report = make_ode_pairs(load_config(args.config, args.set, check_paths=False), limit=args.limit)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
