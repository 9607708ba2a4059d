"""Caption parsing and palette fidelity on drawn bouncing-shape videos."""

import itertools

import numpy as np
import pytest

from helios.eval.metrics import palette_fidelity
from helios.scenes import COLORS, ObjectSpec, Scene, describe_scene, parse_caption


def draw_circles(t: int, h: int, w: int, circles, color: str, background: str) -> np.ndarray:
    """circles: [(cy, cx, r, vy, vx)]; positions bounce off the walls."""
    yy, xx = np.mgrid[0:h, 0:w]
    video = np.empty((t, h, w, 3), np.uint8)
    video[:] = COLORS[background]
    for i in range(t):
        for cy, cx, r, vy, vx in circles:
            y = r + abs((cy - r + vy * i) % (2 * (h - 2 * r)) - (h - 2 * r))  # triangle wave: bounce
            x = r + abs((cx - r + vx * i) % (2 * (w - 2 * r)) - (w - 2 * r))
            video[i][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = COLORS[color]
    return video


# kept in separate horizontal bands so they never touch (touching circles count as one)
TWO_RED = dict(circles=[(20, 20, 8, 0, 3), (70, 60, 8, 0, -2)], color="red", background="blue")


def test_parse_caption_counts_colours_shapes():
    s = parse_caption("two red circles bouncing on a blue background")
    assert s.objects == [ObjectSpec(2, "red", "circle")] and s.background == "blue"
    s = parse_caption("A green square and 3 Yellow circles move over a black background.")
    assert s.objects == [ObjectSpec(1, "green", "square"), ObjectSpec(3, "yellow", "circle")]
    assert s.background == "black"
    assert parse_caption("five magenta squares").objects == [ObjectSpec(5, "magenta", "square")]
    assert parse_caption("orange circles on purple background").objects == [ObjectSpec(None, "orange", "circle")]
    assert parse_caption("red circle").objects == [ObjectSpec(1, "red", "circle")]
    s = parse_caption("circles bouncing on a white background")  # no colour for the circles
    assert s.objects == [] and s.background == "white"
    assert parse_caption("a cat in a garden") == Scene()


def test_describe_scene_round_trips():
    scene = Scene([ObjectSpec(2, "red", "circle"), ObjectSpec(1, "cyan", "square")], "black")
    text = describe_scene(scene)
    assert text == "two red circles and a cyan square bouncing on a black background"
    assert parse_caption(text) == scene


def test_palette_colours_are_well_separated():
    assert set(COLORS) == {"red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple"}
    d = min(np.linalg.norm(np.subtract(COLORS[a], COLORS[b])) for a, b in itertools.combinations(COLORS, 2))
    assert d >= 120  # the fidelity tolerance (60) relies on this


def test_palette_fidelity_two_red_circles():
    video = draw_circles(48, 96, 96, **TWO_RED)
    r = palette_fidelity(video, "two red circles bouncing on a blue background", fps=24, window_seconds=1)
    assert r["scene"]["expected_counts"] == {"red": 2}
    assert len(r["windows"]) == 2
    for w in r["windows"]:
        assert w["red_count"] == 2 and w["count_match"] == 1
        assert w["background_error"] < 1 and w["background_fraction"] > 0.9
        assert w["red_fraction"] == pytest.approx(2 * np.pi * 64 / 96**2, rel=0.15)
        assert w["background_jitter"] == 0
    assert r["drift"]["red_count"]["drift"] == 0


def test_palette_fidelity_notices_wrong_caption():
    video = draw_circles(24, 96, 96, **TWO_RED)
    r = palette_fidelity(video, "three red circles on a green background", fps=24)
    w = r["windows"][0]
    assert w["count_match"] == 0 and w["red_count"] == 2
    assert w["background_error"] > 200 and w["background_fraction"] == 0
    r = palette_fidelity(video, "two yellow circles on a blue background", fps=24)
    assert r["windows"][0]["yellow_count"] == 0 and r["windows"][0]["yellow_fraction"] == 0


def test_palette_fidelity_detects_background_drift():
    video = draw_circles(48, 64, 64, circles=[(20, 20, 6, 1, 1)], color="white", background="black")
    video[24:] += np.uint8(40)  # background (and everything) brightens halfway
    r = palette_fidelity(video, "a white circle on a black background", fps=24, window_seconds=1)
    assert r["windows"][0]["background_error"] < 1 and r["windows"][1]["background_error"] > 60
    assert r["drift"]["background_shift"]["change"] > 60


def test_palette_fidelity_needs_colours_in_caption():
    with pytest.raises(ValueError, match="names no known colours"):
        palette_fidelity(np.zeros((2, 8, 8, 3), np.uint8), "a cat in a garden")
