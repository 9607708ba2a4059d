"""FSDP2 training on two GPUs against one GPU: `helios train`, same global batch, same seed.

One command prepares everything and launches the training processes itself:

    python3 benchmarks/bench_train_fsdp.py --out $OUT              # 2 GPUs (NCCL), appends to RESULTS.md
    python3 benchmarks/bench_train_fsdp.py --dry-run --out /tmp/o  # CPU check: gloo, tiny, float32, nothing appended

1. In --workdir (default /tmp/fsdp-bench): a random-init transformer of --preset (default 1.3b; text_dim
   4096 as Wan) saved with `save_transformer` as MODEL/transformer/ (what `model.init_from` reads;
   with a latent cache, no validation and no export the trainer needs no VAE / text encoder, so
   `model.components_from` is null), and a synthetic latent cache in the format of
   `helios.train.video_data.build_latent_cache`: --videos entries of `latents (S, 16, 9, H/8, W/8)`
   float32 (random normal, i.e. normalised latents; S = --sections of 33 frames, enough for the
   19-frame history) and `prompt_embeds (--text-len, text_dim)` bf16.
2. `helios train` (the stage-1 recipe, full fine-tuning, bf16 mixed precision, gradient checkpointing,
   task dropout and history corruption off: their per-batch draws depend on how the global batch is
   split) for --steps steps: on one GPU with batch.per_gpu = 2B, then under
   `torchrun --nproc_per_node 2` (FSDP2) with batch.per_gpu = B. The two-process run writes DCP
   checkpoints at steps K-R and K; its step-K checkpoint is then deleted and a third run resumes on
   two GPUs from step K-R (--resume-steps R) and redoes the last R steps, whose losses must repeat.
3. Every process runs the real CLI (`helios.cli` main, `helios train CONFIG`) through a thin wrapper
   in this file (--worker) that only observes: it passes the trainer's `on_step` hook to read each
   rank's `torch.cuda.max_memory_allocated` after every step (and resets it), and times the
   trainer's `save_checkpoint` / `load_checkpoint` calls (the trainer's own `peak_memory_gib` in
   metrics.jsonl is the peak since the start, the largest over ranks).
4. Written to --out: bench_train_fsdp.json (everything), bench_train_fsdp.md (tables),
   results_rows.md (the RESULTS.md section, also appended to benchmarks/RESULTS.md on CUDA), and
   per run its metrics.jsonl, per-rank records, config and log.

NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are put in the environment of every process
started here (the trainer sets them too, through helios.model.parallel.init_distributed).

First GPU attempt (2x H100, 2026-11-25, benchmarks/results/fsdp-attempt1-*): the 1-GPU run trained, the
FSDP run failed in the backward (FSDP2 cast the blocks' RoPE tables to bf16 in the forward but not in the
checkpoint recompute); fixed in helios.train.modeling.shard_model, pinned by
tests/train/test_fsdp_checkpointing.py; not yet re-run on GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "RESULTS.md"
WARMUP = 3  # steps left out of the step-time median
LOSS_TOL = {"bf16": 3e-2, "fp32": 1e-4}  # max relative loss difference 1 GPU vs 2 GPUs before it is flagged
RESUME_TOL = {"bf16": 1e-2, "fp32": 1e-6}  # resumed steps against the uninterrupted run
GIB = 2**30


# --------------------------------------------------------------------------------------------------
# worker: one training process (plain python for one GPU, under torchrun for FSDP)


def worker(config: str, record: str, resume: bool) -> int:
    import torch
    import yaml

    import helios.train.trainer as T

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cfg = yaml.safe_load(Path(config).read_text())
    cuda = cfg.get("device") == "cuda"
    max_steps = int(cfg["max_steps"])
    rec: dict[str, Any] = {"rank": rank, "world": world, "steps": [], "saves": [], "loads": []}
    t_start = time.perf_counter()
    last = [t_start]

    def observe(step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        e = {"step": step, "loss": metrics["loss"], "step_seconds": metrics["step_seconds"],
             "since_last_s": now - last[0]}
        last[0] = now
        if cuda:
            e["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
            e["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            torch.cuda.reset_peak_memory_stats()
        if cuda and "device" not in rec:  # the trainer has set this rank's device by now
            rec["device"] = torch.cuda.get_device_name(torch.cuda.current_device())
        rec["steps"].append(e)
        if rank == 0:
            mem = f"  peak {e['peak_alloc_gib']:.1f} GiB (rank 0)" if cuda else ""
            print(f"[bench] step {step}/{max_steps}  loss {e['loss']:.5f}  {e['step_seconds']:.3f} s/step{mem}",
                  flush=True)

    orig_train, orig_save, orig_load = T.train, T.save_checkpoint, T.load_checkpoint

    def train(cfg, resume=False, on_step=None):
        rec["train_called_s"] = time.perf_counter() - t_start

        def both(step: int, metrics: dict[str, float]) -> None:
            observe(step, metrics)
            if on_step is not None:
                on_step(step, metrics)

        return orig_train(cfg, resume=resume, on_step=both)

    def save_checkpoint(root, step, *a, **kw):
        t0 = time.perf_counter()
        out = orig_save(root, step, *a, **kw)
        rec["saves"].append({"step": int(step), "seconds": time.perf_counter() - t0})
        if rank == 0:
            print(f"[bench] checkpoint of step {step} saved in {rec['saves'][-1]['seconds']:.1f} s", flush=True)
        last[0] = time.perf_counter()
        return out

    def load_checkpoint(path, *a, **kw):
        t0 = time.perf_counter()
        out = orig_load(path, *a, **kw)
        rec["loads"].append({"path": str(path), "seconds": time.perf_counter() - t0})
        if rank == 0:
            print(f"[bench] checkpoint {Path(path).name} loaded in {rec['loads'][-1]['seconds']:.1f} s", flush=True)
        return out

    T.train, T.save_checkpoint, T.load_checkpoint = train, save_checkpoint, load_checkpoint
    # helios.cli's train command imports helios.train.trainer.train when it runs: it gets the wrapper
    from helios.cli import main as cli_main

    sys.argv = ["helios", "train", config, *(["--resume"] if resume else [])]
    code = 0
    try:
        cli_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - printed and recorded; the exit code says it failed
        import traceback

        traceback.print_exc()
        rec["error"] = f"{type(e).__name__}: {e}"
        code = 1
    rec["exit_code"] = code
    rec["wall_s"] = time.perf_counter() - t_start
    rec["torch"] = torch.__version__
    if cuda:
        rec["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if world > 1 else None
        rec["cuda"] = torch.version.cuda
    Path(record.format(rank=rank)).write_text(json.dumps(rec, indent=1))
    return code


# --------------------------------------------------------------------------------------------------
# prepare: model folder + latent cache (a process of its own, so this one never holds a GPU context)


def prepare(spec: dict[str, Any]) -> int:
    import torch

    from helios.model.config import named_config
    from helios.model.loading import save_transformer
    from helios.model.transformer import build_transformer
    from helios.train.video_data import CACHE_FORMAT, save_safetensors_atomic

    work = Path(spec["workdir"])
    model_dir, cache = work / "model", work / "cache"
    done = work / "spec.json"
    if done.is_file() and json.loads(done.read_text()) == spec:
        print(f"[bench] model and cache already in {work}", flush=True)
        return 0
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    done.unlink(missing_ok=True)
    t0 = time.perf_counter()
    cfg = named_config(spec["preset"])
    dev = "cuda" if spec["device"] == "cuda" else "cpu"
    dtype = torch.bfloat16 if spec["store_dtype"] == "bf16" else torch.float32
    torch.manual_seed(0)
    model = build_transformer(cfg, device=dev, dtype=dtype)
    save_transformer(model, model_dir / "transformer")
    del model
    print(f"[bench] wrote a random {spec['preset']} transformer ({spec['store_dtype']}) to {model_dir}/transformer "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    cache.mkdir(parents=True)
    H, W = spec["height"], spec["width"]
    S, L = spec["sections"], spec["text_len"]
    g = torch.Generator().manual_seed(1)
    for i in range(spec["videos"]):
        latents = torch.randn(S, cfg.in_channels, 9, H // 8, W // 8, generator=g)
        embeds = (torch.randn(L, cfg.text_dim, generator=g) * 0.1).to(torch.bfloat16)
        meta = {"format": CACHE_FORMAT, "caption": f"random video {i}", "source": f"random-{i:04d}.mp4",
                "num_frames": str(33 * S), "height": str(H), "width": str(W), "section_frames": "33",
                "start_frame": "0", "stride": "1", "fps": "24"}
        save_safetensors_atomic({"latents": latents, "prompt_embeds": embeds}, meta,
                                str(cache / f"random-{i:04d}.safetensors"))
    print(f"[bench] wrote {spec['videos']} cache entries (latents {S}x{cfg.in_channels}x9x{H // 8}x{W // 8}, "
          f"prompt embeddings {L}x{cfg.text_dim}) to {cache} in {time.perf_counter() - t0:.1f} s", flush=True)
    done.write_text(json.dumps(spec))
    return 0


# --------------------------------------------------------------------------------------------------
# the benchmark


def run_config(args, spec: dict[str, Any], out_dir: Path, steps: int, per_gpu: int, every: int) -> dict[str, Any]:
    work = Path(spec["workdir"])
    return {
        "recipe": "stage1", "output_dir": str(out_dir), "device": spec["device"], "seed": args.seed,
        "finetune": "full", "max_steps": steps,
        "model": {"init_from": str(work / "model"), "components_from": None,
                  "gradient_checkpointing": True, "mixed_precision": "bf16"},  # CPU: the trainer runs float32
        "data": {"source": "cache", "cache_dir": str(work / "cache"), "height": spec["height"],
                 "width": spec["width"], "min_video_frames": 0},
        "batch": {"per_gpu": per_gpu, "grad_accum": 1},
        "task_dropout": {"enabled": False}, "corruption": {"enabled": False},
        "ema": {"enabled": bool(args.ema), "start_step": 1, "decay": 0.99},
        "logging": {"progress": False, "tensorboard": False},
        "validation": {"enabled": False}, "export": {"enabled": False},
        "checkpointing": {"every_steps": every, "keep_last": 2, "resume": "latest"},
    }


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def launch(cmd: list[str], env: dict[str, str], log: Path, timeout: float, tag: str) -> dict[str, Any]:
    """Run cmd in a session of its own, echo its lines with a tag, keep them in log; kill it at timeout."""
    t0 = time.perf_counter()
    print(f"[bench] {tag}: {' '.join(cmd[1:])}", flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, bufsize=1)

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                f.write(line)
                f.flush()
                print(f"  {tag}| {line.rstrip()[:300]}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            print(f"[bench] {tag}: over the time budget ({max(0.0, timeout):.0f} s left at its start): stopping it", flush=True)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=10)
    wall = time.perf_counter() - t0
    rc = proc.returncode
    print(f"[bench] {tag}: exit {rc}{' (timed out)' if timed_out else ''} after {wall:.1f} s", flush=True)
    return {"exit_code": rc, "timed_out": timed_out, "wall_s": wall}


def dir_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GIB if path.exists() else 0.0


def read_metrics(run: Path) -> list[dict[str, Any]]:
    f = run / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.is_file() else []


def read_records(run: Path, name: str, world: int) -> list[dict[str, Any]]:
    out = []
    for r in range(world):
        f = run / f"{name}-rank{r}.json"
        out.append(json.loads(f.read_text()) if f.is_file() else {"rank": r, "missing": True})
    return out


def summarize(metrics: list[dict[str, Any]], records: list[dict[str, Any]], global_batch: int,
              ckpt_steps: set[int]) -> dict[str, Any]:
    """Losses and times of rank 0's metrics.jsonl, memory and checkpoint times of every rank's record.
    The first WARMUP steps of the process are left out of the time median and the steady peak."""
    times = [m["step_seconds"] for m in metrics]
    first = metrics[0]["step"] if metrics else 1
    steady = times[WARMUP:]
    med = statistics.median(steady) if steady else float("nan")
    s: dict[str, Any] = {
        "losses": [m["loss"] for m in metrics], "step_seconds": times, "grad_norm": [m.get("grad_norm") for m in metrics],
        "median_step_s": med, "samples_per_s": global_batch / med if steady else float("nan"),
        "global_batch": global_batch,
    }
    peaks, steady_peaks, reserved = [], [], []
    for rec in records:
        steps = rec.get("steps") or []
        if steps and "peak_alloc_gib" in steps[0]:
            peaks.append(max(e["peak_alloc_gib"] for e in steps))
            reserved.append(max(e["peak_reserved_gib"] for e in steps))
            train_steps = [e["peak_alloc_gib"] for e in steps
                           if e["step"] >= first + WARMUP and e["step"] not in ckpt_steps]
            steady_peaks.append(max(train_steps) if train_steps else float("nan"))
    s["peak_alloc_gib_per_rank"] = peaks  # whole run: load, sharding, steps, checkpoints
    s["peak_alloc_steady_gib_per_rank"] = steady_peaks  # training steps after warm-up, without checkpoint saves
    s["peak_reserved_gib_per_rank"] = reserved
    s["checkpoint_save_s"] = [max((sv["seconds"] for r in records for sv in r.get("saves", []) if sv["step"] == st),
                                  default=float("nan")) for st in sorted(ckpt_steps)]
    s["checkpoint_load_s"] = max((ld["seconds"] for r in records for ld in r.get("loads", [])), default=None)
    s["process_wall_s"] = max((r.get("wall_s", 0.0) for r in records), default=None)
    s["time_to_train_s"] = max((r.get("train_called_s", 0.0) for r in records), default=None)
    return s


def rel_diff(a: list[float], b: list[float]) -> float:
    if not a or len(a) != len(b):
        return float("nan")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=False, default=None, help="folder for the record (default WORKDIR/out)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/fsdp-bench"))
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo, preset tiny, 64x64, float32, nothing appended")
    p.add_argument("--preset", default=None, help="transformer preset (default 1.3b; dry run: tiny)")
    p.add_argument("--size", default=None, help="HxW frames (default 192x320; dry run: 64x64); multiples of 64")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps K (default 20; dry run: 6)")
    p.add_argument("--resume-steps", type=int, default=2, help="steps R redone by the resumed run (R < K/2)")
    p.add_argument("--per-gpu", type=int, default=None, help="B: samples per GPU on 2 GPUs (default 2; dry run: 1)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the FSDP runs")
    p.add_argument("--videos", type=int, default=None, help="cache entries (default 32; dry run: 8)")
    p.add_argument("--sections", type=int, default=4, help="33-frame sections per cache entry")
    p.add_argument("--text-len", type=int, default=64, help="prompt-embedding tokens per entry")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--ema", action="store_true", help="also keep an EMA (adds a float32 copy of the weights)")
    p.add_argument("--budget-s", type=float, default=None, help="stop runs past this total (default 420; dry 170)")
    p.add_argument("--keep", action="store_true", help="keep the run folders and checkpoints in WORKDIR")
    p.add_argument("--results", type=Path, default=None, help=f"markdown to append to (default {RESULTS}; CUDA only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record", default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.record, args.resume)
    if args.prepare:
        return prepare(json.loads(args.prepare))

    dry = args.dry_run
    preset = args.preset or ("tiny" if dry else "1.3b")
    height, width = (int(v) for v in (args.size or ("64x64" if dry else "192x320")).split("x"))
    K = args.steps or (6 if dry else 20)
    R = args.resume_steps
    B = args.per_gpu or (1 if dry else 2)
    n = args.nproc
    if not 1 <= R < K / 2:
        p.error(f"--resume-steps must be >= 1 and < --steps / 2 (got R={R}, K={K})")
    if K <= WARMUP:
        p.error(f"--steps must be > {WARMUP} (the warm-up steps left out of the timing)")
    videos = args.videos or (8 if dry else 32)
    if videos < n * B:
        p.error("--videos must be at least one global batch")
    workdir = args.workdir.resolve()
    out = (args.out or workdir / "out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s or (170 if dry else 420))
    precision = "fp32" if dry else "bf16"
    device = "cpu" if dry else "cuda"

    import torch

    if not dry and torch.cuda.device_count() < n:
        print(f"need {n} CUDA devices, found {torch.cuda.device_count()} (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for its workers; the same for the 1-process run
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    t_all = time.perf_counter()
    print(f"[bench] {'DRY RUN (CPU, gloo, float32)' if dry else 'CUDA (NCCL, bf16)'}: preset {preset}, "
          f"{height}x{width}, {K} steps, global batch {n * B} (1 GPU x {n * B} | {n} GPUs x {B}), "
          f"resume of {R} steps; workdir {workdir}, out {out}", flush=True)

    # ---- 1. model folder and latent cache --------------------------------------------------------
    spec = {"workdir": str(workdir), "preset": preset, "height": height, "width": width, "videos": videos,
            "sections": args.sections, "text_len": args.text_len, "device": device,
            "store_dtype": "fp32" if dry else "bf16"}
    workdir.mkdir(parents=True, exist_ok=True)
    prep = launch([sys.executable, str(HERE), "--prepare", json.dumps(spec)], env, out / "prepare.log",
                  budget.left(), "prepare")
    if prep["exit_code"] != 0:
        print("[bench] preparing the model / cache failed; see prepare.log", file=sys.stderr)
        return 1

    from helios.model.config import named_config
    from helios.model.transformer import build_transformer

    mcfg = named_config(preset)
    n_params = sum(p.numel() for p in build_transformer(mcfg, device="meta").parameters())
    h, w = height // 8, width // 8
    tokens = {"noisy": 9 * (h // 2) * (w // 2), "history": 2 * (h // 2) * (w // 2) + (h // 4) * (w // 4)
              + 4 * (h // 8) * (w // 8)}
    ckpt_gib = n_params * (12 + (4 if args.ema else 0)) / GIB  # float32 weights + AdamW moments (+ EMA)
    free = shutil.disk_usage(workdir).free / GIB
    need = 2 * ckpt_gib + n_params * 2 / GIB + 1  # two checkpoints of the N-GPU run + the bf16 model folder
    print(f"[bench] {n_params / 1e6:.3g}M parameters; tokens per sample {tokens['noisy']} + {tokens['history']} "
          f"history; one checkpoint ~{ckpt_gib:.1f} GiB; disk free in {workdir}: {free:.0f} GiB", flush=True)
    if free < need:
        print(f"[bench] WARNING: about {need:.0f} GiB of checkpoints may be on disk at once", flush=True)

    runs: dict[str, dict[str, Any]] = {}

    def write_cfg(cfg: dict[str, Any], name: str) -> Path:
        import yaml

        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        shutil.copy(path, out / f"{name}.yaml")
        return path

    def keep_outputs(run_dir: Path, name: str, rec_name: str, world: int, metrics_name: str | None = None) -> None:
        if (run_dir / "metrics.jsonl").is_file():
            shutil.copy(run_dir / "metrics.jsonl", out / f"{metrics_name or name}-metrics.jsonl")
        for r in range(world):
            f = run_dir / f"{rec_name}-rank{r}.json"
            if f.is_file():
                shutil.copy(f, out / f"{name}-rank{r}.json")

    # ---- 2a. one GPU, per_gpu = n * B --------------------------------------------------------------
    single_dir, fsdp_dir = workdir / "run-1gpu", workdir / f"run-{n}gpu"
    for d in (single_dir, fsdp_dir):
        shutil.rmtree(d, ignore_errors=True)
    cfg1 = run_config(args, spec, single_dir, K, n * B, 0)
    path1 = write_cfg(cfg1, "single")
    single_dir.mkdir(parents=True)
    res = launch([sys.executable, str(HERE), "--worker", str(path1), "--record", str(single_dir / "single-rank{rank}.json")],
                 env, out / "single.log", budget.left(), "1-gpu")
    keep_outputs(single_dir, "single", "single", 1)
    runs["single"] = {**res, "world": 1, "per_gpu": n * B, "checkpoint_gib": dir_gib(single_dir / "checkpoints"),
                      **summarize(read_metrics(single_dir), read_records(single_dir, "single", 1), n * B, {K})}
    if not args.keep:
        shutil.rmtree(single_dir / "checkpoints", ignore_errors=True)  # only disk space: nothing reads it

    # ---- 2b. n GPUs (FSDP2), per_gpu = B; checkpoints at K - R and K --------------------------------
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), str(HERE)]
    cfgn = run_config(args, spec, fsdp_dir, K, B, K - R)
    pathn = write_cfg(cfgn, "fsdp")
    fsdp_dir.mkdir(parents=True)
    if budget.left() > 10:
        res = launch([*tr, "--worker", str(pathn), "--record", str(fsdp_dir / "fsdp-rank{rank}.json")],
                     env, out / "fsdp.log", budget.left(), f"{n}-gpu")
    else:
        res = {"exit_code": None, "timed_out": True, "wall_s": 0.0}
    keep_outputs(fsdp_dir, "fsdp", "fsdp", n)
    from helios.train.checkpoint import list_checkpoints

    saved = [s for s, _ in list_checkpoints(fsdp_dir / "checkpoints")]
    runs["fsdp"] = {**res, "world": n, "per_gpu": B, "checkpoints": saved,
                    "checkpoint_gib": dir_gib(fsdp_dir / "checkpoints") / max(1, len(saved)),
                    **summarize(read_metrics(fsdp_dir), read_records(fsdp_dir, "fsdp", n), n * B, {K - R, K})}

    # ---- 2c. resume on n GPUs from step K - R: the last R steps again --------------------------------
    runs["resume"] = {"exit_code": None, "world": n, "per_gpu": B, "from_step": K - R}
    if saved == [K - R, K] and budget.left() > 10:
        shutil.rmtree(fsdp_dir / "checkpoints" / f"step-{K:08d}")
        res = launch([*tr, "--worker", str(pathn), "--record", str(fsdp_dir / "resume-rank{rank}.json"), "--resume"],
                     env, out / "resume.log", budget.left(), "resume")
        keep_outputs(fsdp_dir, "resume", "resume", n, metrics_name="resume")
        log = (out / "resume.log").read_text()
        resumed_at = re.search(r"resumed from \S+ at step (\d+)", log)
        metrics = [m for m in read_metrics(fsdp_dir) if m["step"] > K - R]
        runs["resume"].update(res, resumed_at_step=int(resumed_at.group(1)) if resumed_at else None,
                              steps=[m["step"] for m in metrics],
                              checkpoints=[s for s, _ in list_checkpoints(fsdp_dir / "checkpoints")],
                              **summarize(metrics, read_records(fsdp_dir, "resume", n), n * B, {K}))
    else:
        print(f"[bench] resume skipped: checkpoints {saved}, {budget.left():.0f} s of budget left", flush=True)
    if not args.keep:
        shutil.rmtree(fsdp_dir / "checkpoints", ignore_errors=True)

    # ---- 3. checks and the record ----------------------------------------------------------------
    s, f, r = runs["single"], runs["fsdp"], runs["resume"]
    loss_diff = rel_diff(f.get("losses", []), s.get("losses", []))
    resume_diff = rel_diff(r.get("losses", []), f.get("losses", [])[K - R:]) if r.get("losses") else float("nan")
    ok_runs = all(x.get("exit_code") == 0 for x in runs.values())
    ok_loss = loss_diff <= LOSS_TOL[precision]
    ok_resume = (r.get("resumed_at_step") == K - R and r.get("steps") == list(range(K - R + 1, K + 1))
                 and resume_diff <= RESUME_TOL[precision])
    rec0 = next((x for x in read_records(fsdp_dir, "fsdp", n) if not x.get("missing")), {})
    rec1 = next((x for x in read_records(single_dir, "single", 1) if not x.get("missing")), {})
    speedup = s.get("median_step_s", float("nan")) / f.get("median_step_s", float("nan"))
    summary = {
        "date": str(datetime.date.today()), "dry_run": dry, "device": rec0.get("device") or rec1.get("device") or "cpu",
        "torch": rec0.get("torch") or torch.__version__, "cuda": rec0.get("cuda"), "nccl": rec0.get("nccl"),
        "backend": "gloo" if dry else "nccl", "precision": precision, "preset": preset, "parameters": n_params,
        "frames": f"{height}x{width}", "latents": f"9x{h}x{w}", "tokens_per_sample": tokens,
        "text_len": args.text_len, "videos": videos, "steps": K, "resume_steps": R, "warmup_steps_excluded": WARMUP,
        "global_batch": n * B, "nproc": n, "recipe": "stage1, full fine-tuning, gradient checkpointing, task "
        "dropout and history corruption off", "lr": "5e-5 (stage-1 recipe)",
        "checks": {"all_runs_exit_0": ok_runs, "max_rel_loss_diff_1_vs_n": loss_diff, "loss_tol": LOSS_TOL[precision],
                   "loss_ok": ok_loss, "max_rel_loss_diff_resumed": resume_diff, "resume_tol": RESUME_TOL[precision],
                   "resume_ok": ok_resume},
        "speedup_step_time": speedup, "scaling_efficiency": speedup / n,
        "runs": runs, "wall_s": time.perf_counter() - t_all, "env": {k: env[k] for k in (
            "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "OMP_NUM_THREADS")},
    }
    (out / "bench_train_fsdp.json").write_text(json.dumps(summary, indent=1))

    def g(v: Any, fmt: str = ".3f") -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return format(v, fmt)

    def gl(vs: list[float], fmt: str = ".1f") -> str:
        return " / ".join(g(v, fmt) for v in vs) if vs else "-"

    intro = (f"{summary['date']}, {summary['device']}, torch {summary['torch']}"
             + (f", CUDA {summary['cuda']}, NCCL {summary['nccl']}" if not dry else "") + f", {summary['backend']}, "
             f"{precision}. Preset {preset} ({n_params / 1e6:.3g}M parameters, full fine-tuning, AdamW, gradient "
             f"checkpointing), stage-1 recipe, {height}x{width} frames ({tokens['noisy']} + {tokens['history']} "
             f"history tokens per sample), {args.text_len} text tokens, global batch {n * B}, {K} steps; step time "
             f"= median of steps {WARMUP + 1}-{K} (rank 0's `step_seconds`); peak = "
             "`torch.cuda.max_memory_allocated` per rank (whole run / training steps after warm-up without a "
             "checkpoint save).")
    head = ("| run | processes x per-GPU batch | s/step | samples/s | peak GiB per GPU (run) | peak GiB per GPU "
            "(steady) | reserved GiB | checkpoint save s | checkpoint GiB | process wall s | exit |")
    lines = [f"# FSDP2 training: 1 vs {n} {'processes (CPU dry run)' if dry else 'GPUs'}", "", intro, "", head,
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in (("1 GPU", s), (f"{n} GPUs FSDP2", f), (f"{n} GPUs resumed at {K - R}", r)):
        lines.append(f"| {name} | {x.get('world')} x {x.get('per_gpu')} | {g(x.get('median_step_s'))} | "
                     f"{g(x.get('samples_per_s'), '.2f')} | {gl(x.get('peak_alloc_gib_per_rank', []))} | "
                     f"{gl(x.get('peak_alloc_steady_gib_per_rank', []))} | {gl(x.get('peak_reserved_gib_per_rank', []))} | "
                     f"{gl(x.get('checkpoint_save_s', []))} | {g(x.get('checkpoint_gib'), '.1f')} | "
                     f"{g(x.get('process_wall_s'), '.0f')} | {x.get('exit_code')}{' timeout' if x.get('timed_out') else ''} |")
    loss_line = (f"* losses, 1 vs {n}: max relative difference {g(loss_diff, '.2e')} "
                 f"({'ok' if ok_loss else 'FLAG'}: tolerance {LOSS_TOL[precision]:.0e})")
    resume_line = (f"* resume from step {K - R} (resumed at {r.get('resumed_at_step')}, checkpoint loaded in "
                   f"{g(r.get('checkpoint_load_s'), '.1f')} s): steps {r.get('steps')} repeat the uninterrupted run's "
                   f"losses within {g(resume_diff, '.2e')} ({'ok' if ok_resume else 'FLAG'}: tolerance "
                   f"{RESUME_TOL[precision]:.0e})")
    lines += ["", f"* speedup of the step time: {g(speedup, '.2f')}x on {n} (efficiency {g(speedup / n, '.0%')})",
              loss_line, resume_line, "",
              "| step | loss 1 GPU | loss FSDP | rel. diff | loss resumed | s/step 1 GPU | s/step FSDP |",
              "|---|---|---|---|---|---|---|"]
    sl, fl, rl = s.get("losses", []), f.get("losses", []), r.get("losses", [])
    for i in range(max(len(sl), len(fl))):
        a = sl[i] if i < len(sl) else None
        b = fl[i] if i < len(fl) else None
        c = rl[i - (K - R)] if 0 <= i - (K - R) < len(rl) else None
        d = abs(a - b) / abs(a) if a is not None and b is not None else None
        st = s.get("step_seconds", [])
        ft = f.get("step_seconds", [])
        lines.append(f"| {i + 1} | {g(a, '.5f')} | {g(b, '.5f')} | {g(d, '.1e')} | {g(c, '.5f')} | "
                     f"{g(st[i] if i < len(st) else None)} | {g(ft[i] if i < len(ft) else None)} |")
    md = "\n".join(lines) + "\n"
    (out / "bench_train_fsdp.md").write_text(md)

    row = (f"| {summary['date']} | {n}x {summary['device']} | {summary['torch']} | {preset} full | {height}x{width} | "
           f"{n * B} | {K} | {g(s.get('median_step_s'))} | {g(f.get('median_step_s'))} | {g(speedup, '.2f')}x | "
           f"{g(f.get('samples_per_s'), '.2f')} | {gl(s.get('peak_alloc_steady_gib_per_rank', []))} | "
           f"{gl(f.get('peak_alloc_steady_gib_per_rank', []))} | {g(loss_diff, '.1e')} ({'ok' if ok_loss else 'FLAG'}) | "
           f"{'ok' if ok_resume else 'FAIL'} ({g(resume_diff, '.0e')}) | {gl(f.get('checkpoint_save_s', []))} |")
    header = ("\n## FSDP2 training (benchmarks/bench_train_fsdp.py)\n\n"
              "`helios train`, stage-1 recipe, full fine-tuning of random weights on a random latent cache, bf16 "
              "autocast, gradient checkpointing, AdamW; one GPU with the whole global batch against N GPUs "
              "(FSDP2, NCCL) with 1/N of it each; s/step is the median after 3 warm-up steps; peak = "
              "max_memory_allocated per GPU during training steps; loss diff = largest relative difference of a "
              "step's loss; resume = N-GPU DCP checkpoint resumed, the last steps' losses repeated.\n\n"
              "| date | GPUs | torch | model | size | global batch | steps | 1-GPU s/step | N-GPU s/step | "
              "speedup | N-GPU samples/s | peak GiB 1 GPU | peak GiB/GPU N GPUs | loss diff | resume | "
              "N-GPU checkpoint save s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    (out / "results_rows.md").write_text(header + row + "\n")
    results = None if dry else (args.results or RESULTS)
    if results is not None and ok_runs:
        text = results.read_text() if results.exists() else ""
        with results.open("a") as fh:
            fh.write((header if "## FSDP2 training" not in text else "") + row + "\n")
        print(f"[bench] appended a row to {results}", flush=True)

    print("\n" + md, flush=True)
    print(f"[bench] total wall {time.perf_counter() - t_all:.0f} s; record in {out}", flush=True)
    ok = ok_runs and ok_loss and ok_resume
    print(f"[bench] {'OK' if ok else 'CHECK FAILED'}: runs {'ok' if ok_runs else 'FAILED'}, losses "
          f"{'ok' if ok_loss else 'FLAG'}, resume {'ok' if ok_resume else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
