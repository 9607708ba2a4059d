"""Profile a few optimiser steps of a training config: where a step's time goes, CPU and GPU.

    python benchmarks/profile_train_step.py configs/tiny/stage1.yaml --steps 12 [key=value ...]

Runs `helios train` on the config for --steps steps under torch.profiler (the first few steps are
warm-up and skipped) and prints the top operators by self CPU time and by self device time, and
the mean step time from the run's metrics.jsonl. Writes nothing but the run's output_dir.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    from helios.train.config import load_config
    from helios.train.trainer import train

    out = Path(tempfile.mkdtemp(prefix="profile-train-"))
    cfg = load_config(args.config, [*args.overrides, f"output_dir={out}", f"max_steps={args.steps}",
                                     "max_seconds=100000", "logging.progress=false", "export.enabled=false"])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=args.warmup, active=args.steps - args.warmup, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        train(cfg, on_step=lambda step, metrics: prof.step())
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if torch.cuda.is_available():
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["step_seconds"] for r in rows[args.warmup:]]
    print(f"{args.config}: {len(rows)} steps, mean step {sum(steady) / max(len(steady), 1):.3f}s after warm-up "
          f"(batch {cfg['batch']['per_gpu']}, device {'cuda' if torch.cuda.is_available() else 'cpu'})")


if __name__ == "__main__":
    main()
