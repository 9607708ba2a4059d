"""Easy Anti-Drifting history degradation and the T2V / I2V / V2V task dropout.

Everything here is a pure function of its inputs and a ``torch.Generator`` (inputs are never
modified in place). Two degradation styles are provided:

``style="official"`` (default) reproduces what the official training code does, which is
*not* the per-frame categorical sampling described in the paper:

1. one draw per call (i.e. per training step, shared by the whole batch): with probability
   ``clean_prob`` the whole history is left clean;
2. otherwise one mode for the whole history: ``mode="noise"`` | ``"downsample"`` |
   ``"random"`` (noise with probability ``noise_mode_prob``, else downsample);
3. the history (without the anchor, oldest first: long 16 + mid 2 + last 1 = 19 frames) is cut
   into segments: the ``19 % 9 = 1`` oldest frame (``tail``), then 9-frame windows; the last
   window is split into its first ``mid`` (=2) frames and the rest. The anchor is a segment of
   its own. Segments whose window sums to zero (dropped by the task dropout) are skipped;
4. noise: ``x' = s * eps + (1 - s) * x`` with ``s ~ U[0, noise_max)`` drawn per sample and per
   frame (``frame_independent=True``) or per sample;
   downsample: bilinear (antialiased) resize by ``r ~ U[downsample_min, downsample_max]``
   (one ``r`` per segment) and back;
5. saturation (only used by the official stage-3 generator rollout, after step 4): per
   segment (anchor excluded), clean with probability ``saturation_clean_prob``, else
   ``x' = (x - mean_c(x)) * k + mean_c(x)`` where ``mean_c`` is the mean over latent channels
   and ``k ~ U[sat_min, 1)`` or ``U(1, sat_max]`` with probability 1/2 each.

``style="per_frame"`` is the paper's Frame-Aware Corrupt (Table 1): every history frame of
every sample independently draws one of {saturation, noise, downsample, clean} with
probabilities ``p_saturation, p_noise, p_downsample, p_clean``.

Each component can be switched off (``noise_enabled``, ``downsample_enabled``,
``saturation_enabled``); a switched-off component becomes the identity (its probability mass
goes to "clean"), and ``enabled=False`` makes the whole degradation the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from helios.model_folder import LATENT_CHUNK_FRAMES
from helios.sampling.pyramid import noise_like

from .history import HistoryLayout, history_frames

__all__ = [
    "HistoryCorruptionConfig",
    "ModelInputCorruptionConfig",
    "TaskDropoutConfig",
    "CorruptionLog",
    "corrupt_history",
    "saturate_history",
    "frame_aware_corrupt",
    "degrade_history",
    "corrupt_model_input",
    "apply_task_dropout",
    "history_segments",
    "noise_corrupt",
    "downsample_corrupt",
    "saturation_corrupt",
]

OP_CLEAN, OP_NOISE, OP_DOWNSAMPLE, OP_SATURATION = 0, 1, 2, 3
OP_NAMES = {OP_CLEAN: "clean", OP_NOISE: "noise", OP_DOWNSAMPLE: "downsample", OP_SATURATION: "saturation"}


def _from_dict(cls, d: dict[str, Any] | None):
    d = dict(d or {})
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**d)


@dataclass
class HistoryCorruptionConfig:
    enabled: bool = True  # official: corrupt_history
    style: str = "official"  # "official" | "per_frame"
    # ---- official style ----
    mode: str = "noise"  # corrupt_mode_history: "noise" | "downsample" | "random"
    noise_mode_prob: float = 0.9  # corrupt_mode_prob_history
    clean_prob: float = 0.1  # noise_corrupt_clean_prob_history
    frame_independent: bool = True  # is_frame_independent_corrupt_history
    noise_max_long: float = 1 / 3  # noise_corrupt_ratio_history_long
    noise_max_mid: float = 1 / 3  # noise_corrupt_ratio_history_mid
    noise_max_short: float = 1 / 3  # noise_corrupt_ratio_history_short (the anchor)
    downsample_min: float = 0.9  # downsample_min_corrupt_ratio_history
    downsample_max: float = 1.0  # downsample_max_corrupt_ratio_history
    saturation_min: float = 0.3  # saturation_ratio_min
    saturation_max: float = 1.7  # saturation_ratio_max
    saturation_clean_prob: float = 0.1  # saturation_ratio_clean_prob
    corrupt_anchor: bool = True  # official noise/downsample also hit the anchor (saturation never)
    zero_check: str = "batch"  # "batch" (official: window.sum()==0 over the batch) | "sample"
    # ---- component switches ----
    noise_enabled: bool = True
    downsample_enabled: bool = True
    saturation_enabled: bool = False  # official: is_add_saturation (stage-3 rollout only)
    # ---- per_frame style (paper Table 1) ----
    p_saturation: float = 0.0
    p_noise: float = 0.8
    p_downsample: float = 0.1
    p_clean: float = 0.1

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "HistoryCorruptionConfig":
        return _from_dict(cls, d)


@dataclass
class ModelInputCorruptionConfig:
    """Official ``corrupt_model_input`` (off in every released config)."""

    enabled: bool = False  # corrupt_model_input
    mode: str = "noise"  # corrupt_mode_model_input
    noise_mode_prob: float = 0.9  # corrupt_mode_prob_model_input
    frame_independent: bool = True  # is_frame_independent_corrupt_model_input
    noise_max: float = 1 / 3  # noise_corrupt_ratio_model_input
    clean_prob: float = 0.1  # noise_corrupt_clean_prob_model_input
    downsample_min: float = 0.9  # downsample_min_corrupt_ratio_model_input
    downsample_max: float = 1.0  # downsample_max_corrupt_ratio_model_input

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ModelInputCorruptionConfig":
        return _from_dict(cls, d)


@dataclass
class TaskDropoutConfig:
    enabled: bool = True  # is_random_drop
    t2v_ratio: float = 0.4  # random_drop_t2v_ratio
    v2v_ratio: float = 0.4  # random_drop_v2v_ratio
    i2v_ratio: float = 0.1  # random_drop_i2v_ratio (correct.yaml; 0 in the released configs)
    per_sample: bool = False  # official: one decision per batch

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TaskDropoutConfig":
        return _from_dict(cls, d)


@dataclass
class CorruptionLog:
    """What was applied (for logging and tests)."""

    decision: str = "none"  # official: "disabled" | "clean" | "noise" | "downsample" | "none"
    segments: list[dict[str, Any]] = field(default_factory=list)
    frame_ops: torch.Tensor | None = None  # per_frame: (B, n_frames) op codes, anchor first


# --------------------------------------------------------------------------------------------
# random helpers (all draws from the given generator, on its device, then moved)


def _rand(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(*shape, generator=generator, device=dev)


def _uniform(generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * _rand(generator, 1).item())


def _randint(generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high)``."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(low, high, (1,), generator=generator, device=dev).item())


# --------------------------------------------------------------------------------------------
# primitive corruptions


def noise_corrupt(x: torch.Tensor, noise_max: float, generator, frame_independent: bool = True) -> torch.Tensor:
    """``x' = s * eps + (1 - s) * x`` with ``s ~ U[0, noise_max)`` per sample (and per frame)."""
    B, T = x.shape[0], x.shape[2]
    s = _rand(generator, B, 1, T if frame_independent else 1, 1, 1) * noise_max
    s = s.to(x.device, x.dtype)
    return s * noise_like(x, generator) + (1 - s) * x


def downsample_corrupt(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bilinear antialiased resize of every frame by ``ratio`` and back to the original size."""
    B, C, T, H, W = x.shape
    y = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    y = _resize_down_up(y, _downsample_size(H, W, ratio))
    return y.reshape(B, T, C, H, W).permute(0, 2, 1, 3, 4)


def _downsample_size(H: int, W: int, ratio: float) -> tuple[int, int]:
    return max(1, int(round(H * ratio))), max(1, int(round(W * ratio)))


def _resize_down_up(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images ``(N, C, H, W)`` resized to ``size`` and back (float32, antialiased); each image on its own,
    so images that share ``size`` can go in one call."""
    dt, hw = images.dtype, images.shape[-2:]
    y = images.float()
    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)
    y = F.interpolate(y, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return y.to(dt)


def saturation_corrupt(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """``(x - mean_c) * factor + mean_c``; ``mean_c`` is the mean over the channel dim (dim 1)."""
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * factor + m


def _saturation_factor(generator, lo: float, hi: float) -> float:
    if _rand(generator, 1).item() < 0.5:
        return _uniform(generator, lo, 1.0 - 1e-3)
    return _uniform(generator, 1.0 + 1e-3, hi)


# --------------------------------------------------------------------------------------------
# official segmentation


def history_segments(layout: HistoryLayout) -> list[dict[str, Any]]:
    """Segments of the 19-frame history (anchor excluded, oldest first) as the official code cuts
    them. Each segment: ``name``, ``start``, ``end`` (frame range), ``ratio`` (which noise level
    applies: long/mid), ``window`` (frame range whose sum decides whether it is skipped)."""
    n, W = history_frames(layout), layout.chunk_frames
    long, mid, _ = layout.term_sizes
    tail, n_windows = n % W, n // W
    if tail > long:
        raise ValueError("history layout not supported: tail longer than the long memory")
    segs: list[dict[str, Any]] = []
    if tail:
        segs.append({"name": "tail", "start": 0, "end": tail, "ratio": "long", "window": (0, tail)})
    for k in range(n_windows):
        a, b = tail + k * W, tail + (k + 1) * W
        if k == n_windows - 1:
            split = a + mid
            segs.append({"name": f"window{k}a", "start": a, "end": split, "ratio": "long", "window": (a, b)})
            segs.append({"name": f"window{k}b", "start": split, "end": b, "ratio": "mid", "window": (a, b)})
        else:
            segs.append({"name": f"window{k}", "start": a, "end": b, "ratio": "long", "window": (a, b)})
    return segs


def _nonzero(x: torch.Tensor, zero_check: str) -> torch.Tensor:
    """Which samples have a non-zero ``x``; ``batch`` mode: one flag broadcast to all samples."""
    if zero_check == "batch":
        flag = bool(x.sum() != 0)
        return torch.full((x.shape[0],), flag, dtype=torch.bool, device=x.device)
    return x.flatten(1).abs().sum(dim=1) != 0


def _where_samples(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (old.ndim - 1))), new, old)


def _pack(short, mid, long, layout):
    """-> (anchor or None, H (B, C, 19, h, w) oldest first)."""
    a = int(layout.keep_first_frame)
    anchor = short[:, :, :a] if a else None
    hist = torch.cat([long, mid, short[:, :, a:]], dim=2)
    return anchor, hist


def _unpack(anchor, hist, layout):
    long, mid, last = hist.split(list(layout.term_sizes), dim=2)
    short = torch.cat([anchor, last], dim=2) if anchor is not None else last
    return short, mid, long


def _choose_official_mode(cfg: HistoryCorruptionConfig, generator) -> str:
    if cfg.mode == "noise":
        m = "noise"
    elif cfg.mode == "downsample":
        m = "downsample"
    elif cfg.mode == "random":
        m = "noise" if _rand(generator, 1).item() < cfg.noise_mode_prob else "downsample"
    else:
        raise ValueError(f"unknown corruption mode {cfg.mode!r}")
    if (m == "noise" and not cfg.noise_enabled) or (m == "downsample" and not cfg.downsample_enabled):
        return "none"
    return m


def _apply_mode(x: torch.Tensor, mode: str, noise_max: float, cfg, generator) -> torch.Tensor:
    if mode == "noise":
        return noise_corrupt(x, noise_max, generator, cfg.frame_independent)
    r = _uniform(generator, cfg.downsample_min, cfg.downsample_max)
    return downsample_corrupt(x, r)


def corrupt_history(
    short: torch.Tensor,
    mid: torch.Tensor,
    long: torch.Tensor,
    cfg: HistoryCorruptionConfig,
    generator: torch.Generator | None,
    layout: HistoryLayout = HistoryLayout(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CorruptionLog]:
    """Official noise / downsample history corruption (step 1-4 of the module docstring).

    Inputs are the model's memory terms: ``short = [anchor, last]``, ``mid``, ``long``.
    Returns new ``(short, mid, long, log)``.
    """
    log = CorruptionLog()
    if not cfg.enabled:
        log.decision = "disabled"
        return short, mid, long, log
    if _rand(generator, 1).item() < cfg.clean_prob:
        log.decision = "clean"
        return short, mid, long, log
    mode = _choose_official_mode(cfg, generator)
    log.decision = mode
    if mode == "none":
        return short, mid, long, log

    anchor, hist = _pack(short, mid, long, layout)
    out = hist.clone()
    ratios = {"long": cfg.noise_max_long, "mid": cfg.noise_max_mid}
    for seg in history_segments(layout):
        wa, wb = seg["window"]
        keep = _nonzero(hist[:, :, wa:wb], cfg.zero_check)
        applied = bool(keep.any())
        if applied:
            a, b = seg["start"], seg["end"]
            new = _apply_mode(hist[:, :, a:b], mode, ratios[seg["ratio"]], cfg, generator)
            out[:, :, a:b] = _where_samples(keep, new, hist[:, :, a:b])
        log.segments.append({"name": seg["name"], "start": seg["start"], "end": seg["end"], "applied": applied})
    if anchor is not None:
        new_anchor = anchor
        keep = _nonzero(anchor, cfg.zero_check)
        applied = cfg.corrupt_anchor and bool(keep.any())
        if applied:
            new_anchor = _where_samples(keep, _apply_mode(anchor, mode, cfg.noise_max_short, cfg, generator), anchor)
        log.segments.append({"name": "anchor", "start": -1, "end": 0, "applied": applied})
        anchor = new_anchor
    s, m, l_ = _unpack(anchor, out, layout)
    return s, m, l_, log


def saturate_history(
    short: torch.Tensor,
    mid: torch.Tensor,
    long: torch.Tensor,
    cfg: HistoryCorruptionConfig,
    generator: torch.Generator | None,
    layout: HistoryLayout = HistoryLayout(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CorruptionLog]:
    """Official per-segment saturation change (anchor untouched), step 5 of the docstring."""
    log = CorruptionLog(decision="saturation")
    if not (cfg.enabled and cfg.saturation_enabled):
        log.decision = "disabled"
        return short, mid, long, log
    anchor, hist = _pack(short, mid, long, layout)
    out = hist.clone()
    for seg in history_segments(layout):
        wa, wb = seg["window"]
        keep = _nonzero(hist[:, :, wa:wb], cfg.zero_check)
        applied = False
        factor = None
        if bool(keep.any()) and not (_rand(generator, 1).item() < cfg.saturation_clean_prob):
            a, b = seg["start"], seg["end"]
            factor = _saturation_factor(generator, cfg.saturation_min, cfg.saturation_max)
            out[:, :, a:b] = _where_samples(keep, saturation_corrupt(hist[:, :, a:b], factor), hist[:, :, a:b])
            applied = True
        log.segments.append(
            {"name": seg["name"], "start": seg["start"], "end": seg["end"], "applied": applied, "factor": factor}
        )
    s, m, l_ = _unpack(anchor, out, layout)
    return s, m, l_, log


# --------------------------------------------------------------------------------------------
# paper-style per-frame corruption


def frame_aware_corrupt(
    short: torch.Tensor,
    mid: torch.Tensor,
    long: torch.Tensor,
    cfg: HistoryCorruptionConfig,
    generator: torch.Generator | None,
    layout: HistoryLayout = HistoryLayout(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CorruptionLog]:
    """Paper Frame-Aware Corrupt: per sample and per history frame, an independent draw among
    saturation / noise / downsample / clean. All-zero frames (dropped history) stay zero.
    ``log.frame_ops`` is ``(B, n)`` op codes over ``[anchor, long..., mid..., last...]``."""
    log = CorruptionLog(decision="per_frame")
    anchor, hist = _pack(short, mid, long, layout)
    frames = torch.cat([anchor, hist], dim=2) if anchor is not None else hist
    B, n = frames.shape[0], frames.shape[2]
    if not cfg.enabled:
        log.decision = "disabled"
        log.frame_ops = torch.zeros(B, n, dtype=torch.long)
        return short, mid, long, log
    probs = torch.tensor(
        [
            cfg.p_clean,
            cfg.p_noise if cfg.noise_enabled else 0.0,
            cfg.p_downsample if cfg.downsample_enabled else 0.0,
            cfg.p_saturation if cfg.saturation_enabled else 0.0,
        ],
        dtype=torch.float64,
    )
    full = torch.tensor([cfg.p_clean, cfg.p_noise, cfg.p_downsample, cfg.p_saturation], dtype=torch.float64)
    if full.sum() <= 0:
        raise ValueError("per_frame probabilities sum to zero")
    probs[0] += full.sum() - probs.sum()  # switched-off mass -> clean
    probs = probs / probs.sum()
    cdf = torch.cumsum(probs, 0)
    u = _rand(generator, B, n).double()
    ops = torch.searchsorted(cdf, u.clamp(max=1 - 1e-12), right=True).clamp(max=3)
    nonzero = frames.flatten(3).abs().sum(dim=(1, 3)) != 0  # (B, n)
    skip_anchor = anchor is not None and not cfg.corrupt_anchor
    if skip_anchor:
        nonzero[:, 0] = False
    ops = torch.where(nonzero.cpu(), ops.cpu(), torch.zeros_like(ops.cpu()))
    if anchor is not None:  # the anchor never gets saturation (as in the official code)
        ops[:, 0] = torch.where(ops[:, 0] == OP_SATURATION, torch.zeros_like(ops[:, 0]), ops[:, 0])
    # one noise level per frame; the anchor uses noise_max_short, the rest noise_max_long
    sig = _rand(generator, B, n)
    noise_max = torch.full((n,), cfg.noise_max_long)
    if anchor is not None:
        noise_max[0] = cfg.noise_max_short
    sig = (sig.cpu() * noise_max).to(frames.device, frames.dtype)
    eps = noise_like(frames, generator)
    noise_mask = (ops == OP_NOISE).to(frames.device)
    noisy = sig[:, None, :, None, None] * eps + (1 - sig[:, None, :, None, None]) * frames
    out = torch.where(noise_mask[:, None, :, None, None], noisy, frames)
    # host draws in the order of the frames (all ratios, then all factors), then batched tensor work
    down = (ops == OP_DOWNSAMPLE).nonzero().tolist()
    ratios = [_uniform(generator, cfg.downsample_min, cfg.downsample_max) for _ in down]
    sat = (ops == OP_SATURATION).nonzero().tolist()
    factors = [_saturation_factor(generator, cfg.saturation_min, cfg.saturation_max) for _ in sat]
    _downsample_frames_(out, frames, down, ratios)
    _saturate_frames_(out, frames, sat, factors)
    log.frame_ops = ops
    if anchor is not None:
        anchor, hist = out[:, :, :1], out[:, :, 1:]
    else:
        hist = out
    s, m, l_ = _unpack(anchor, hist, layout)
    return s, m, l_, log


def _frame_index(frames: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[[b, f], ...]`` -> (rows, frames) index tensors on ``device`` (one host -> device copy)."""
    bf = torch.tensor(frames, dtype=torch.long).reshape(-1, 2).to(device)
    return bf[:, 0], bf[:, 1]


def _downsample_frames_(out: torch.Tensor, frames: torch.Tensor, where: list[list[int]],
                        ratios: list[float]) -> None:
    """``out[b, :, f] = downsample_corrupt(frames[b, :, f], r)`` for each ``(b, f)`` of ``where``, in place.
    The resize depends on ``r`` only through the reduced size, so there is one call per distinct size
    (a handful for a resolution and the ratio range), not one per frame."""
    groups: dict[tuple[int, int], list[list[int]]] = {}
    for bf, r in zip(where, ratios):
        groups.setdefault(_downsample_size(*frames.shape[-2:], r), []).append(bf)
    for size, group in groups.items():
        b, f = _frame_index(group, out.device)
        out[b, :, f] = _resize_down_up(frames[b, :, f], size)  # (n, C, H, W): one image per frame


def _saturate_frames_(out: torch.Tensor, frames: torch.Tensor, where: list[list[int]],
                      factors: list[float]) -> None:
    """``out[b, :, f] = saturation_corrupt(frames[b, :, f], k)`` for each ``(b, f)`` of ``where``, in place."""
    if not where:
        return
    b, f = _frame_index(where, out.device)
    x = frames[b, :, f]  # (n, C, H, W)
    m = x.mean(dim=1, keepdim=True)
    k = torch.tensor(factors, dtype=torch.float32).to(out.device).view(-1, 1, 1, 1)
    # the product in float32 then x's dtype, as with the Python-float factor of saturation_corrupt
    out[b, :, f] = ((x - m) * k).to(x.dtype) + m


def degrade_history(
    short: torch.Tensor,
    mid: torch.Tensor,
    long: torch.Tensor,
    cfg: HistoryCorruptionConfig,
    generator: torch.Generator | None,
    layout: HistoryLayout = HistoryLayout(),
    with_saturation: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[CorruptionLog]]:
    """Full history degradation. Official style: noise/downsample, then (if
    ``saturation_enabled`` and ``with_saturation`` is not False) the per-segment saturation.
    The official code applies saturation only inside the stage-3 generator rollout; pass
    ``with_saturation=False`` for the inputs of the real/fake score models there.
    Per-frame style: one pass."""
    if cfg.style == "per_frame":
        s, m, l_, log = frame_aware_corrupt(short, mid, long, cfg, generator, layout)
        return s, m, l_, [log]
    if cfg.style != "official":
        raise ValueError(f"unknown corruption style {cfg.style!r}")
    s, m, l_, log1 = corrupt_history(short, mid, long, cfg, generator, layout)
    logs = [log1]
    if cfg.saturation_enabled and with_saturation is not False:
        s, m, l_, log2 = saturate_history(s, m, l_, cfg, generator, layout)
        logs.append(log2)
    return s, m, l_, logs


# --------------------------------------------------------------------------------------------
# model-input corruption (official, disabled in all released configs)


def corrupt_model_input(x: torch.Tensor, cfg: ModelInputCorruptionConfig, generator) -> tuple[torch.Tensor, str]:
    """Official ``corrupt_model_input``: mode first (downsample has no clean branch), then the
    noise branch is clean with probability ``clean_prob``. Only the *noisy input* is built from
    the corrupted clean latent; the flow target keeps the clean one."""
    if not cfg.enabled:
        return x, "disabled"
    if cfg.mode == "random":
        mode = "noise" if _rand(generator, 1).item() < cfg.noise_mode_prob else "downsample"
    else:
        mode = cfg.mode
    if mode == "downsample":
        return downsample_corrupt(x, _uniform(generator, cfg.downsample_min, cfg.downsample_max)), "downsample"
    if _rand(generator, 1).item() < cfg.clean_prob:
        return x, "clean"
    return noise_corrupt(x, cfg.noise_max, generator, cfg.frame_independent), "noise"


# --------------------------------------------------------------------------------------------
# task dropout


def _draw_task(cfg: TaskDropoutConfig, generator, n: int, window: int) -> tuple[str, int]:
    """One task decision (host draws, official order) -> ``(label, k)``: zero the ``k`` oldest of the
    ``n`` history frames; ``t2v`` zeroes them all and the anchor."""
    if cfg.t2v_ratio > 0 and _rand(generator, 1).item() < cfg.t2v_ratio:
        return "t2v", n
    if cfg.i2v_ratio > 0 and _rand(generator, 1).item() < cfg.i2v_ratio:
        return "i2v", max(0, n - 1)  # keep the anchor and the most recent frame only
    if cfg.v2v_ratio > 0 and _rand(generator, 1).item() < cfg.v2v_ratio:
        n_windows = n // window
        n_drop = n % window
        if n_windows > 0:
            n_drop += _randint(generator, 0, n_windows + 1) * window
        return f"v2v_drop{n_drop}", n_drop
    return "full", 0


def _keep_frames(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x (B, C, T, h, w)`` with the frames where ``keep (B or 1, T)`` is False set to zero."""
    return torch.where(keep[:, None, :, None, None], x, 0.0)


def _drop_frames(anchor, long, mid, last, tasks: list[str], n_drops: list[int]):
    """Zero, per row (one row: the whole batch), its ``n_drop`` oldest history frames (oldest first over
    ``long, mid, last``) and, for ``t2v``, its anchor: one masked select per tensor."""
    if not any(n_drops) and "t2v" not in tasks:  # nothing dropped: the inputs as they are
        return anchor, long, mid, last
    sizes = [long.shape[2], mid.shape[2], last.shape[2]]
    keep = torch.arange(sum(sizes))[None, :] >= torch.tensor(n_drops)[:, None]  # (rows, n), made on the host
    keep = keep.to(long.device).split(sizes, dim=1)
    long, mid, last = (_keep_frames(t, k) for t, k in zip((long, mid, last), keep))
    if anchor is not None:
        anchor = _keep_frames(anchor, torch.tensor([[t != "t2v"] for t in tasks]).to(anchor.device))
    return anchor, long, mid, last


def apply_task_dropout(
    anchor: torch.Tensor | None,
    long: torch.Tensor,
    mid: torch.Tensor,
    last: torch.Tensor,
    cfg: TaskDropoutConfig,
    generator: torch.Generator | None,
    window: int = LATENT_CHUNK_FRAMES,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Official task dropout on ``anchor (B,C,1,h,w)``, ``long``, ``mid``, ``last`` (the history
    frames *without* the anchor, oldest first). Returns new tensors and the task label per
    sample: ``t2v`` (everything, anchor included, zeroed), ``i2v`` (only anchor + last frame
    kept), ``v2v_drop{k}`` (the ``k`` oldest frames zeroed, ``k = 19 % 9 + j * 9`` with ``j``
    uniform in ``{0, 1, 2}``), ``full`` (untouched).

    Order of the draws as in the official code: T2V with ``t2v_ratio``; otherwise I2V with
    ``i2v_ratio``; otherwise V2V-drop with ``v2v_ratio``. Official: one decision per batch;
    ``per_sample=True`` decides per sample."""
    B = long.shape[0]
    if not cfg.enabled:
        return anchor, long, mid, last, ["full"] * B
    n = long.shape[2] + mid.shape[2] + last.shape[2]
    # the decisions are host draws (one, or one per sample in sample order); the zeroing is batched
    decisions = [_draw_task(cfg, generator, n, window) for _ in range(B if cfg.per_sample else 1)]
    tasks = [t for t, _ in decisions]
    a, lo, mi, la = _drop_frames(anchor, long, mid, last, tasks, [k for _, k in decisions])
    return a, lo, mi, la, (tasks if cfg.per_sample else tasks * B)
