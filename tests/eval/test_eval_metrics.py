"""Weight-free metrics on synthetic videos whose true answer is known."""

import numpy as np
import pytest

from helios.eval import metrics as M


def smooth_texture(h: int, w: int, seed: int = 0, sigma: float = 0.06) -> np.ndarray:
    """Band-limited random texture in 0..255 (float), so block matching and blur behave like on real video."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None]
    tex = np.real(np.fft.ifft2(np.fft.fft2(rng.random((h, w))) * np.exp(-(fy**2 + fx**2) / (2 * sigma**2))))
    return (tex - tex.min()) / (tex.max() - tex.min()) * 255


def to_video(gray_frames) -> np.ndarray:
    g = np.clip(np.round(np.asarray(gray_frames)), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def box_blur(img: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        img = (np.roll(img, 1, 0) + img + np.roll(img, -1, 0)) / 3
        img = (np.roll(img, 1, 1) + img + np.roll(img, -1, 1)) / 3
    return img


def test_sharpness_drift_has_the_right_sign():
    rng = np.random.default_rng(1)
    sharp = rng.integers(0, 2, (48, 48)) * 255.0  # pixel noise: maximal Laplacian energy
    video = to_video([box_blur(sharp, t // 11) for t in range(66)])  # blurrier every 11 frames
    s = M.frame_series(video)
    d = M.drift(s["sharpness"])
    assert d["change"] < 0 and d["drift"] > 0.5 * d["first"]
    windows = M.window_means(s, M.window_bounds(66, fps=11, window_seconds=2))
    assert [w["sharpness"] for w in windows] == sorted((w["sharpness"] for w in windows), reverse=True)


def test_colour_ramp_drift_against_first_chunk():
    t = np.arange(99)
    red = 100 + 80 * t / 98
    video = np.zeros((99, 16, 16, 3), np.uint8)
    video[..., 0] = np.round(red)[:, None, None]
    video[..., 1:] = 90
    s = M.frame_series(video)
    d = M.drift(s["mean_r"])
    # first/last 15% = 15 frames: mean t 7 and 91
    assert d["change"] == pytest.approx(80 * (91 - 7) / 98, abs=0.6)
    assert M.drift(s["color_shift"])["change"] > 40
    assert np.nanmax(s["color_shift"][:33]) < 15  # measured against the first chunk's mean
    assert M.drift(s["mean_g"])["drift"] == pytest.approx(0, abs=1e-6)


def test_still_video_has_no_motion_or_flicker():
    video = to_video([smooth_texture(40, 56)] * 40)
    s = M.frame_series(video)
    assert np.nanmax(s["motion"]) == 0 and np.nanmax(s["motion_top"]) == 0
    assert np.nanmax(s["flicker"]) == 0 and np.nanmax(s["frame_diff"]) == 0
    assert np.nanmin(s["smoothness"]) == 1.0
    assert np.isnan(s["motion"][0]) and np.isnan(s["smoothness"][0]) and np.isnan(s["smoothness"][-1])


def test_global_translation_motion_magnitude():
    tex = smooth_texture(140, 140, seed=2)
    video = to_video([tex[10 + t : 74 + t, 10 + 2 * t : 74 + 2 * t] for t in range(20)])  # (1, 2) px/frame
    s = M.frame_series(video)
    assert np.nanmean(s["motion"]) == pytest.approx(np.sqrt(5), abs=0.3)
    assert np.nanmean(s["smoothness"]) > 0.9


def test_motion_is_reported_in_full_resolution_pixels():
    # 256 px wide: analysed at 128 px, so a 4 px/frame shift is 2 px there and must be scaled back
    tex = smooth_texture(180, 320, seed=3)
    video = to_video([tex[20:148, 4 * t : 4 * t + 256] for t in range(8)])
    assert np.nanmean(M.frame_series(video)["motion"]) == pytest.approx(4, abs=0.5)


def test_moving_square_motion():
    video = np.zeros((16, 64, 64, 3), np.uint8)
    for t in range(16):
        video[t, 20:36, 8 + 3 * t : 24 + 3 * t] = 255  # 16 px square, 3 px/frame
    s = M.frame_series(video)
    assert np.nanmin(s["motion"]) > 0
    assert np.nanmean(s["motion_top"]) == pytest.approx(3, abs=1.0)
    assert np.nanmean(s["motion"]) < 1  # most of the frame is still


def test_chunk_boundary_flicker_detected():
    base = smooth_texture(32, 32, seed=4)
    offset = np.where((np.arange(99) // 33) % 2 == 1, 20.0, 0.0)  # brightness jump at frames 33 and 66
    wobble = 0.5 * np.sin(np.arange(99))  # small in-chunk variation
    video = to_video([np.clip(base * 0.8 + o + w, 0, 255) for o, w in zip(offset, wobble)])
    s = M.frame_series(video)
    seams = M.chunk_boundary_stats(s["flicker"])
    assert seams["seams"] == 2
    assert seams["boundary"] > 15 and seams["ratio"] > 10
    control = M.chunk_boundary_stats(M.frame_series(to_video([base * 0.8 + w for w in wobble]))["flicker"])
    assert control["ratio"] < 3
    assert M.chunk_boundary_stats(s["frame_diff"])["ratio"] > 10


def test_windows_and_drift_helpers():
    assert M.window_bounds(600, fps=24, window_seconds=10) == [(0, 240), (240, 480), (480, 600)]
    d = M.drift(np.array([np.nan, 1.0] + [5.0] * 16 + [9.0, 9.0, 9.0]))
    assert (d["first"], d["last"], d["change"], d["drift"]) == (3.0, 9.0, 6.0, 6.0)  # NaN ignored
    means = M.window_means({"x": np.arange(10.0)}, [(0, 5), (5, 10)])
    assert [m["x"] for m in means] == [2.0, 7.0]


def test_component_areas_handmade_mask():
    m = np.zeros((8, 10), bool)
    m[1:3, 1:4] = True  # 6
    m[3, 4] = True  # diagonal neighbour only: separate under 4-connectivity
    m[5:8, 6] = True
    m[7, 2:7] = True  # an L: 3 + 4 = 7
    assert sorted(M.component_areas(m).tolist()) == [1, 6, 7]
    assert M.component_areas(np.zeros((4, 4), bool)).size == 0


def test_component_areas_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = rng.random(tuple(rng.integers(1, 30, 2))) < rng.random()
        lab, _ = ndimage.label(m)
        assert sorted(np.bincount(lab.ravel())[1:].tolist()) == sorted(M.component_areas(m).tolist())


def test_rejects_non_uint8_frames():
    with pytest.raises(ValueError, match=r"uint8 frames of shape \(T,H,W,3\)"):
        M.frame_series(np.zeros((4, 8, 8, 3), np.float32))


def test_caption_adherence_scores_a_rendered_video_against_its_caption():
    from helios.train.synthetic import SyntheticConfig, SyntheticVideo

    video = SyntheticVideo.from_index(3, SyntheticConfig(height=64, width=64))
    frames = video.frames(0, 9)
    right = M.caption_adherence(frames, video.caption)
    assert right["background_right"] == 1.0 and right["background_error"] < 5
    assert right["objects_present"] == 1.0 and right["count_match"] > 0.5
    other_bg = next(c for c in ("red", "green", "blue") if c != video.background)
    wrong = M.caption_adherence(frames, f"a {video.background} circle bouncing on a {other_bg} background")
    assert wrong["background_right"] == 0.0 and wrong["background_error"] > 100
    assert wrong["objects_present"] == 0.0  # the background colour is not a blob


def test_caption_adherence_needs_a_background():
    with pytest.raises(ValueError, match="names no background"):
        M.caption_adherence(np.zeros((1, 8, 8, 3), np.uint8), "two red circles")
