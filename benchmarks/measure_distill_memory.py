"""Measure GPU memory, host memory and time of stage-3 iterations at 14B (not a test).

    python benchmarks/measure_distill_memory.py --out results/distill_memory     # on an H200, ~5-6 min
    python benchmarks/measure_distill_memory.py --smoke --out /tmp/smoke         # tiny model, CPU, minutes
    python benchmarks/measure_distill_memory.py --layers 16 --only official_one_gpu official_resident --out d16

Without a card that holds the uncapped official run (~127 GiB), the time ratio comes from fewer blocks
(``--layers``): every per-block cost (compute, base switches, the host optimiser's and EMA's share) grows
with the blocks, and the rest (the four GAN heads, the embeddings) does not, so each configuration's time
is a + b * layers. Two depths that fit an 80 GB card uncapped (8 and 16) give a and b for both, the 40-block
time follows, and the measured 40-block time with the options checks the line.

One process, three configurations in this order (docs/distillation.md, "Stage 3 at the official sizes on
one 80 GB GPU"):

* ``official_one_gpu``: LoRA r256 on G and the critic, GAN heads of width 768, with the memory options
  (``distill.memory``: idle base, AdamW moments and EMA in pinned host memory), the GPU capped to an
  80 GB card's 79.6 GiB with ``torch.cuda.set_per_process_memory_fraction``;
* ``official_resident``: the same sizes without the options, uncapped (the time reference; it needs
  about 127 GiB, which a 141 GB H200 has);
* ``r32_resident``: LoRA r32, heads of width 256, without the options, capped likewise (the
  configuration that fits without them).

Each runs the trainer's iteration (``helios train``): a *generator iteration* (G's DMD + GAN backward,
the critic's flow + GAN + R1 backward, per-group clipping, one AdamW step over both groups, the EMA),
then a *critic iteration* (critic backward, clipping, step), first once to warm up, then ``--repeats``
times timed. Random bf16 weights made on the GPU (the numbers do not depend on them; the same seed
gives every configuration the same weights and batch), one 384x640 chunk (9 x 48 x 80 latents), a
512-token prompt, a full random history, gradient checkpointing, bf16 autocast; the G rollout exits
every stage at its first step (the most graded forwards).

Reports per configuration: parameter counts, peak allocated / reserved GPU memory per phase, peak host
RSS (VmHWM, reset per configuration where the kernel allows, and a sampled RSS peak), pinned host
bytes, one idle-base swap's time, seconds per iteration and their parts, every iteration's losses and,
after the last step, float64 sums of the trainable parameters and the EMA (equal across configurations
when the options change nothing); ``oom`` / ``error`` name the phase that failed. An OOM or error in
one configuration is recorded and the next one runs; memory is released between them. Each
configuration's JSON is written to ``--out`` as soon as it ends (``<config>.json``), with
``summary.json`` (all results + the targets' numbers) after each; a table is printed at the end.
``--deadline-s`` (from the process start) keeps the whole run inside a time limit: a configuration or
a timed repeat that would not finish in time is skipped and marked.
"""

from __future__ import annotations

import time

START = time.monotonic()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

from helios.runtime import use_expandable_segments  # noqa: E402
from host_memory import RssMeter, proc_status  # noqa: E402  (same folder)

GIB = 2**30
CONFIGS = ("official_one_gpu", "official_resident", "r32_resident")
LOSS_KEYS = ("dmd_loss", "gan_g_loss", "generator_loss", "critic_flow_loss", "gan_d_loss", "r1_loss", "critic_loss")


def elapsed() -> float:
    return time.monotonic() - START


def allow_missing_pyav() -> bool:
    """The stage-3 package imports the video reader (PyAV) for its datasets; this benchmark reads no
    video. Where PyAV is not installed a stand-in module takes its place, failing on any use. Returns
    whether the stand-in was needed."""
    try:
        import av  # noqa: F401
        return False
    except ImportError:
        class Missing(types.ModuleType):
            def __getattr__(self, name: str):  # AttributeError: hasattr() (inspect, pickle) must see "absent"
                raise AttributeError(f"av.{name}: PyAV is not installed (pip install av)")

        sys.modules["av"] = Missing("av")
        return True


# ---- host memory ------------------------------------------------------------------------------------


# ---- one configuration ----------------------------------------------------------------------------


@dataclass
class Spec:
    name: str
    rank: int
    head_dim: int
    options: bool
    cap_gib: float | None


@dataclass
class Setup:
    preset: str
    height: int
    width: int
    text_len: int
    repeats: int
    deadline_s: float
    layers: int | None = None  # fewer transformer blocks than the preset's (--layers)


class Recorder:
    """The result dict of one configuration and the per-phase memory marks."""

    def __init__(self, res: dict[str, Any], dev: torch.device, host: RssMeter):
        self.res, self.dev, self.host = res, dev, host
        self.cuda = dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def mark(self, phase: str) -> None:
        self.sync()
        r = self.res
        if self.cuda:
            r[f"{phase}_gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(self.dev) / GIB, 2)
            r[f"{phase}_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.dev) / GIB, 2)
            r[f"{phase}_gpu_now_gib"] = round(torch.cuda.memory_allocated(self.dev) / GIB, 2)
            torch.cuda.reset_peak_memory_stats(self.dev)
        hwm, sampled = proc_status().get("VmHWM", 0), self.host.peak_rss()
        r[f"{phase}_host_peak_gib"] = round(hwm / GIB, 2) if hwm else None  # None: /proc unreadable
        r[f"{phase}_host_sampled_peak_gib"] = round(sampled / GIB, 2) if sampled else None

    def timed(self, key: str, fn: Callable[[], Any]) -> Any:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        self.res[key] = round(time.perf_counter() - t0, 3)
        return out


def _cap(dev: torch.device, cap_gib: float | None, res: dict[str, Any]) -> None:
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, cap_gib * GIB / total) if cap_gib else 1.0
    torch.cuda.set_per_process_memory_fraction(fraction, dev.index if dev.index is not None else 0)
    res["device_total_gib"] = round(total / GIB, 2)
    res["memory_fraction"] = round(fraction, 4)


def _build_models(spec: Spec, setup: Setup, dev: torch.device):
    """G and the critic with random weights, made directly on ``dev`` (LoRA and heads included)."""
    from helios.model.config import named_config
    from helios.model.transformer import build_transformer
    from helios.train.stage3 import GANConfig, ScoreCritic, build_generator, scaled_head_blocks

    cfg = named_config(setup.preset) if setup.layers is None else named_config(setup.preset, num_layers=setup.layers)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        gen_base = build_transformer(cfg, device=dev, dtype=dtype)
        critic_base = build_transformer(cfg, device=dev, dtype=dtype)
        for m in (gen_base, critic_base):
            m.enable_gradient_checkpointing(True)
        gen, params = build_generator(gen_base, lora_rank=spec.rank, copy_model=False)
        gan = GANConfig(head_blocks=scaled_head_blocks(cfg.num_layers), head_dim=spec.head_dim, start_step=0)
        critic = ScoreCritic(critic_base, rank=spec.rank, gan=gan)
    return cfg, gen, params, critic, gan


def _build_training(spec: Spec, gen, params, critic, gan, dev: torch.device):
    """The Distiller, the trainer's optimiser (one AdamW, a group each, every state made up front) and
    the EMA of G's trainable parameters, with or without the memory options."""
    from helios.sampling.dmd import DMDScheduler
    from helios.train.stage3 import DistillConfig, Distiller
    from helios.train.stage3.memory import BaseResidency, HostAdamW, HostEMA
    from helios.train.timesteps import TimestepConfig

    residency = None
    if spec.options:
        residency = BaseResidency({"generator": gen, "critic": critic.transformer})
        residency.use("generator")
    cuda = dev.type == "cuda"
    autocast = {"autocast": lambda: torch.autocast("cuda", dtype=torch.bfloat16)} if cuda else {}
    d = Distiller(gen, critic, DistillConfig(gan=gan), DMDScheduler(use_dynamic_shifting=True),
                  TimestepConfig(use_dynamic_shifting=True), generator_params=params, residency=residency, **autocast)
    dc = d.cfg
    groups = [{"params": d.generator_params, "clip": dc.grad_clip},
              {"params": d.critic_params, "lr": dc.critic_lr, "clip": dc.critic_grad_clip}]
    kw = dict(lr=dc.generator_lr, betas=tuple(dc.betas), eps=dc.eps, weight_decay=dc.weight_decay)
    opt = HostAdamW(groups, **kw) if spec.options else torch.optim.AdamW(groups, **kw)
    for g in opt.param_groups:
        for p in g["params"]:
            opt.state[p] = opt.zero_state(p) if spec.options else {
                "step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    ema = HostEMA(d.generator_named) if spec.options else {n: p.detach().clone() for n, p in d.generator_named}
    return d, opt, ema, residency


def _batch(cfg, setup: Setup, dev: torch.device):
    from helios.engine.history import HistoryLayout, split_history
    from helios.train.stage3 import DistillBatch

    layout = HistoryLayout()
    h, w = setup.height // 8, setup.width // 8
    g = torch.Generator(device=dev).manual_seed(0)
    hist = torch.randn(1, 16, 19, h, w, device=dev, generator=g)
    anchor = torch.randn(1, 16, 1, h, w, device=dev, generator=g)
    history = {**split_history(hist, layout, anchor), **{k: v.to(dev) for k, v in layout.indices(1).items()}}
    text = torch.randn(1, setup.text_len, cfg.text_dim, device=dev, generator=g)
    return DistillBatch(text, torch.zeros_like(text), history, history,
                        torch.randn(1, 16, 9, h, w, device=dev, generator=g))


def _counts(res: dict[str, Any], gen_base, params, critic) -> None:
    res["base_params_b"] = round(sum(p.numel() for p in gen_base.parameters() if not p.requires_grad) / 1e9, 3)
    res["generator_lora_b"] = round(sum(p.numel() for p in params) / 1e9, 3)
    res["critic_lora_b"] = round(sum(p.numel() for p in critic.lora_parameters) / 1e9, 3)
    res["heads_b"] = round(sum(p.numel() for p in critic.heads.parameters()) / 1e9, 3)


def _swap_probe(rec: Recorder, residency) -> None:
    """One idle-base swap each way, timed: the host-to-device rate of the options' biggest transfer."""
    rec.timed("base_swap_pair_s", lambda: (residency.use("critic"), residency.use("generator")))
    gib = residency.frozen_bytes("generator") / GIB
    rec.res["base_swap_gib"] = round(gib, 2)
    rec.res["base_swap_gib_per_s"] = round(2 * gib / max(rec.res["base_swap_pair_s"], 1e-9), 1)


class Iterations:
    """The trainer's generator iteration and critic iteration on one built configuration."""

    def __init__(self, rec: Recorder, d, opt, ema, batch, residency):
        self.rec, self.d, self.opt, self.ema, self.batch, self.residency = rec, d, opt, ema, batch, residency
        self.losses: list[dict[str, float]] = []

    def step(self) -> None:
        for grp in self.opt.param_groups:
            with_grad = [p for p in grp["params"] if p.grad is not None]
            if grp["clip"] is not None and with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, float(grp["clip"]))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def generator_iteration(self, pre: str, rng: torch.Generator) -> None:
        from helios.train.stage3.memory import update_ema

        rec, d, b = self.rec, self.d, self.batch
        t0, up0 = time.perf_counter(), self._uploaded()
        m = rec.timed(f"{pre}generator_backward_s",
                      lambda: d.generator_backward(b, 1000, rng, rng, lambda loss: loss.backward(), exits=[0, 0, 0]))
        m.update(rec.timed(f"{pre}generator_iteration_critic_backward_s",
                           lambda: d.critic_backward(b, 1000, rng, rng, lambda loss: loss.backward())))
        rec.timed(f"{pre}generator_iteration_step_s", self.step)
        rec.timed(f"{pre}ema_s", lambda: update_ema(self.ema, d.generator_named, d.cfg.ema_decay))
        rec.res[f"{pre}generator_iteration_s"] = round(time.perf_counter() - t0, 3)
        rec.res["generator_forwards"] = m["rollout_forwards"]
        self._log(f"{pre}generator_iteration", m, up0)

    def critic_iteration(self, pre: str, rng: torch.Generator) -> None:
        rec, d, b = self.rec, self.d, self.batch
        t0, up0 = time.perf_counter(), self._uploaded()
        m = rec.timed(f"{pre}critic_backward_s",
                      lambda: d.critic_backward(b, 1001, rng, rng, lambda loss: loss.backward()))
        rec.timed(f"{pre}critic_iteration_step_s", self.step)
        rec.res[f"{pre}critic_iteration_s"] = round(time.perf_counter() - t0, 3)
        self._log(f"{pre}critic_iteration", m, up0)

    def _uploaded(self) -> int:
        return self.residency.uploaded_bytes if self.residency is not None else 0

    def _log(self, phase: str, metrics: dict[str, float], uploaded_before: int) -> None:
        self.losses.append({"phase": phase, **{k: metrics[k] for k in LOSS_KEYS if k in metrics}})
        if self.residency is not None:
            self.rec.res[f"{phase}_base_uploaded_gib"] = round((self._uploaded() - uploaded_before) / GIB, 2)
        self.rec.mark(phase)


def _sum64(tensors, dev: torch.device) -> float:
    """float64 sum, each tensor reduced on ``dev`` (host tensors uploaded one at a time): the same
    reduction order wherever the tensors live."""
    with torch.no_grad():
        return float(sum(float(t.to(dev).sum(dtype=torch.float64)) for t in tensors))


def _sums(d, ema, dev: torch.device) -> dict[str, float]:
    """Sums of the trainable parameters and the EMA after the last step: equal across configurations
    when the options change nothing (and the kernels are deterministic)."""
    return {"generator_params_sum": _sum64(d.generator_params, dev), "critic_params_sum": _sum64(d.critic_params, dev),
            "ema_sum": _sum64(ema.values(), dev)}


def _run_passes(it: Iterations, setup: Setup, res: dict[str, Any], phase: list[str]) -> None:
    """Warm-up, then ``repeats`` timed passes (the last one's times are kept; ``*_s_all`` lists all),
    each only if it can end before the deadline (the warm-up's length is the estimate)."""
    passes = ["warmup_"] + [""] * setup.repeats
    for k, pre in enumerate(passes):
        if k > 0 and elapsed() + 1.1 * res["warmup_pass_s"] > setup.deadline_s:
            res["stopped"] = f"deadline before pass {k} of {len(passes)}"
            return
        rng = torch.Generator().manual_seed(1 + k)
        t0 = time.perf_counter()
        phase[0] = f"{pre}generator_iteration"
        it.generator_iteration(pre, rng)
        phase[0] = f"{pre}critic_iteration"
        it.critic_iteration(pre, rng)
        res[f"{pre or 'timed_'}pass_s"] = round(time.perf_counter() - t0, 3)
        for key in ("generator_iteration_s", "critic_iteration_s"):
            if not pre:
                res.setdefault(f"{key}_all", []).append(res[key])


def measure(spec: Spec, setup: Setup, dev: torch.device, host: RssMeter) -> dict[str, Any]:
    res: dict[str, Any] = {"config": spec.name, "preset": setup.preset, "rank": spec.rank, "head_dim": spec.head_dim,
                           "memory_options": spec.options, "cap_gib": spec.cap_gib,
                           "layers": setup.layers, "latent": [9, setup.height // 8, setup.width // 8],
                           "text_len": setup.text_len,
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "torch": torch.__version__, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                           "started_at_s": round(elapsed(), 1)}
    rec = Recorder(res, dev, host)
    if rec.cuda:
        # as `helios train` does: expandable segments with the host-memory options, fixed ones without (the
        # setting is per process; each configuration starts with every segment released)
        if spec.options:
            res["expandable_segments"] = use_expandable_segments()
        elif "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")
            res["expandable_segments"] = False
        _cap(dev, spec.cap_gib, res)
        torch.cuda.reset_peak_memory_stats(dev)
    res["host_peak_reset"] = host.reset(clear_hwm=True)
    phase = ["build"]
    try:
        t0 = time.perf_counter()
        cfg, gen, params, critic, gan = _build_models(spec, setup, dev)
        d, opt, ema, residency = _build_training(spec, gen, params, critic, gan, dev)
        batch = _batch(cfg, setup, dev)
        _counts(res, gen, params, critic)
        if residency is not None:
            pinned = sum(a.reserved_bytes for a in (residency.arena, opt.arena, ema.arena))
            res["host_pinned_gib"] = round(pinned / GIB, 2)
        rec.mark("build")
        res["build_s"] = round(time.perf_counter() - t0, 1)
        if residency is not None and rec.cuda:
            phase[0] = "swap_probe"
            _swap_probe(rec, residency)
        it = Iterations(rec, d, opt, ema, batch, residency)
        _run_passes(it, setup, res, phase)
        res["losses"] = it.losses
        res.update(_sums(d, ema, dev))
    except torch.OutOfMemoryError as e:
        res["oom"] = phase[0]
        res["oom_message"] = str(e).splitlines()[0][:300] if str(e) else ""
        rec.mark(phase[0])
    except Exception as e:  # recorded; the next configuration still runs
        res["error"] = phase[0]
        res["error_message"] = f"{type(e).__name__}: {e}"[:500]
        res["traceback"] = traceback.format_exc()[-3000:]
        rec.mark(phase[0])
    res["seconds"] = round(elapsed() - res["started_at_s"], 1)
    return res


def release(dev: torch.device) -> None:
    """Everything of the last configuration goes: Python cycles, the GPU's cached blocks and peaks, and
    the pinned host blocks (back to the system)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


# ---- the targets --------------------------------------------------------------------------------


def _max_of(r: dict[str, Any], suffix: str) -> float | None:
    vals = [v for k, v in r.items() if k.endswith(suffix) and isinstance(v, (int, float))]
    return max(vals) if vals else None


def host_peak(r: dict[str, Any]) -> float | None:
    """The configuration's peak host RSS: the larger of VmHWM and the sampled RSS where VmHWM was reset at
    the configuration's start; else the sampled RSS, or VmHWM (then the process's peak so far, an upper
    bound) where RSS could not be sampled."""
    sampled, hwm = _max_of(r, "_host_sampled_peak_gib"), _max_of(r, "_host_peak_gib")
    if r.get("host_peak_reset"):
        return max((h for h in (sampled, hwm) if h is not None), default=None)
    return sampled if sampled is not None else hwm


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers that answer the issue's targets: peak reserved (<= 78 GiB), time ratios against the
    uncapped run without options (<= 1.5), host RSS (<= 100 GiB); the losses and sums of the two
    official configurations side by side."""
    ref = {r["config"]: r for r in results}
    on, off = ref.get("official_one_gpu", {}), ref.get("official_resident", {})
    out: dict[str, Any] = {}
    for name, r in ref.items():
        out[f"{name}_peak_allocated_gib"] = _max_of(r, "_gpu_peak_gib")
        out[f"{name}_peak_reserved_gib"] = _max_of(r, "_gpu_reserved_gib")
        out[f"{name}_peak_host_gib"] = host_peak(r)
        out[f"{name}_failed"] = r.get("oom") or r.get("error") or r.get("skipped")
    for key in ("generator_iteration_s", "critic_iteration_s"):
        if key in on and key in off:
            out[f"{key}_ratio"] = round(on[key] / off[key], 3)
    if on.get("losses") and off.get("losses"):  # the first iteration runs before any update
        out["first_iteration_losses_equal"] = on["losses"][0] == off["losses"][0]
        diffs = [abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for a, b in zip(on["losses"], off["losses"])
                 for k in a if k != "phase" and k in b]
        out["max_loss_rel_diff"] = max(diffs, default=None)
    for key in ("generator_params_sum", "critic_params_sum", "ema_sum"):
        if key in on and key in off:
            out[f"{key}_equal"] = on[key] == off[key]
    gib = out.get("official_one_gpu_peak_reserved_gib")
    out["target_reserved_le_78_gib"] = gib is not None and gib <= 78 and not out.get("official_one_gpu_failed")
    ratios = [out.get(f"{k}_ratio") for k in ("generator_iteration_s", "critic_iteration_s")]
    out["target_time_ratio_le_1_5"] = all(r is not None and r <= 1.5 for r in ratios)
    host = out.get("official_one_gpu_peak_host_gib")
    out["target_host_le_100_gib"] = host is not None and host <= 100
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = [("config", "status", "alloc GiB", "reserved GiB", "host GiB", "G iter s", "critic iter s", "build s",
             "total s")]
    for r in results:
        status = (f"oom@{r['oom']}" if "oom" in r else f"error@{r['error']}" if "error" in r
                  else r.get("skipped") or r.get("stopped") or "ok")
        rows.append((r["config"], status, _max_of(r, "_gpu_peak_gib"), _max_of(r, "_gpu_reserved_gib"), host_peak(r),
                     r.get("generator_iteration_s"), r.get("critic_iteration_s"), r.get("build_s"), r.get("seconds")))
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ---- main -----------------------------------------------------------------------------------------


def specs(smoke: bool, cap_gib: float) -> list[Spec]:
    official, small = ((8, 128), (4, 64)) if smoke else ((256, 768), (32, 256))
    return [Spec("official_one_gpu", *official, True, cap_gib), Spec("official_resident", *official, False, None),
            Spec("r32_resident", *small, False, cap_gib)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for <config>.json and summary.json")
    ap.add_argument("--smoke", action="store_true", help="the tiny model at 64x64 (CPU unless CUDA is there)")
    ap.add_argument("--cap-gib", type=float, default=79.6,
                    help="GPU cap of the capped runs, GiB (default: what an 80 GB H100 reports, 79.6 GiB)")
    ap.add_argument("--only", nargs="+", choices=CONFIGS)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes after the warm-up (default 1)")
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="seconds from the start by which the run ends (default 540)")
    ap.add_argument("--layers", type=int, default=None,
                    help="build the transformers with this many blocks instead of 40: each configuration's time is "
                         "then a + b * layers (the four GAN heads do not scale), so two depths that fit an 80 GB "
                         "card uncapped (8 and 16) give the 40-block time (see above)")
    ap.add_argument("--min-config-s", type=float, default=60.0,
                    help="a configuration starts only with this many seconds left (default 60)")
    a = ap.parse_args()
    print(json.dumps({"pyav_stand_in": allow_missing_pyav(), "torch": torch.__version__}), flush=True)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not a.smoke and dev.type != "cuda":
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    setup = (Setup("tiny", 64, 64, 16, a.repeats, a.deadline_s, a.layers) if a.smoke
             else Setup("14b", 384, 640, 512, a.repeats, a.deadline_s, a.layers))
    a.out.mkdir(parents=True, exist_ok=True)
    host, results = RssMeter(period=0.05), []
    for spec in specs(a.smoke, a.cap_gib):
        if a.only and spec.name not in a.only:
            continue
        if setup.deadline_s - elapsed() < a.min_config_s:
            r = {"config": spec.name, "skipped": f"deadline: {elapsed():.0f} s of {setup.deadline_s:.0f} s used"}
        else:
            r = measure(spec, setup, dev, host)
        release(dev)
        r["after_release_reserved_gib"] = round(torch.cuda.memory_reserved(dev) / GIB, 2) if dev.type == "cuda" else 0.0
        results.append(r)
        write_json(a.out / f"{spec.name}.json", r)
        write_json(a.out / "summary.json", {"results": results, "summary": summarize(results)})
        print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "traceback")}), flush=True)
    host.stop()
    print(table(results), flush=True)
    print(json.dumps(summarize(results), indent=1), flush=True)
    print(f"total {elapsed():.0f} s", flush=True)


if __name__ == "__main__":
    main()
