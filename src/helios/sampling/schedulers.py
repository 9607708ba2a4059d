"""Helios flow-matching schedulers: sigma/timestep tables, dynamic shifting, Euler and UniPC.

Numerically equivalent to diffusers' `HeliosScheduler` (checked step by step in
tests/sampling), written from scratch around a small explicit state.

Engine-facing API
-----------------
    sched = load_scheduler("ckpt/scheduler")   # or FlowScheduler(SchedulerConfig(...))
    sched.set_timesteps(num_steps, stage_index=k, mu=mu, device=dev)   # once per chunk / stage
    for i in range(sched.num_steps):
        t = sched.timesteps[i]                  # 0-d float tensor on `device`, fed to the model
        v = guided_model_output(x, t)           # flow (velocity) prediction, same shape as x
        x = sched.step(v, x)                    # pure tensor math, no host-device sync

* `set_timesteps` rebuilds everything (schedule, solver plan, UniPC history), so calling
  it again is the per-chunk / per-stage reset. `reset()` only rewinds to step 0.
* `stage_index` is required when `config.stages > 1` (pyramid), ignored when 1.
* `mu` is required when `config.use_dynamic_shifting`; compute it with `compute_mu`
  (and `helios.sampling.pyramid.pyramid_stage_mus` for the pyramid pipeline).
* `sigmas` (single-stage only) overrides the default sigma grid; the base pipeline passes
  `base_sigmas(num_steps)` = linspace(0.999, 0, n+1)[:-1].
* `step` returns the next sample: Euler returns `model_output.dtype`, UniPC `sample.dtype`
  (as the reference). All scalar coefficients are precomputed on the host in
  `set_timesteps`, so `step` only does elementwise tensor ops with Python floats.
* The model timestep: the base pipeline feeds `t.expand(B)` (float), the pyramid
  pipeline feeds `t.expand(B).to(torch.int64)` (truncated); see `model_timestep`.

Both schedulers are `ChunkScheduler`s: the sampler drives them through that one interface.
Loading a diffusers `scheduler_config.json` is `helios.sampling.loading.load_scheduler`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

SUPPORTED_CLASSES = ("HeliosScheduler", "HeliosDMDScheduler")
SCHEDULER_TYPES = ("euler", "unipc", "dmd")
TIME_SHIFT_TYPES = ("exponential", "linear")
PREDICTION_TYPES = ("flow_prediction", "epsilon", "sample", "v_prediction")
SOLVER_TYPES = ("bh1", "bh2")
_SOLVER_TYPE_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}  # the reference maps these to bh2

# Keys the reference pipelines read with `scheduler.config.get(key, default)` for mu.
_SHIFT_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
_COMMON_KEYS = (
    "num_train_timesteps", "shift", "stages", "stage_range", "gamma", "prediction_type",
    "use_flow_sigmas", "use_dynamic_shifting", "time_shift_type",
)
_FLOW_ONLY_KEYS = (
    "thresholding", "solver_order", "predict_x0", "solver_type", "lower_order_final",
    "disable_corrector", "solver_p", "scheduler_type",
)


# -----------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler hyperparameters; field names are the diffusers config keys."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    stages: int = 3
    stage_range: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)
    gamma: float = 1 / 3
    prediction_type: str = "flow_prediction"
    use_flow_sigmas: bool = True
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"  # HeliosDMDScheduler's default is "linear"
    scheduler_type: str = "unipc"  # "euler" | "unipc" (FlowScheduler) | "dmd" (DMDScheduler)
    # UniPC
    solver_order: int = 2
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    thresholding: bool = False
    # mu = compute_mu(token_count, ...) parameters (same defaults as the pipelines)
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def __post_init__(self) -> None:
        # normalise list-y fields coming from JSON
        object.__setattr__(self, "stage_range", tuple(float(x) for x in self.stage_range))
        object.__setattr__(self, "disable_corrector", tuple(int(x) for x in self.disable_corrector))
        object.__setattr__(self, "solver_type", _SOLVER_TYPE_ALIASES.get(self.solver_type, self.solver_type))
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-style config dict (with `_class_name`) that `load_scheduler` reads back."""
        d = dataclasses.asdict(self)
        d["stage_range"] = list(self.stage_range)
        d["disable_corrector"] = list(self.disable_corrector)
        if self.scheduler_type == "dmd":
            for k in _FLOW_ONLY_KEYS:
                d.pop(k, None)
            return {"_class_name": "HeliosDMDScheduler", **d}
        return {"_class_name": "HeliosScheduler", **d, "solver_p": None}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid scheduler config: {msg}")


def _validate(c: SchedulerConfig) -> None:
    _check(isinstance(c.num_train_timesteps, int) and c.num_train_timesteps >= 2,
           f"num_train_timesteps must be an int >= 2, got {c.num_train_timesteps!r}")
    _check(isinstance(c.stages, int) and c.stages >= 1, f"stages must be an int >= 1, got {c.stages!r}")
    _check(len(c.stage_range) >= c.stages + 1,
           f"stage_range needs stages+1={c.stages + 1} boundaries, got {list(c.stage_range)}")
    _check(all(0.0 <= x <= 1.0 for x in c.stage_range), f"stage_range must lie in [0, 1], got {list(c.stage_range)}")
    _check(all(a <= b for a, b in zip(c.stage_range, c.stage_range[1:])),
           f"stage_range must be non-decreasing, got {list(c.stage_range)}")
    _check(c.gamma > 0, f"gamma must be > 0, got {c.gamma}")
    if c.stages > 1:  # block-noise covariance (1+gamma) I - gamma 11^T is PSD only up to 1/3
        _check(c.gamma <= 1 / 3 + 1e-12, f"gamma must be <= 1/3 for pyramid renoising, got {c.gamma}")
    _check(c.shift > 0, f"shift must be > 0, got {c.shift}")
    _check(c.time_shift_type in TIME_SHIFT_TYPES,
           f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {c.time_shift_type!r}")
    _check(not (c.use_dynamic_shifting and c.shift != 1.0),
           f"use_dynamic_shifting requires shift == 1.0, got shift={c.shift}")
    _check(c.scheduler_type in SCHEDULER_TYPES,
           f"scheduler_type must be one of {SCHEDULER_TYPES}, got {c.scheduler_type!r}")
    _check(c.prediction_type in PREDICTION_TYPES,
           f"prediction_type must be one of {PREDICTION_TYPES}, got {c.prediction_type!r}")
    _check(c.solver_type in SOLVER_TYPES, f"solver_type must be one of {SOLVER_TYPES} "
           f"(or an alias {tuple(_SOLVER_TYPE_ALIASES)}), got {c.solver_type!r}")
    _check(isinstance(c.solver_order, int) and c.solver_order >= 1,
           f"solver_order must be an int >= 1, got {c.solver_order!r}")
    _check(not c.thresholding, "thresholding=True is not supported (the reference has no implementation either)")
    if c.scheduler_type == "unipc" and not c.predict_x0:
        _check(c.prediction_type != "flow_prediction",
               "prediction_type='flow_prediction' requires predict_x0=True for UniPC")
    _check(c.max_image_seq_len != c.base_image_seq_len, "max_image_seq_len must differ from base_image_seq_len")


def config_from_dict(d: dict[str, Any]) -> SchedulerConfig:
    """Build a `SchedulerConfig` from a diffusers scheduler config dict (needs `_class_name`)."""
    name = d.get("_class_name")
    if name not in SUPPORTED_CLASSES:
        raise ValueError(f"unsupported scheduler class {name!r}; supported: {', '.join(SUPPORTED_CLASSES)}")
    allowed = _COMMON_KEYS + _SHIFT_KEYS + (_FLOW_ONLY_KEYS if name == "HeliosScheduler" else ())
    kwargs: dict[str, Any] = {}
    unknown = []
    for k, v in d.items():
        if k.startswith("_"):
            continue  # _class_name, _diffusers_version, _use_default_values ...
        if k not in allowed:
            unknown.append(k)
        elif k == "solver_p":
            _check(v is None, "solver_p (an external predictor scheduler) is not supported; it must be null")
        else:
            kwargs[k] = v
    if unknown:  # diffusers also ignores these (with a warning)
        warnings.warn(f"{name} config: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
    if name == "HeliosDMDScheduler":
        kwargs.setdefault("time_shift_type", "linear")
        kwargs["scheduler_type"] = "dmd"
    try:
        return SchedulerConfig(**kwargs)
    except TypeError as e:  # e.g. a list where a number is expected
        raise ValueError(f"invalid scheduler config: {e}") from e


# -----------------------------------------------------------------------------
# shifting


def compute_mu(image_seq_len: int, config: SchedulerConfig | None = None) -> float:
    """Dynamic-shift mu: linear in the noisy token count (Flux-style `calculate_shift`)."""
    c = config or SchedulerConfig()
    return mu_for_tokens(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


def mu_for_tokens(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """The line through (base_seq_len, base_shift) and (max_seq_len, max_shift) at `seq_len` tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return seq_len * m + b


def token_count(latent_thw: Sequence[int], patch_size: Sequence[int] = (1, 2, 2)) -> int:
    """Noisy tokens of a (T, H, W) latent for the transformer's patch size."""
    t, h, w = latent_thw[-3:]
    return (t * h * w) // (patch_size[0] * patch_size[1] * patch_size[2])


def time_shift(mu: float, t, kind: str):
    """Shift sigmas t in (0, 1] towards 1 by mu. Works on numpy arrays and torch tensors.

    exponential: e^mu / (e^mu + (1/t - 1));  linear: mu / (mu + (1/t - 1)).  t=0 maps to 0.
    """
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    if kind == "linear":
        return mu / (mu + (1 / t - 1))
    raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {kind!r}")


def shift_sigmas(sigmas, shift: float):
    """`shift * sigma / (1 + (shift - 1) * sigma)`: the fixed shift of a sigma table (numpy or torch)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def base_sigmas(num_steps: int) -> np.ndarray:
    """The sigma grid the base (single-stage) pipeline passes: linspace(0.999, 0, n+1)[:-1]."""
    return np.linspace(0.999, 0.0, num_steps + 1)[:-1]


def model_timestep(t: torch.Tensor, batch_size: int, truncate: bool = False) -> torch.Tensor:
    """Timestep batch for the transformer. Pyramid pipeline: truncate=True (int64); base: float."""
    t = t.expand(batch_size)
    return t.to(torch.int64) if truncate else t


# -----------------------------------------------------------------------------
# stage tables (fixed per config) and per-call schedules


@dataclass(frozen=True)
class StageTables:
    """Per-stage constants derived from the training sigma grid."""

    train_sigmas: torch.Tensor  # (N,) float64, from ~1 down to ~1/N
    ori_start_sigmas: tuple[float, ...]  # sigma at each stage's start on the training grid
    start_sigmas: tuple[float, ...]  # after the renoise correction (stage > 0)
    end_sigmas: tuple[float, ...]
    timestep_ratios: tuple[tuple[float, float], ...]  # share of the total flow length
    stage_timesteps: tuple[torch.Tensor, ...]  # (N,) float64 per stage, decreasing
    timestep_bounds: tuple[tuple[float, float], ...]  # (t_max, t_min): the ends of each stage's linspace


def train_sigmas(config: SchedulerConfig) -> torch.Tensor:
    """The N training sigmas (shifted by config.shift), decreasing, excluding 0."""
    n, s = config.num_train_timesteps, config.shift
    x = 1.0 - np.linspace(1, 1 / n, n + 1)
    x = np.flip(shift_sigmas(x, s))[:-1].copy()
    return torch.from_numpy(x)


def corrected_start_sigma(ori_start_sigma: float, gamma: float) -> float:
    """Stage start sigma after upsample + block-noise renoising (PyramidFlow's correction)."""
    signal = 1 - ori_start_sigma
    return 1 - signal / (math.sqrt(1 + 1 / gamma) * (1 - signal) + signal)


def stage_tables(config: SchedulerConfig) -> StageTables:
    n = config.num_train_timesteps
    sig = train_sigmas(config)
    train_t = sig * n
    ori, starts, ends = [], [], []
    for k in range(config.stages):
        i0 = max(int(config.stage_range[k] * n), 0)
        i1 = min(int(config.stage_range[k + 1] * n), n)
        start = sig[i0].item()
        ori.append(start)
        ends.append(sig[i1].item() if i1 < n else 0.0)
        starts.append(start if k == 0 else corrected_start_sigma(start, config.gamma))
    lengths = [a - b for a, b in zip(starts, ends)]
    total = sum(lengths)
    ratios, stage_t, bounds = [], [], []
    for k in range(config.stages):
        r0 = 0.0 if k == 0 else sum(lengths[:k]) / total
        r1 = 0.9999999999999999 if k == config.stages - 1 else sum(lengths[: k + 1]) / total
        ratios.append((r0, r1))
        t_max = min(train_t[int(r0 * n)].item(), 999)
        t_min = train_t[min(int(r1 * n), n - 1)].item()
        bounds.append((float(t_max), float(t_min)))
        stage_t.append(torch.from_numpy(np.linspace(t_max, t_min, n + 1)[:-1]))
    return StageTables(sig, tuple(ori), tuple(starts), tuple(ends), tuple(ratios), tuple(stage_t), tuple(bounds))


def build_schedule(
    config: SchedulerConfig,
    tables: StageTables,
    num_steps: int,
    stage_index: int | None = None,
    mu: float | None = None,
    sigmas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    amplify: bool = False,
    extra_timesteps: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (n,), sigmas (n+1,) ending in 0) on the CPU, in the reference's dtypes.

    For scheduler_type "dmd" the grid gets n+1 points (2n+1 when `amplify`) and then
    drops its last interior point, which leaves n (2n) steps. `extra_timesteps` (pyramid
    euler/unipc only) are model timesteps the schedule must also visit: see `insert_timesteps`.
    """
    c = config
    _check_steps(num_steps)
    if c.stages > 1:
        if sigmas is not None:
            raise ValueError("custom sigmas are only supported for single-stage configs (stages == 1)")
        if not isinstance(stage_index, int) or not 0 <= stage_index < c.stages:
            raise ValueError(f"stage_index must be an int in [0, {c.stages}) for a {c.stages}-stage config, "
                             f"got {stage_index!r}")
    if c.use_dynamic_shifting and mu is None:
        raise ValueError("use_dynamic_shifting=True needs mu (see compute_mu / pyramid_stage_mus)")

    n = num_steps
    if c.scheduler_type == "dmd":
        n = 2 * n + 1 if amplify else n + 1
    N = c.num_train_timesteps
    if c.stages == 1:
        if sigmas is None:
            s = np.linspace(1, 1 / N, n + 1)[:-1].astype(np.float32)
            if c.shift != 1.0:
                s = time_shift(c.shift, s, c.time_shift_type)
        else:
            s = sigmas.detach().cpu().numpy() if isinstance(sigmas, torch.Tensor) else np.asarray(sigmas)
            if s.ndim != 1 or len(s) < 1:
                raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {s.shape}")
        t = torch.from_numpy((s * N).copy())
        s = torch.from_numpy(np.ascontiguousarray(s))
    else:
        st = tables.stage_timesteps[stage_index]
        t = torch.from_numpy(np.linspace(st[0].item(), st[-1].item(), n))
        grid = np.linspace(0.999, 0, N + 1)[:-1]  # every stage runs over the same nominal sigma range
        s = torch.from_numpy(np.linspace(grid[0], grid[-1], n))
    s = torch.cat([s, torch.zeros(1)])
    if c.scheduler_type == "dmd":
        t = t[:-1]
        s = torch.cat([s[:-2], s[-1:]])
    if c.use_dynamic_shifting:
        s = time_shift(mu, s, c.time_shift_type)
        if c.stages == 1:
            t = s[:-1] * N
        else:
            st = tables.stage_timesteps[stage_index]
            t = st.min() + s[:-1] * (st.max() - st.min())
    if extra_timesteps is not None and len(extra_timesteps):
        if c.stages == 1 or c.scheduler_type == "dmd":
            raise ValueError("extra timesteps are only inserted into multi-step pyramid schedules (euler / unipc)")
        t, s = insert_timesteps(t, s, extra_timesteps, tables.stage_timesteps[stage_index], c.use_dynamic_shifting)
    return t, s


def insert_timesteps(t: torch.Tensor, s: torch.Tensor, extra: Sequence[float], stage_timesteps: torch.Tensor,
                     shifted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the timesteps `extra` to a pyramid stage's schedule `(t, s)`, keeping it decreasing.

    The official ODE-pair generation (tools/offload_data/get_ode-pairs.py with pipeline_helios_ode.py)
    makes the teacher visit the few-step student's timesteps this way, so its states there are exact
    training inputs. A new point gets the sigma of the stage's own timestep <-> sigma map, which is
    affine: t = t_min + s (t_max - t_min) after the dynamic shift, and without it the two linspaces
    t: stage_t[0] -> stage_t[-1], s: 0.999 -> 0.999 / N. Points within 1e-4 of an existing timestep
    are already visited and are not added.
    """
    st = stage_timesteps
    if shifted:
        t0, t1, s0, s1 = st.max().item(), st.min().item(), 1.0, 0.0
    else:
        t0, t1, s0, s1 = st[0].item(), st[-1].item(), 0.999, 0.999 / len(st)
    new = [float(x) for x in extra if bool((t - float(x)).abs().min() >= 1e-4)]
    bad = [x for x in new if not min(t0, t1) - 1e-6 <= x <= max(t0, t1) + 1e-6]
    if bad:
        raise ValueError(f"timesteps {bad} lie outside this pyramid stage's range [{t1:.4f}, {t0:.4f}]")
    if not new:
        return t, s
    nt = torch.tensor(new, dtype=t.dtype)
    ns = (s0 + (nt.to(torch.float64) - t0) * (s1 - s0) / (t1 - t0)).to(s.dtype)
    order = torch.argsort(torch.cat([t, nt]), descending=True, stable=True)
    return torch.cat([t, nt])[order], torch.cat([torch.cat([s[:-1], ns])[order], s[-1:]])


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_steps!r}")


# -----------------------------------------------------------------------------
# UniPC (B(h) variant, Zhao et al. 2023) over flow sigmas


def _alpha_sigma(sigma: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if flow:
        return 1 - sigma, torch.clamp(sigma, min=1e-8)
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _lam(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    a, s = _alpha_sigma(sigma, flow)
    return torch.log(a) - torch.log(s)


@dataclass(frozen=True)
class UniUpdate:
    """Scalars of one UniP (predictor) or UniC (corrector) update.

    x_new = x_coef * x - m0_coef * m0 - res_coef * (sum_k rhos[k] * (m_k - m0) / rks[k]  [+ rhos[-1] * (m_t - m0)])
    """

    order: int
    x_coef: float
    m0_coef: float
    res_coef: float
    rks: tuple[float, ...]  # order-1 ratios for the history differences
    rhos: torch.Tensor  # CPU, sigma dtype; cast to the sample dtype at use (like the reference)


@dataclass(frozen=True)
class UniStepPlan:
    sigma: float  # raw sigma_i (flow x0 conversion)
    alpha_t: float  # clamped alpha/sigma pair (other prediction types)
    sigma_t: float
    corrector: UniUpdate | None
    predictor: UniUpdate


def _uni_update(sigmas: torch.Tensor, i_from: int, i_to: int, hist_idx: Sequence[int], order: int,
                cfg: SchedulerConfig, corrector: bool) -> UniUpdate:
    """Coefficients to go from sigmas[i_from] to sigmas[i_to], with history sigmas[hist_idx]."""
    flow = cfg.use_flow_sigmas
    a_t, s_t = _alpha_sigma(sigmas[i_to], flow)
    a_0, s_0 = _alpha_sigma(sigmas[i_from], flow)
    lam_0 = torch.log(a_0) - torch.log(s_0)
    h = torch.log(a_t) - torch.log(s_t) - lam_0
    rks = [(_lam(sigmas[j], flow) - lam_0) / h for j in hist_idx]
    hh = -h if cfg.predict_x0 else h
    h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
    B_h = hh if cfg.solver_type == "bh1" else torch.expm1(hh)
    # order conditions: R @ rhos = b, with R[k] = rks^k and b[k] = k! * h*phi_{k+1}(h) / B(h)
    r = torch.tensor([*rks, 1.0], dtype=sigmas.dtype)
    R, b = [], []
    h_phi_k, fact = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        R.append(torch.pow(r, k - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = torch.stack(R), torch.tensor(b, dtype=sigmas.dtype)
    if corrector:
        rhos = torch.tensor([0.5], dtype=sigmas.dtype) if order == 1 else torch.linalg.solve(R, b)
    elif order == 1:
        rhos = torch.zeros(0, dtype=sigmas.dtype)
    elif order == 2:
        rhos = torch.tensor([0.5], dtype=sigmas.dtype)
    else:
        rhos = torch.linalg.solve(R[:-1, :-1], b[:-1])
    if cfg.predict_x0:
        x_coef, m0_coef, res_coef = s_t / s_0, a_t * h_phi_1, a_t * B_h
    else:
        x_coef, m0_coef, res_coef = a_t / a_0, s_t * h_phi_1, s_t * B_h
    return UniUpdate(order, x_coef.item(), m0_coef.item(), res_coef.item(), tuple(x.item() for x in rks), rhos)


def unipc_plan(sigmas: torch.Tensor, config: SchedulerConfig) -> list[UniStepPlan]:
    """Every scalar UniPC needs for a full pass over `sigmas` (n+1 values -> n steps).

    The effective order warms up (1, 2, ... solver_order) and, with lower_order_final,
    winds down at the end; the corrector at step i reuses step i-1's order.
    """
    n = len(sigmas) - 1
    plan, prev_order = [], None
    for i in range(n):
        order = min(config.solver_order, n - i) if config.lower_order_final else config.solver_order
        order = min(order, i + 1)
        corr = None
        if i > 0 and (i - 1) not in config.disable_corrector:
            corr = _uni_update(sigmas, i - 1, i, [i - 1 - k for k in range(1, prev_order)], prev_order, config, True)
        pred = _uni_update(sigmas, i, i + 1, [i - k for k in range(1, order)], order, config, False)
        a, s = _alpha_sigma(sigmas[i], config.use_flow_sigmas)
        plan.append(UniStepPlan(sigmas[i].item(), a.item(), s.item(), corr, pred))
        prev_order = order
    return plan


def _apply_update(u: UniUpdate, x: torch.Tensor, history: list[torch.Tensor], m_t: torch.Tensor | None) -> torch.Tensor:
    """history[-1] is m0, history[-1-k] the k-th older model output; m_t is the corrector's new output."""
    m0 = history[-1]
    out = u.x_coef * x - u.m0_coef * m0
    rhos = u.rhos.to(x.dtype).tolist()  # CPU -> no device sync
    res = None
    for k, rk in enumerate(u.rks, start=1):
        term = rhos[k - 1] * ((history[-1 - k] - m0) / rk)
        res = term if res is None else res + term
    if m_t is not None:
        term = rhos[-1] * (m_t - m0)
        res = term if res is None else res + term
    if res is not None:
        out = out - u.res_coef * res
    return out.to(x.dtype)


# -----------------------------------------------------------------------------
# the scheduler


def _as(c: float, x: torch.Tensor) -> float:
    """Scalar coefficient as torch applies a 0-d tensor to `x`: rounded to x's dtype if half precision.

    The reference multiplies by 0-d sigma tensors, which torch first casts to a bf16/fp16
    operand's dtype; a plain Python float would not be rounded. CPU only, no sync.
    """
    if x.dtype in (torch.bfloat16, torch.float16):
        return torch.tensor(c, dtype=x.dtype).item()
    return c


def flow_to_x0(flow: torch.Tensor, sample: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma * v, computed in float64, returned in the flow's dtype.

    `sigma`: one float, or a (B,) tensor of per-sample sigmas (broadcast over the other dimensions)."""
    if torch.is_tensor(sigma):
        sigma = sigma.to(sample.device).double().view(-1, *([1] * (sample.ndim - 1)))
    return (sample.double() - sigma * flow.double()).to(flow.dtype)


class ChunkScheduler:
    """What the sampler asks of a scheduler, shared by `FlowScheduler` and `DMDScheduler`.

    `set_timesteps(steps, stage_index=, mu=, amplify=, ...)` builds one chunk's (or one pyramid stage's)
    schedule; `step(model_output, sample, start_point)` advances one step; `denoised(model_output, sample)`
    is the x0 the current step's output implies. `amplify` (more steps for the first chunk) and
    `start_point` (the stage's starting latents) are what the DMD sampler uses; a multi-step solver takes
    and ignores them, so the sampler drives both the same way.
    """

    config: SchedulerConfig

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.tables = stage_tables(config)
        self.timesteps: torch.Tensor | None = None  # (n,) on the requested device
        self.timesteps_cpu: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None  # (n+1,) on the CPU
        self._i = 0

    @property
    def ori_start_sigmas(self) -> tuple[float, ...]:
        return self.tables.ori_start_sigmas

    @property
    def num_steps(self) -> int:
        return 0 if self.timesteps_cpu is None else len(self.timesteps_cpu)

    @property
    def step_index(self) -> int:
        return self._i

    def _use_schedule(self, t: torch.Tensor, s: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
        self.timesteps_cpu, self.sigmas = t, s
        self.timesteps = t.to(device) if device is not None else t
        return self.timesteps

    def _check_can_step(self) -> None:
        if self.timesteps_cpu is None:
            raise RuntimeError("call set_timesteps() before step()")
        if self._i >= self.num_steps:
            raise RuntimeError(f"step() called {self._i + 1} times for a {self.num_steps}-step schedule; "
                               "call set_timesteps() for the next chunk/stage")

    def set_timesteps(self, num_inference_steps: int, stage_index: int | None = None, mu: float | None = None,
                      sigmas=None, device: torch.device | str | None = None, amplify: bool = False,
                      extra_timesteps: Sequence[float] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, sample: torch.Tensor,
             start_point: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def denoised(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma_i v at the current step (float64, in the output's dtype); the state is kept."""
        return flow_to_x0(model_output, sample, self.sigmas[self._i].item())


class FlowScheduler(ChunkScheduler):
    """Euler / UniPC sampler over the Helios flow-matching schedule (diffusers HeliosScheduler).

    State between `step` calls: the step counter, and for UniPC the last `solver_order`
    converted model outputs plus the previous (pre-predictor) sample.
    """

    def __init__(self, config: SchedulerConfig | None = None, **overrides: Any):
        config = dataclasses.replace(config or SchedulerConfig(), **overrides)
        if config.scheduler_type == "dmd":
            raise ValueError("scheduler_type='dmd' is sampled by helios.sampling.dmd.DMDScheduler, not FlowScheduler")
        super().__init__(config)
        self._euler_deltas: list[float] = []
        self._plan: list[UniStepPlan] = []
        self.reset()

    # --- public -------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int,
        stage_index: int | None = None,
        mu: float | None = None,
        sigmas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        device: torch.device | str | None = None,
        amplify: bool = False,
        extra_timesteps: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Build the schedule for one chunk (single stage) or one pyramid stage; resets state.
        `extra_timesteps`: model timesteps a pyramid stage must also visit (see `insert_timesteps`).
        `amplify` is the DMD sampler's and has no effect here (the reference passes it to DMD only)."""
        t, s = build_schedule(self.config, self.tables, num_inference_steps, stage_index, mu, sigmas,
                              extra_timesteps=extra_timesteps)
        self._use_schedule(t, s, device)
        if self.config.scheduler_type == "euler":
            self._euler_deltas = [(s[i + 1] - s[i]).item() for i in range(len(t))]
        else:
            self._plan = unipc_plan(s, self.config)
        self.reset()
        return self.timesteps

    def reset(self) -> None:
        """Rewind to step 0 and drop the UniPC history (schedule kept)."""
        self._i = 0
        self._history: list[torch.Tensor] = []
        self._last_sample: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, sample: torch.Tensor,
             start_point: torch.Tensor | None = None) -> torch.Tensor:
        """Advance `sample` from sigmas[i] to sigmas[i+1] given the model output at timesteps[i]
        (`start_point` is the DMD sampler's; unused here)."""
        self._check_can_step()
        if self.config.scheduler_type == "euler":
            out = self._euler_step(model_output, sample)
        else:
            out = self._unipc_step(model_output, sample)
        self._i += 1
        return out

    # --- solvers ------------------------------------------------------------

    def _euler_step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # the reference accumulates in float32, then returns the model output's dtype
        return (x.to(torch.float32) + _as(self._euler_deltas[self._i], v) * v).to(v.dtype)

    def _to_model_space(self, out: torch.Tensor, x: torch.Tensor, p: UniStepPlan) -> torch.Tensor:
        """Model output -> the quantity UniPC integrates (x0 if predict_x0, else epsilon)."""
        kind = self.config.prediction_type
        if self.config.predict_x0:
            if kind == "flow_prediction":
                return x - _as(p.sigma, out) * out
            if kind == "epsilon":
                return (x - _as(p.sigma_t, out) * out) / p.alpha_t
            if kind == "sample":
                return out
            return p.alpha_t * x - _as(p.sigma_t, out) * out  # v_prediction
        if kind == "epsilon":
            return out
        if kind == "sample":
            return (x - _as(p.alpha_t, out) * out) / p.sigma_t
        return _as(p.alpha_t, out) * out + p.sigma_t * x  # v_prediction

    def _unipc_step(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        p = self._plan[self._i]
        m = self._to_model_space(out, x, p)
        if p.corrector is not None:  # UniC: refine the previous predictor result with the new output
            x = _apply_update(p.corrector, self._last_sample, self._history, m)
        self._history = (self._history + [m])[-self.config.solver_order:]
        self._last_sample = x
        return _apply_update(p.predictor, x, self._history, None)
