"""Weight-free long-video metrics on uint8 (T,H,W,3) frames: per-frame series, windows and drift.

Everything is a per-frame series of length T (NaN where a metric is undefined, e.g. motion at
frame 0 or frames that a sparse metric did not sample). Windows and drift are NaN-aware means
of those series, so dense and sparse metrics share one code path.

Per-frame metrics (units):
  brightness   mean luma, 0..255            saturation  mean HSV saturation, 0..1
  sharpness    variance of the Laplacian of luma (bigger = sharper)
  color_shift  L2 distance of the frame's mean RGB from the first chunk's (0..441)
  std_shift    L2 distance of the per-channel RGB std from the first chunk's
  flicker      |brightness[t] - brightness[t-1]|      frame_diff  mean |frame[t] - frame[t-1]|
  motion       mean block-matching displacement, pixels/frame at full resolution
  motion_top   mean of the largest 5% of block displacements (motion of the moving part)
  smoothness   1 - mean|frame[t] - (frame[t-1] + frame[t+1]) / 2| / 255, 1 = perfectly smooth
"""

from __future__ import annotations

import math

import numpy as np

from helios.model_folder import CHUNK_FRAMES  # Helios writes this many frames per autoregressive chunk

DRIFT_FRACTION = 0.15  # the paper's drift: first 15% vs last 15% of frames
MOTION_MAX_SIDE = 128  # block matching runs on luma downscaled to this longest side
MOTION_BLOCK = 8
MOTION_RADIUS = 8  # search range in downscaled pixels
BOUNDARY_FLOOR = 0.1  # grey levels; keeps boundary/within ratios finite on static videos

DENSE_METRICS = (
    "brightness", "saturation", "sharpness", "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b",
    "frame_diff", "motion", "motion_top", "smoothness",
)


def as_uint8_numpy(frames) -> np.ndarray:
    """(T,H,W,3) uint8 numpy view of an array or torch tensor, with a clear error otherwise."""
    if hasattr(frames, "detach"):  # torch tensor, without importing torch here
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 frames of shape (T,H,W,3), got {frames.dtype} {tuple(frames.shape)}; "
            "convert float frames with (x.clip(0, 1) * 255).round().astype(uint8) and use channels-last."
        )
    return frames


# -----------------------------------------------------------------------------
# single-frame measurements (batched over B frames)


def planar(frame: np.ndarray) -> np.ndarray:
    """(H,W,3) uint8 -> contiguous (3,H,W) float32: per-channel reductions on contiguous planes are fast."""
    return np.ascontiguousarray(frame.transpose(2, 0, 1), dtype=np.float32)


def luma(x: np.ndarray) -> np.ndarray:
    """BT.601 luma (H,W) in 0..255 of a planar (3,H,W) frame."""
    return x[0] * 0.299 + x[1] * 0.587 + x[2] * 0.114


def laplacian_variance(y: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of (H,W) luma: a standard focus/sharpness measure."""
    lap = y[1:-1, :-2] + y[1:-1, 2:] + y[:-2, 1:-1] + y[2:, 1:-1] - 4 * y[1:-1, 1:-1]
    return float(lap.var()) if lap.size else math.nan


def hsv_saturation(x: np.ndarray) -> float:
    """Mean HSV saturation (max-min)/max of a planar (3,H,W) frame, 0..1."""
    mx = np.maximum(np.maximum(x[0], x[1]), x[2])
    mn = np.minimum(np.minimum(x[0], x[1]), x[2])
    return float(((mx - mn) / np.maximum(mx, 1.0)).mean())  # mx == 0 gives 0/1 = 0


def frame_stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Brightness, saturation, sharpness and per-channel mean/std of a planar frame x with luma y."""
    flat = x.reshape(3, -1)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    out = {"brightness": float(y.mean()), "saturation": hsv_saturation(x), "sharpness": laplacian_variance(y)}
    for i, c in enumerate("rgb"):
        out[f"mean_{c}"], out[f"std_{c}"] = float(mean[i]), float(std[i])
    return out


# -----------------------------------------------------------------------------
# motion: block matching on downscaled luma (no OpenCV)


def downscale(y: np.ndarray, max_side: int = MOTION_MAX_SIDE) -> tuple[np.ndarray, int]:
    """Area-average (H,W) by an integer factor so the longest side is <= max_side."""
    f = max(1, math.ceil(max(y.shape) / max_side))
    if f == 1:
        return y, 1
    h, w = y.shape[0] // f * f, y.shape[1] // f * f
    return y[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3)), f


def block_motion(prev: np.ndarray, cur: np.ndarray, block: int = MOTION_BLOCK, radius: int = MOTION_RADIUS) -> np.ndarray:
    """Per-block displacement (nby, nbx, 2) = (dy, dx) with cur[y, x] ~ prev[y + dy, x + dx].

    Exhaustive SAD search over +-radius, short vectors preferred on ties (flat regions, straight edges),
    parabolic sub-pixel refinement.
    """
    h, w = cur.shape
    nby, nbx = h // block, w // block
    if nby == 0 or nbx == 0:
        return np.zeros((0, 0, 2), np.float32)
    hh, ww = nby * block, nbx * block
    c = cur[:hh, :ww]
    p = np.pad(prev, radius, mode="edge")
    offs = np.arange(-radius, radius + 1)
    n = len(offs)
    cost = np.empty((n, n, nby, nbx), np.float32)
    for i, dy in enumerate(offs):
        for j, dx in enumerate(offs):
            d = np.abs(c - p[radius + dy : radius + dy + hh, radius + dx : radius + dx + ww])
            cost[i, j] = d.reshape(nby, block, nbx, block).sum(axis=(1, 3))
    flat = cost.reshape(n * n, nby, nbx)
    # ties along an edge (aperture problem) go to the shortest vector: +0.1 grey level/pixel per pixel moved
    length = np.hypot(*np.meshgrid(offs, offs, indexing="ij")).reshape(n * n, 1, 1)
    best = (flat + 0.1 * block * block * length).argmin(axis=0)
    # flat or ambiguous blocks stay at zero unless another offset is clearly better (> 1 grey level/pixel)
    zero = radius * n + radius
    best = np.where(flat[zero] <= flat.min(axis=0) + block * block, zero, best)
    bi, bj = best // n, best % n
    vec = np.stack([offs[bi], offs[bj]], axis=-1).astype(np.float32)

    yy, xx = np.meshgrid(np.arange(nby), np.arange(nbx), indexing="ij")

    def cost_at(i, j):
        return cost[np.clip(i, 0, n - 1), np.clip(j, 0, n - 1), yy, xx]

    mid = cost_at(bi, bj)
    neighbours = ((cost_at(bi - 1, bj), cost_at(bi + 1, bj), bi), (cost_at(bi, bj - 1), cost_at(bi, bj + 1), bj))
    for axis, (lo, hi, b) in enumerate(neighbours):
        den = lo - 2 * mid + hi
        ok = (b > 0) & (b < n - 1) & (den > 0) & (mid > 0)  # an exact match is already exact
        vertex = (lo - hi) / (2 * np.where(ok, den, 1))  # of the parabola through the three costs
        vec[..., axis] += np.clip(np.where(ok, vertex, 0.0), -0.5, 0.5)
    return vec


def motion_magnitude(prev_y: np.ndarray, cur_y: np.ndarray) -> tuple[float, float]:
    """(mean, top-5% mean) block displacement in full-resolution pixels between two (H,W) luma frames."""
    a, f = downscale(prev_y)
    b, _ = downscale(cur_y)
    mag = np.linalg.norm(block_motion(a, b), axis=-1).ravel() * f
    if mag.size == 0:
        return float("nan"), float("nan")
    k = max(1, int(round(0.05 * mag.size)))
    return float(mag.mean()), float(np.sort(mag)[-k:].mean())


def interpolation_smoothness(prev: np.ndarray, cur: np.ndarray, nxt: np.ndarray) -> float:
    """1 - mean|cur - (prev + nxt)/2| / 255: how well linear interpolation of the neighbours predicts cur."""
    return 1.0 - float(np.abs(cur - (prev + nxt) * 0.5).mean()) / 255.0


# -----------------------------------------------------------------------------
# streaming per-frame series


class FrameSeries:
    """Accumulates dense per-frame metrics over a stream of (B,H,W,3) uint8 chunks (flat memory)."""

    def __init__(self):
        self.cols: dict[str, list[float]] = {k: [] for k in DENSE_METRICS}
        self.n = 0
        self.prev: np.ndarray | None = None  # last frame seen, planar float32
        self.prev_y: np.ndarray | None = None
        self.prev2: np.ndarray | None = None  # the one before it
        self.size: tuple[int, int] | None = None

    def update(self, batch) -> None:
        batch = as_uint8_numpy(batch)
        if self.size is None:
            self.size = batch.shape[1:3]
        elif batch.shape[1:3] != self.size:
            raise ValueError(f"frame size changed mid-video from {self.size} to {batch.shape[1:3]}")
        for frame in batch:
            self._add(planar(frame))

    def _add(self, x: np.ndarray) -> None:
        y = luma(x)
        for k, v in frame_stats(x, y).items():
            self.cols[k].append(v)
        if self.prev is None:
            diff, mot, top = math.nan, math.nan, math.nan
        else:
            diff = float(np.abs(x - self.prev).mean())
            mot, top = motion_magnitude(self.prev_y, y)
        self.cols["frame_diff"].append(diff)
        self.cols["motion"].append(mot)
        self.cols["motion_top"].append(top)
        # smoothness is defined at the middle frame, known once its successor arrives
        if self.prev2 is not None:
            self.cols["smoothness"][-1] = interpolation_smoothness(self.prev2, self.prev, x)
        self.cols["smoothness"].append(math.nan)
        self.prev2, self.prev, self.prev_y = self.prev, x, y
        self.n += 1

    def result(self) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v, dtype=np.float64) for k, v in self.cols.items()}
        b = out["brightness"]
        out["flicker"] = np.concatenate([[np.nan], np.abs(np.diff(b))])
        ref = slice(0, min(CHUNK_FRAMES, len(b)))
        mean = np.stack([out[f"mean_{c}"] for c in "rgb"], axis=1)
        std = np.stack([out[f"std_{c}"] for c in "rgb"], axis=1)
        out["color_shift"] = np.linalg.norm(mean - mean[ref].mean(axis=0), axis=1)
        out["std_shift"] = np.linalg.norm(std - std[ref].mean(axis=0), axis=1)
        return out


def frame_series(frames, batch: int = CHUNK_FRAMES) -> dict[str, np.ndarray]:
    """Dense per-frame metrics of an in-memory (T,H,W,3) uint8 video."""
    frames = as_uint8_numpy(frames)
    acc = FrameSeries()
    for i in range(0, len(frames), batch):
        acc.update(frames[i : i + batch])
    return acc.result()


# -----------------------------------------------------------------------------
# windows, drift, chunk boundaries


def nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def window_bounds(n_frames: int, fps: float, window_seconds: float) -> list[tuple[int, int]]:
    """[start, end) frame ranges of consecutive windows of window_seconds (last one may be shorter)."""
    size = max(1, int(round(window_seconds * fps)))
    return [(s, min(s + size, n_frames)) for s in range(0, n_frames, size)]


def window_means(series: dict[str, np.ndarray], bounds: list[tuple[int, int]]) -> list[dict[str, float]]:
    """NaN-aware mean of every series inside each window."""
    return [{k: nanmean(v[s:e]) for k, v in series.items()} for s, e in bounds]


def drift(x: np.ndarray, fraction: float = DRIFT_FRACTION) -> dict[str, float]:
    """The paper's drift |M(first 15%) - M(last 15%)|, with the signed change last - first."""
    n = max(1, int(round(fraction * len(x))))
    first, last = nanmean(x[:n]), nanmean(x[-n:])
    change = last - first
    return {"first": first, "last": last, "change": change, "drift": abs(change)}


def chunk_boundary_stats(diffs: np.ndarray, chunk: int = CHUNK_FRAMES) -> dict[str, float]:
    """Compare a frame-to-frame difference series at chunk seams (t % chunk == 0) with inside chunks.

    diffs[t] is the change from frame t-1 to t. ratio = boundary / max(within, BOUNDARY_FLOOR):
    ~1 means seams are invisible, >>1 means visible jumps every chunk.
    """
    t = np.arange(len(diffs))
    at_seam = (t % chunk == 0) & (t > 0)
    boundary, within = nanmean(diffs[at_seam]), nanmean(diffs[~at_seam & (t > 0)])
    ratio = boundary / max(within, BOUNDARY_FLOOR) if math.isfinite(boundary) and math.isfinite(within) else math.nan
    return {"boundary": boundary, "within": within, "ratio": ratio, "seams": int(at_seam.sum())}


# -----------------------------------------------------------------------------
# palette fidelity for the synthetic bouncing-shapes videos

PALETTE_TOL = 60.0  # RGB distance counted as "that colour"; < half the palette's min spacing (127)


def _component_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The horizontal runs of a (H,W) bool mask, (row, start, end) with end exclusive, and for each run
    the root run of its 4-connected component (run-length union-find, numpy only)."""
    h, w = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    row, start = np.nonzero(edges == 1)  # runs [start, end) per row, in row-major order
    _, end = np.nonzero(edges == -1)
    if row.size == 0:
        return row, start, end, np.zeros(0, np.int64)
    # runs in row r-1 that overlap run k of row r form a contiguous range in the sorted run list
    stride = w + 2
    start_key, end_key = row * stride + start, row * stride + end
    prev_row = (row - 1) * stride
    lo = np.searchsorted(end_key, prev_row + start, side="right")
    hi = np.searchsorted(start_key, prev_row + end, side="left")  # exclusive
    parent = np.arange(row.size)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for k in np.nonzero(hi > lo)[0]:
        for j in range(lo[k], hi[k]):
            a, b = find(k), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(row.size)], dtype=np.int64)
    return row, start, end, roots


def component_areas(mask: np.ndarray) -> np.ndarray:
    """Areas of the 4-connected components of a (H,W) bool mask."""
    _, start, end, roots = _component_runs(mask)
    if roots.size == 0:
        return np.zeros(0, np.int64)
    areas = np.bincount(roots, weights=end - start)
    return areas[areas > 0].astype(np.int64)


def component_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, n): the 4-connected components of a (H,W) bool mask numbered 1..n (0: outside), in
    row-major order of their first pixel."""
    row, start, end, roots = _component_runs(mask)
    labels = np.zeros(mask.shape, np.int32)
    if roots.size == 0:
        return labels, 0
    _, number = np.unique(roots, return_inverse=True)  # roots are their components' first runs
    for r, a, b, k in zip(row, start, end, number):
        labels[r, a:b] = k + 1
    return labels, int(number.max()) + 1


# -----------------------------------------------------------------------------
# shape of an object's mask: circle, square or triangle


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """How well one object's (H,W) bool mask matches each shape of the synthetic renderer: the IoU with
    the ideal shape of the same area, drawn by helios.scenes.shape_coverage at the mask's centroid (a
    triangle's centroid lies a third of its half height below its box centre). Area and centroid are
    the moments least disturbed by the ragged edges of a small object, where a fill ratio or corner count
    on a 6-pixel radius is not; the best of a few sub-pixel offsets absorbs the rounding of its edge."""
    from helios.scenes import SHAPES, shape_coverage

    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("shape_scores needs a mask with at least one pixel")
    area, cx, cy = float(ys.size), float(xs.mean()), float(ys.mean())
    size = {"circle": math.sqrt(area / math.pi), "square": math.sqrt(area) / 2, "triangle": math.sqrt(area / 2)}
    pad = int(math.ceil(max(size.values()))) + 2  # window around the object that every template fits in
    y0, x0 = max(0, int(cy) - 2 * pad), max(0, int(cx) - 2 * pad)
    win = mask[y0:int(cy) + 2 * pad + 1, x0:int(cx) + 2 * pad + 1]
    gy = np.arange(win.shape[0], dtype=np.float64)[:, None] + y0
    gx = np.arange(win.shape[1], dtype=np.float64)[None, :] + x0
    scores = {}
    for shape in SHAPES:
        r = size[shape]
        centre_y = cy - r / 3 if shape == "triangle" else cy
        best = 0.0
        for oy in (-0.5, 0.0, 0.5):
            for ox in (-0.5, 0.0, 0.5):
                ideal = shape_coverage(shape, gx - cx - ox, gy - centre_y - oy, r)
                best = max(best, float((ideal & win).sum()) / float((ideal | win).sum()))
        scores[shape] = best
    return scores


def classify_shape(mask: np.ndarray) -> str:
    """circle, square or triangle: the shape whose ideal mask overlaps one object's mask best."""
    scores = shape_scores(mask)
    return max(scores, key=scores.get)


def _color_distance(frame: np.ndarray, rgb) -> np.ndarray:
    return np.linalg.norm(frame.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1)


def expected_counts(scene) -> dict[str, int | None]:
    """Objects expected per colour (None when a plural has no number)."""
    out: dict[str, int | None] = {}
    for o in scene.objects:
        prev = out.get(o.color, 0)
        out[o.color] = None if prev is None or o.count is None else prev + o.count
    return out


def expected_shapes(scene) -> dict[str, set[str]]:
    """The shapes a caption gives each object colour."""
    out: dict[str, set[str]] = {}
    for o in scene.objects:
        out.setdefault(o.color, set()).add(o.shape)
    return out


def palette_frame_stats(frame: np.ndarray, scene, tol: float = PALETTE_TOL, min_area: int | None = None,
                        max_area: float | None = None, shapes: bool = False) -> dict[str, float]:
    """Background error/fraction, estimated background RGB, and per named colour: pixel fraction and object
    count; with `max_area`, also `<colour>_objects`: the blobs no larger than it (an object, not a region
    painted over), and with `shapes` too, `shape_objects` (how many such blobs of the captioned colours)
    and `shape_right` (how many of them `classify_shape` names a shape the caption gives their colour)."""
    from helios.scenes import COLORS

    h, w, _ = frame.shape
    min_area = min_area or max(4, int(0.0005 * h * w))
    bg_est = np.median(frame.reshape(-1, 3), axis=0).astype(np.float64)  # objects are a minority of pixels
    out = {"bg_r": bg_est[0], "bg_g": bg_est[1], "bg_b": bg_est[2]}
    if scene.background:
        ref = np.asarray(COLORS[scene.background], np.float64)
        out["background_error"] = float(np.linalg.norm(bg_est - ref))
        out["background_fraction"] = float((_color_distance(frame, ref) <= tol).mean())
    matches = []
    want_shapes = expected_shapes(scene)
    if shapes and max_area is not None:
        out["shape_objects"], out["shape_right"] = 0.0, 0.0
    for color, want in expected_counts(scene).items():
        mask = _color_distance(frame, COLORS[color]) <= tol
        labels, n = component_labels(mask)
        areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        count = int((areas >= min_area).sum())
        out[f"{color}_fraction"] = float(mask.mean())
        out[f"{color}_count"] = float(count)
        if max_area is not None:
            objects = np.nonzero((areas >= min_area) & (areas <= max_area))[0] + 1
            out[f"{color}_objects"] = float(objects.size)
            if shapes:
                out["shape_objects"] += objects.size
                out["shape_right"] += sum(classify_shape(labels == k) in want_shapes[color] for k in objects)
        if want is not None:
            matches.append(count == want)
    if matches:
        out["count_match"] = float(all(matches))
    return out


class PaletteSeries:
    """Sparse per-frame palette stats over a stream: every `stride`-th frame and the last one."""

    def __init__(self, scene, stride: int = 6, tol: float = PALETTE_TOL, min_area: int | None = None):
        self.scene, self.stride, self.tol, self.min_area = scene, max(1, stride), tol, min_area
        self.rows: dict[int, dict[str, float]] = {}
        self.n = 0
        self.last: np.ndarray | None = None

    def update(self, batch) -> None:
        batch = as_uint8_numpy(batch)
        for frame in batch:
            if self.n % self.stride == 0:
                self.rows[self.n] = palette_frame_stats(frame, self.scene, self.tol, self.min_area)
            self.last = frame
            self.n += 1

    def result(self) -> dict[str, np.ndarray]:
        if self.n and (self.n - 1) not in self.rows:  # so the last 15% always has a sample
            self.rows[self.n - 1] = palette_frame_stats(self.last, self.scene, self.tol, self.min_area)
        keys = sorted({k for r in self.rows.values() for k in r})
        out = {k: np.full(self.n, np.nan) for k in keys}
        for t, r in self.rows.items():
            for k, v in r.items():
                out[k][t] = v
        # background stability: movement of the estimated background colour between samples and from the start
        ts = sorted(self.rows)
        bg = np.array([[self.rows[t][f"bg_{c}"] for c in "rgb"] for t in ts])
        out["background_jitter"] = np.full(self.n, np.nan)
        out["background_shift"] = np.full(self.n, np.nan)
        if ts:
            out["background_jitter"][ts[1:]] = np.linalg.norm(np.diff(bg, axis=0), axis=1)
            out["background_shift"][ts] = np.linalg.norm(bg - bg[0], axis=1)
        return out


def palette_fidelity(
    frames, caption: str, fps: float = 24.0, window_seconds: float = 10.0, stride: int | None = None,
    tol: float = PALETTE_TOL, min_area: int | None = None,
) -> dict:
    """Check a synthetic video against its caption, per window.

    Returns {"scene": {...}, "windows": [{start_frame, end_frame, background_error, <colour>_count, ...}],
    "drift": {metric: {first, last, change, drift}}}. Raises ValueError if the caption names no colours.
    """
    from helios.scenes import parse_caption

    scene = parse_caption(caption)
    if not scene.objects and not scene.background:
        raise ValueError(
            f"caption {caption!r} names no known colours/shapes; expected e.g. "
            "'two red circles bouncing on a blue background'."
        )
    frames = as_uint8_numpy(frames)
    acc = PaletteSeries(scene, stride or max(1, int(round(fps / 4))), tol, min_area)
    for i in range(0, len(frames), CHUNK_FRAMES):
        acc.update(frames[i : i + CHUNK_FRAMES])
    series = acc.result()
    bounds = window_bounds(len(frames), fps, window_seconds)
    windows = [{"start_frame": s, "end_frame": e, **m} for (s, e), m in zip(bounds, window_means(series, bounds))]
    return {"scene": scene_dict(scene), "windows": windows, "drift": {k: drift(v) for k, v in series.items()}}


def scene_dict(scene) -> dict:
    return {"background": scene.background, "objects": [vars(o) for o in scene.objects],
            "expected_counts": expected_counts(scene)}


def nearest_palette_colour(rgb) -> str:
    """The palette's name for the colour closest to `rgb`."""
    from helios.scenes import COLORS

    rgb = np.asarray(rgb, np.float64)
    return min(COLORS, key=lambda c: float(np.linalg.norm(rgb - np.asarray(COLORS[c], np.float64))))


def adherence_frame(frame: np.ndarray, scene) -> dict[str, float]:
    """What one frame of a synthetic-style video gets right of its caption's scene (a Scene with a
    background): background_error (RGB distance of the median colour from the captioned background),
    background_right (1 when the palette colour nearest that median is it), colours (captioned object
    colours) and colours_present (those with at least one blob of an object's size: at most a quarter of
    the frame), count_match (1 when every captioned count is right; NaN when no count is captioned),
    shape_objects and shape_right (blobs of captioned colours, and how many have their captioned shape)."""
    h, w = frame.shape[:2]
    r = palette_frame_stats(frame, scene, max_area=0.25 * h * w, shapes=True)
    colours = sorted({o.color for o in scene.objects})
    return {"background_error": r["background_error"],
            "background_right": float(nearest_palette_colour((r["bg_r"], r["bg_g"], r["bg_b"])) == scene.background),
            "colours": float(len(colours)), "colours_present": float(sum(r[f"{c}_objects"] > 0 for c in colours)),
            "count_match": r.get("count_match", math.nan),
            "shape_objects": r["shape_objects"], "shape_right": r["shape_right"]}


def adherence_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """`adherence_frame` rows of a video (or a window of one) -> background_error (mean), background_right
    (fraction of frames), objects_present (fraction of (frame, captioned colour) pairs with that colour's
    blob), count_match (fraction of frames with every count right) and shape_right (fraction of detected
    objects with their captioned shape); NaN where nothing was there to score."""
    def ratio(num: str, den: str) -> float:
        total = sum(r[den] for r in rows)
        return float(sum(r[num] for r in rows) / total) if total else math.nan

    counts = [r["count_match"] for r in rows if math.isfinite(r["count_match"])]
    return {"background_error": float(np.mean([r["background_error"] for r in rows])) if rows else math.nan,
            "background_right": float(np.mean([r["background_right"] for r in rows])) if rows else math.nan,
            "objects_present": ratio("colours_present", "colours"),
            "count_match": float(np.mean(counts)) if counts else math.nan,
            "shape_right": ratio("shape_right", "shape_objects")}


def caption_scene(caption: str):
    """The Scene of a caption that names a background, or a clear error."""
    from helios.scenes import parse_caption

    scene = parse_caption(caption)
    if scene.background is None:
        raise ValueError(f"caption {caption!r} names no background; expected e.g. "
                         "'two red circles bouncing on a blue background'")
    return scene


def caption_adherence(frames, caption: str) -> dict[str, float]:
    """How far a short synthetic-style video draws what its caption says, over all its frames: the
    `adherence_summary` of its `adherence_frame` rows."""
    scene = caption_scene(caption)
    return adherence_summary([adherence_frame(f, scene) for f in as_uint8_numpy(frames)])
