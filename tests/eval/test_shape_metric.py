"""Shape right: circle / square / triangle classified from an object's colour mask, checked on the
synthetic renderer's ground truth and on hand-made masks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from helios.eval import metrics as M
from helios.train.synthetic import ObjectTrack, SyntheticConfig, SyntheticVideo

ACCURACY = 0.97  # on isolated rendered objects; every one of 800 was right when the metric was written


def isolated_masks(cfg: SyntheticConfig, videos: int):
    """(shape, mask) of every object that touches no other object, at one random frame per video."""
    out = []
    for i in range(videos):
        v = SyntheticVideo.from_index(i, cfg)
        masks = v.object_masks([int(np.random.default_rng(i).integers(0, cfg.num_frames))])[0]
        for k, o in enumerate(v.objects):
            grown = masks[k].copy()  # the mask and its 4-neighbours
            grown[1:] |= masks[k][:-1]
            grown[:-1] |= masks[k][1:]
            grown[:, 1:] |= masks[k][:, :-1]
            grown[:, :-1] |= masks[k][:, 1:]
            if not (grown & np.delete(masks, k, axis=0).any(axis=0)).any():
                out.append((o.shape, masks[k]))
    return out


@pytest.mark.parametrize("size_range", [(0.07, 0.14), (0.10, 0.18)], ids=["default-sizes", "tiny-model-sizes"])
def test_rendered_objects_are_classified_right(size_range):
    cfg = SyntheticConfig(height=64, width=64, grammar="wide", size_range=size_range, seed=5)
    objects = isolated_masks(cfg, 150)
    assert min(Counter(s for s, _ in objects).values()) >= 40  # every shape well represented
    right = [M.classify_shape(mask) == shape for shape, mask in objects]
    assert np.mean(right) >= ACCURACY, Counter((s, M.classify_shape(m)) for s, m in objects)


def handmade(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


def test_handmade_masks():
    square = handmade(["#####"] * 5)
    circle = handmade([".###.", "#####", "#####", "#####", ".###."])
    triangle = handmade(["...#...", "..###..", "..###..", ".#####.", ".#####.", "#######", "#######"])
    assert M.classify_shape(square) == "square"
    assert M.classify_shape(circle) == "circle"
    assert M.classify_shape(triangle) == "triangle"
    # a square with a ragged edge and a missing corner is still a square
    rough = np.ones((9, 9), bool)
    rough[0, 0] = rough[4, 8] = rough[8, 3] = False
    assert M.classify_shape(np.pad(rough, 3)) == "square"
    # a big disc away from the centre of a frame
    ys, xs = np.mgrid[0:64, 0:64]
    assert M.classify_shape((xs - 50) ** 2 + (ys - 12) ** 2 <= 49) == "circle"
    # a triangle pointing up, drawn by hand from its corners rather than by the renderer
    tri = (ys >= 20) & (ys <= 34) & (np.abs(xs - 30) * 2 <= ys - 20)
    assert M.classify_shape(tri) == "triangle"
    scores = M.shape_scores(square)
    assert scores["square"] == pytest.approx(1.0)  # the ideal square of 25 pixels is this one
    assert max(scores["circle"], scores["triangle"]) < scores["square"] - 0.05
    with pytest.raises(ValueError, match="at least one pixel"):
        M.classify_shape(np.zeros((5, 5), bool))


def test_component_labels_separate_the_components():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((20, 24)) < 0.45
        labels, n = M.component_labels(m)
        ref, n_ref = ndimage.label(m)
        assert n == n_ref and ((labels > 0) == m).all()
        # the same partition: each of ours is exactly one of scipy's
        for k in range(1, n + 1):
            assert len(np.unique(ref[labels == k])) == 1
        assert sorted(np.bincount(labels.ravel())[1:]) == sorted(M.component_areas(m))


def frame_with(shape: str) -> np.ndarray:
    v = SyntheticVideo(index=0, cfg=SyntheticConfig(height=64, width=64), background="blue",
                       objects=[ObjectTrack(shape, "red", 7, 30, 30, 0.4, 0.2)])
    return v.frames(10, 1)[0]


@pytest.mark.parametrize("drawn", ["circle", "square", "triangle"])
def test_adherence_frame_scores_the_captioned_shape(drawn):
    frame = frame_with(drawn)
    for said in ("circle", "square", "triangle"):
        row = M.adherence_frame(frame, M.caption_scene(f"a red {said} on a blue background"))
        assert row["shape_objects"] == 1 and row["shape_right"] == float(said == drawn)
        assert row["background_right"] == 1 and row["colours_present"] == row["colours"] == 1
        assert row["count_match"] == 1


def test_adherence_summary_counts_objects_not_frames():
    rows = [{"background_error": 0.0, "background_right": 1.0, "colours": 2.0, "colours_present": 1.0,
             "count_match": 0.0, "shape_objects": 3.0, "shape_right": 3.0},
            {"background_error": 10.0, "background_right": 0.0, "colours": 2.0, "colours_present": 2.0,
             "count_match": float("nan"), "shape_objects": 1.0, "shape_right": 0.0}]
    s = M.adherence_summary(rows)
    assert s == {"background_error": 5.0, "background_right": 0.5, "objects_present": 0.75, "count_match": 0.0,
                 "shape_right": 0.75}
    assert np.isnan(M.adherence_summary([{**rows[0], "shape_objects": 0.0, "shape_right": 0.0}])["shape_right"])


def test_caption_adherence_of_rendered_wide_videos_is_right():
    cfg = SyntheticConfig(height=64, width=64, grammar="wide", size_range=(0.1, 0.18), seed=21)
    for i in range(4):
        v = SyntheticVideo.from_index(i, cfg)
        s = M.caption_adherence(v.frames(0, 24, stride=10), v.caption)
        assert s["background_right"] == 1.0 and s["objects_present"] == 1.0
        assert s["shape_right"] >= 0.8, (v.caption, s)  # only merged, overlapping objects can be wrong
