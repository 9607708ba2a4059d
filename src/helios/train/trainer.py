"""The training loop, top to bottom. Stage-specific losses are in stages.py.

    from helios.train.config import load_config
    from helios.train.trainer import train
    train(load_config("run.yaml"), resume=True)

One process (CPU or one GPU) or many under ``torchrun`` (FSDP2, NCCL on GPUs / gloo on CPUs):
the process group is taken from the usual environment variables (RANK, WORLD_SIZE, ...).

    1. processes and devices         6. the loop: batches -> stage.train_step (forward + backward)
    2. the model (+ LoRA), sharded      -> clip -> AdamW -> LR schedule -> EMA -> log
    3. optimiser, LR schedule, EMA      -> checkpoint -> validation video
    4. data and the stage            7. export the model folder
    5. resume from the newest checkpoint
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from helios.model_folder import vae_scale_factors
from helios.runtime import launched_world_size, local_device, use_expandable_segments

from . import stage3  # noqa: F401  (registers the stage-3 phases with make_stage)
from .checkpoint import load_checkpoint, newest_intact_checkpoint, save_checkpoint
from .config import ConfigError
from .data import BatchStream, ModelParts, check_sample
from .modeling import (
    build_trainable,
    check_components_folder,
    export_model_folder,
    load_init_transformer,
    plain_transformer,
    shard_model,
    trainable_named_parameters,
)
from .recipes import history_layout
from .stage3.memory import HostAdamW, HostEMA, MemoryConfig, memory_options_on, update_ema
from .stages import Stage, StepContext, make_stage

__all__ = ["train", "TrainResult", "lr_factor"]

# FSDP2 warns that attn2.key_value returns views; nothing writes into them in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # rank-averaged loss of each step run in this call
    output_dir: Path
    export_dir: Path | None


@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    mesh: Any = None
    owns_group: bool = False


def _init_distributed(device_pref: str) -> _Dist:
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("config key 'device' = 'cuda' but no CUDA device is available")
    world = launched_world_size()
    device = local_device("cuda" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return _Dist(0, 1, device)
    owns = not dist.is_initialized()
    if owns:  # one way to start NCCL/gloo: the engine's, which also keeps NVLink multicast off
        from helios.runtime import init_distributed

        init_distributed("cuda" if use_cuda else "cpu")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    return _Dist(dist.get_rank(), world, device, mesh, owns)


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """diffusers' schedules (the official ones): ``constant`` ignores the warmup;
    ``constant_with_warmup`` is ``s / warmup`` then 1; ``cosine`` warms up then decays to 0."""
    def f(s: int) -> float:
        if schedule == "constant":
            return 1.0
        if s < warmup:
            return s / max(1, warmup)
        if schedule == "constant_with_warmup":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return f


def _zero_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """The state AdamW creates at a parameter's first update (step 0, zero moments), made up front:
    the updates are unchanged, and a checkpoint saved before some parameters ever had a gradient still
    holds their state, which loading it back requires."""
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and not optimizer.state[p] and isinstance(optimizer, HostAdamW):
                optimizer.state[p] = optimizer.zero_state(p)  # made in host memory, never on the device
            elif p.requires_grad and not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0, dtype=step_dtype),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _max_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _full_state(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective under FSDP: every tensor gathered whole (one at a time) onto rank 0's CPU; the other
    ranks return an empty dict."""
    keep = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for k, v in named.items():
        v = v.detach()
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        if keep:
            out[k] = full.cpu().clone()
    return out


def train(cfg: dict[str, Any], resume: bool = False,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run (or continue) the training described by ``cfg`` (from :func:`helios.train.config.load_config`).

    resume: continue from the newest checkpoint in ``output_dir`` and fail if there is none (with
    ``checkpointing.resume: latest`` a run also continues from one when it exists).
    on_step(step, metrics): called on every rank after each optimiser step (tests use it to stop a run).
    """
    out_dir = Path(cfg["output_dir"])
    ckpt_dir = out_dir / "checkpoints"

    # ---- 1. processes and devices ----------------------------------------------------------
    env = _init_distributed(cfg["device"])
    rank, world, device = env.rank, env.world, env.device
    on_cuda = device.type == "cuda"
    bf16 = on_cuda and cfg["model"]["mixed_precision"] == "bf16"  # CPU: float32 throughout
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg["model"]["allow_tf32"])
        torch.backends.cudnn.allow_tf32 = bool(cfg["model"]["allow_tf32"])
        if memory_options_on(cfg):  # before any weights arrive: they take the first segments
            use_expandable_segments()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    layout = history_layout(cfg)
    needs_parts = cfg["data"]["source"] == "synthetic" or cfg["stage"] == 3 or (
        cfg["validation"]["enabled"] and cfg["validation"]["every_steps"] > 0)
    if cfg["export"]["enabled"] or needs_parts:
        check_components_folder(cfg["model"]["components_from"])
    try:
        # ---- 2. the model ------------------------------------------------------------------
        torch.manual_seed(int(cfg["seed"]))  # LoRA init: identical on every rank before sharding
        base_dtype = torch.bfloat16 if bf16 and cfg["finetune"] == "lora" else torch.float32
        model = load_init_transformer(cfg, dtype=base_dtype, device=device)
        build_trainable(model, cfg)
        model.enable_gradient_checkpointing(bool(cfg["model"]["gradient_checkpointing"]))
        if cfg["model"]["compile"]:  # before FSDP wraps the blocks; a small model's step is launch-bound
            model.compile_blocks_()
        model.train()
        stage = make_stage(cfg)
        # stage 3: the critic (frozen real-score base + LoRA + GAN heads), trained beside the model
        extra = stage.build(model, device, torch.bfloat16 if bf16 else torch.float32)
        if world > 1:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
            shard_model(model, env.mesh, mp)
            if extra:
                stage.shard(extra, env.mesh, mp)
        # what checkpoints hold: the model alone (stages 1-2), or the model and the extra modules by name
        ckpt_model = torch.nn.ModuleDict({"generator": model, **extra}) if extra else model
        named = trainable_named_parameters(model)
        params = [p for _, p in named]
        torch.manual_seed(int(cfg["seed"]) + rank)  # anything else drawing from the global RNG differs per rank

        # ---- 3. optimiser, LR schedule, EMA ------------------------------------------------
        o = cfg["optim"]
        groups = stage.param_groups(params)  # AdamW skips parameters without a gradient: a group not
        memory = getattr(stage, "memory", None) or MemoryConfig()  # stage 3: distill.memory
        adamw = dict(lr=float(o["lr"]), betas=tuple(o["betas"]), eps=float(o["eps"]),
                     weight_decay=float(o["weight_decay"]))  # a group not trained this step stays as is
        optimizer = (HostAdamW(groups, chunk_bytes=memory.chunk_mib * 2**20, **adamw)
                     if memory.optimizer_states == "host" else torch.optim.AdamW(groups, **adamw))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(o["lr_schedule"], int(o["warmup_steps"]), int(cfg["max_steps"])))
        if extra:  # some of them train only later (GAN heads, the generator 1 step in 5): give every
            _zero_adamw_state(optimizer)  # parameter its fresh AdamW state now, so each checkpoint holds all
        ema = None
        if cfg["ema"]["enabled"]:
            ema = (HostEMA(named, memory.chunk_mib * 2**20) if memory.ema == "host"
                   else {n: p.detach().clone() for n, p in named})
        if rank == 0:
            per, accum = int(cfg["batch"]["per_gpu"]), int(cfg["batch"]["grad_accum"])
            n_extra = sum(p.numel() for g in groups[1:] for p in g["params"])
            print(f"stage {cfg['stage']} ({cfg['recipe']}/{cfg['phase']}): {cfg['finetune']} fine-tuning, "
                  f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters"
                  + (f" + {n_extra / 1e6:.2f}M in {', '.join(extra)}" if extra else "") + ", global batch "
                  f"{per} x {world} process(es) x {accum} accumulation = {per * world * accum} on {device.type}",
                  flush=True)

        # ---- 4. data and the stage ---------------------------------------------------------
        parts = None
        if needs_parts:
            text_dtype = torch.bfloat16 if bf16 else torch.float32
            vae_dtype = torch.float32 if cfg["model"]["vae_fp32"] or not bf16 else torch.bfloat16
            synthetic = cfg["data"]["source"] == "synthetic"
            parts = ModelParts(cfg["model"]["components_from"], device if synthetic else "cpu", vae_dtype, text_dtype,
                               int(cfg["data"]["text_max_length"]))
        if parts is not None:
            stage.bind_parts(parts)
        dataset = stage.dataset(layout, parts)
        workers = int(cfg["data"]["num_workers"]) if cfg["data"]["source"] == "cache" else 0
        components = cfg["model"]["components_from"]
        check_sample(dataset[0], model.config.in_channels, model.config.text_dim, layout,
                     (int(cfg["data"]["height"]), int(cfg["data"]["width"])),
                     vae_scale_factors(components)[1] if components else 8)

        # ---- 5. resume ---------------------------------------------------------------------
        step, position = 0, None
        try:  # a damaged newest checkpoint (a torn copy, a full disk) is named and skipped
            latest = newest_intact_checkpoint(ckpt_dir, report=print if rank == 0 else (lambda _: None))
        except RuntimeError as e:
            raise ConfigError(f"cannot resume: {e}") from None
        if resume and latest is None:
            raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}")
        if latest is not None and (resume or cfg["checkpointing"]["resume"] == "latest"):
            state = load_checkpoint(latest, ckpt_model, optimizer, ema)
            scheduler.load_state_dict(state["scheduler"])
            step, position = int(state["step"]), state["data"]
            if position.get("global_batch") != int(cfg["batch"]["per_gpu"]) * world:
                raise ConfigError(f"the checkpoint {latest} was made with a global batch of "
                                  f"{position.get('global_batch')} samples; batch.per_gpu x processes is now "
                                  f"{int(cfg['batch']['per_gpu']) * world}: keep it the same to resume")
            if rank == 0:
                print(f"resumed from {latest} at step {step}", flush=True)
        elif latest is not None:
            raise ConfigError(f"config key 'checkpointing.resume' = 'never' but {ckpt_dir} holds checkpoints: pass "
                              "--resume to continue from the newest, or choose a new output_dir")
        stream = BatchStream(dataset, int(cfg["batch"]["per_gpu"]), rank, world, int(cfg["seed"]), workers,
                             position)

        # ---- 6. the loop -------------------------------------------------------------------
        writer = None
        if rank == 0 and cfg["logging"]["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step)
        metrics_file = out_dir / "metrics.jsonl"  # one JSON line per step (rank 0), cut back on resume
        if rank == 0:
            kept = [ln for ln in (metrics_file.read_text().splitlines() if metrics_file.exists() else [])
                    if json.loads(ln)["step"] <= step]
            metrics_file.write_text("".join(ln + "\n" for ln in kept))
        bar = None
        if rank == 0 and cfg["logging"]["progress"]:
            from tqdm import tqdm

            bar = tqdm(total=int(cfg["max_steps"]), initial=step, unit="step", dynamic_ncols=True)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        accum = int(cfg["batch"]["grad_accum"])
        synced = [model, *extra.values()]
        losses: list[float] = []
        started, budget = time.perf_counter(), cfg.get("max_seconds")
        while step < int(cfg["max_steps"]):
            if budget is not None and time.perf_counter() - started > float(budget):
                if rank == 0:
                    print(f"time budget of {budget}s reached at step {step}", flush=True)
                save_checkpoint(ckpt_dir, step, ckpt_model, optimizer, ema,
                                {"step": step, "data": stream.state_dict(), "scheduler": scheduler.state_dict(),
                                 "world_size": world, "config": cfg}, int(cfg["checkpointing"]["keep_last"]))
                break
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            metrics: dict[str, float] = {}
            for micro in range(accum):
                batch = stream.next()
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and v.is_floating_point() else v
                         for k, v in batch.items()}

                def backward(loss: torch.Tensor, last: bool = True, micro: int = micro) -> None:
                    if world > 1:  # FSDP reduces gradients once, on the final backward of the step
                        for m in synced:
                            m.set_requires_gradient_sync(last and micro == accum - 1)
                    (loss / accum).backward()

                ctx = StepContext(model, layout, int(cfg["seed"]), step, micro, rank, batch["sample_ids"],
                                  backward, autocast)
                for k, v in stage.train_step(ctx, batch).items():
                    metrics[k] = metrics.get(k, 0.0) + v / accum
            for group in optimizer.param_groups:  # each group clipped on its own (stage 3: generator, critic)
                with_grad = [p for p in group["params"] if p.grad is not None]
                if group["clip"] is not None and with_grad:
                    norm = torch.nn.utils.clip_grad_norm_(with_grad, float(group["clip"]))
                    key = f"grad_norm/{group['name']}" if group["name"] else "grad_norm"
                    metrics[key] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            decay = stage.ema_decay(step) if ema is not None else None
            if decay is not None:  # official: the EMA follows the weights until ema.start_step
                update_ema(ema, named, decay)
            metrics = _mean_over_ranks(metrics, device)
            if on_cuda:  # the largest rank's peak so far: what the run needs per GPU
                metrics["peak_memory_gib"] = _max_over_ranks(torch.cuda.max_memory_allocated(device) / 2**30, device)
            metrics["step_seconds"] = time.perf_counter() - t0
            losses.append(metrics["loss"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            if rank == 0:
                with metrics_file.open("a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
            if writer is not None and step % int(cfg["logging"]["every_steps"]) == 0:
                for k, v in metrics.items():
                    writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
            every = int(cfg["checkpointing"]["every_steps"])
            if (every and step % every == 0) or step == int(cfg["max_steps"]):
                save_checkpoint(ckpt_dir, step, ckpt_model, optimizer, ema,
                                {"step": step, "data": stream.state_dict(), "scheduler": scheduler.state_dict(),
                                 "world_size": world, "config": cfg}, int(cfg["checkpointing"]["keep_last"]))
            vevery = int(cfg["validation"]["every_steps"])
            if cfg["validation"]["enabled"] and vevery and step % vevery == 0:
                _validate(cfg, model, named, parts, env, step, out_dir, writer, bf16, stage)
            if on_step is not None:
                on_step(step, metrics)
        if bar is not None:
            bar.close()

        # ---- 7. export ---------------------------------------------------------------------
        export_dir = None
        if cfg["export"]["enabled"]:
            use_ema = ema is not None and cfg["export"]["use_ema"]
            state = _full_state(ema if use_ema else dict(named))
            export_dir = Path(cfg["export"]["dir"] or out_dir / "model")
            if rank == 0:
                with torch.random.fork_rng(devices=[]):
                    plain = plain_transformer(cfg, state, dtype=None, device="cpu")
                sched_over, index_over = stage.inference_overrides()  # stage 3: few-step scheduler, is_distilled
                export_model_folder(plain, cfg["model"]["components_from"], export_dir,
                                    (int(cfg["data"]["height"]), int(cfg["data"]["width"])), sched_over, index_over)
                del plain
                print(f"exported the trained model to {export_dir}", flush=True)
            if world > 1:
                dist.barrier()
        if writer is not None:
            writer.close()
        return TrainResult(step, losses, out_dir, export_dir)
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _validate(cfg: dict[str, Any], model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]],
              parts: ModelParts | None, env: _Dist, step: int, out_dir: Path, writer, bf16: bool,
              stage: Stage | None = None) -> None:
    """Generate a short video from the current weights with the engine's sampler; write an mp4 and log
    frames to TensorBoard. Under FSDP the trained weights are gathered and rank 0 samples from an
    unsharded copy (the engine calls parts of the transformer outside its forward)."""
    from helios.engine.components import Components
    from helios.engine.pipeline import HeliosVideoPipeline
    from helios.engine.video_io import VideoWriter

    v = cfg["validation"]
    state = _full_state(dict(named)) if env.world > 1 else None
    if env.rank == 0 and parts is not None:
        was_device = parts.device
        vmodel = model
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            if state is not None:
                vmodel = plain_transformer(cfg, state, dtype=torch.bfloat16 if bf16 else torch.float32,
                                           device=env.device)
            parts.to(env.device)
            sched_over, index_over = stage.inference_overrides() if stage is not None else (None, {})
            index = {**parts.index, **index_over}
            sched = {**(sched_over or parts.scheduler_config), "use_dynamic_shifting": bool(v["use_dynamic_shifting"]),
                     "time_shift_type": v["time_shift_type"]}
            flags = {"is_distilled": bool(index.get("is_distilled", False)),
                     "is_cfg_zero_star": bool(index.get("is_cfg_zero_star", False)),
                     "default_size": (int(v["height"]), int(v["width"]))}
            comps = Components(vmodel, parts.vae, parts.text_encoder, parts.tokenizer, sched,
                               parts.index.get("_class_name", "HeliosPyramidPipeline"), flags, parts.folder)
            pipe = HeliosVideoPipeline(comps, max_sequence_length=int(cfg["data"]["text_max_length"]))
            steps = list(v["pyramid_steps"]) if int(parts.scheduler_config.get("stages", 1)) > 1 \
                else int(v["num_inference_steps"])
            vmodel.eval()
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                frames = pipe.generate(v["prompt"], negative_prompt=cfg["data"].get("negative_prompt") or "",
                                       num_frames=int(v["num_frames"]), height=int(v["height"]),
                                       width=int(v["width"]), steps=steps, guidance_scale=float(v["guidance_scale"]),
                                       seed=int(v["seed"]))
            model.train()
            parts.to(was_device)
        folder = out_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:08d}.mp4"
        with VideoWriter(path, fps=int(cfg["data"].get("fps", 24))) as w:
            w.write(frames)
        if writer is not None:
            pick = torch.linspace(0, frames.shape[0] - 1, min(4, frames.shape[0])).long()
            writer.add_images("validation/frames", frames[pick], step, dataformats="NHWC")
            writer.add_text("validation/video", str(path), step)
        del vmodel, pipe
    if env.world > 1:
        dist.barrier()
