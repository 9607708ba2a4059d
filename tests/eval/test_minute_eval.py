"""benchmarks/minute_eval.py without a model: a stand-in pipeline streams rendered synthetic videos, which
must score right in every window, and the per-model summary and strips come out as documented."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from helios.train.synthetic import SyntheticConfig, SyntheticVideo
from helpers.benchmarks import load_benchmark as load_script


def load_benchmark():
    return load_script("minute_eval")


class RenderedPipeline:
    """Streams the ground-truth rendering of the synthetic video whose caption it is asked for, in
    33-frame chunks (whole chunks, as the real pipeline: the last runs past num_frames)."""

    def __init__(self, videos: list[SyntheticVideo]):
        self.by_caption = {v.caption: v for v in videos}

    def stream(self, caption: str, num_frames: int, seed: int):
        video = self.by_caption[caption]
        for start in range(0, num_frames, 33):
            yield SimpleNamespace(frames=torch.from_numpy(video.frames(start + 7 * seed, 33)))


def test_rendered_videos_score_right_in_every_window(tmp_path):
    bench = load_benchmark()
    cfg = SyntheticConfig(height=64, width=64, grammar="wide", size_range=(0.1, 0.18), seed=3)
    videos = [v for v in (SyntheticVideo.from_index(i, cfg) for i in range(40)) if len(v.objects) == 1][:2]
    pipe = RenderedPipeline(videos)
    fps, seconds = 8, 6.0  # 48 frames: two chunks, the second cut; windows of 2 s
    results = []
    for seed in (0, 1):
        for v in videos:
            result, strip = bench.evaluate_video(pipe, v.caption, seed, seconds, fps, strip_seconds=1.5,
                                                 window_seconds=2.0)
            assert result["frames"] == 48 and len(result["windows"]) == 3 and len(strip) == 4
            for w in result["windows"]:  # one object never overlaps another: everything right
                assert [w[k] for k in bench.METRICS] == [1.0, 1.0, 1.0, 1.0], (v.caption, w)
            assert result["decline"] == {k: 0.0 for k in bench.METRICS}
            results.append(result)
    s = bench.summarise(results)
    assert s["videos"] == 4 and s["window_starts_s"] == [0.0, 2.0, 4.0]
    assert s["whole"] == {k: 1.0 for k in bench.METRICS} and all(s["meets_targets"].values())
    assert s["decline_seed_spread"] == {k: 0.0 for k in bench.METRICS}
    bench.write_strip(strip, 16, tmp_path / "strip.png")
    from PIL import Image

    assert Image.open(tmp_path / "strip.png").size == (4 * 17, 16)


def test_decline_and_seed_spread_follow_the_windows():
    bench = load_benchmark()

    def video(seed: int, first: float, last: float) -> dict:
        windows = [{k: first for k in bench.METRICS}, {k: last for k in bench.METRICS}]
        for i, w in enumerate(windows):
            w["start_s"] = 10.0 * i
        return {"seed": seed, "windows": windows, "decline": bench.decline(windows),
                "whole": {k: (first + last) / 2 for k in bench.METRICS}, "generation_fps": 10.0}

    s = bench.summarise([video(0, 1.0, 0.5), video(0, 0.8, 0.8), video(1, 0.9, 0.9), video(1, 1.0, 1.0)])
    assert s["decline"]["count_match"] == pytest.approx(-0.125)
    assert s["decline_by_seed"]["count_match"] == {"0": pytest.approx(-0.25), "1": 0.0}
    assert s["decline_seed_spread"]["count_match"] == pytest.approx(0.25)
    assert s["per_window"]["shape_right"] == [pytest.approx(0.925), pytest.approx(0.8)]
    nan_windows = [{k: math.nan for k in bench.METRICS}, {k: 1.0 for k in bench.METRICS}]
    assert all(math.isnan(x) for x in bench.decline(nan_windows).values())


def test_model_folders_are_checked_before_any_work(tmp_path):
    bench = load_benchmark()
    with pytest.raises(SystemExit, match="not a model folder"):
        bench.parse_models([f"plain={tmp_path}"])
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match="given twice"):
        bench.parse_models([f"a={tmp_path}", f"a={tmp_path}"])
    assert bench.parse_models([f"a={tmp_path}", str(tmp_path)]) == {"a": tmp_path, tmp_path.name: tmp_path}
