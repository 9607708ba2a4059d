"""Procedural bouncing-shapes videos: determinism, caption/pixel agreement, objects stay in frame."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from helios.scenes import COLORS, parse_caption
from helios.train.synthetic import (
    SyntheticConfig,
    collate_samples,
    SyntheticVideo,
    SyntheticVideoDataset,
    export_synthetic_videos,
    from_model_tensor,
    to_model_tensor,
)
from helios.train.video_data import decode_video, read_captions

CFG = SyntheticConfig(height=64, width=64, num_frames=24 * 60 * 10, seed=7)  # 10-minute videos


def components(mask: np.ndarray) -> int:
    """4-connected components of a boolean image."""
    seen = np.zeros_like(mask)
    H, W = mask.shape
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        q = deque([(y, x)])
        seen[y, x] = True
        while q:
            cy, cx = q.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
    return n


def colour_mask(frame: np.ndarray, name: str) -> np.ndarray:
    return np.all(frame == np.asarray(COLORS[name], dtype=np.uint8), axis=-1)


def test_deterministic_per_index_and_seed():
    a = SyntheticVideo.from_index(5, CFG)
    b = SyntheticVideo.from_index(5, CFG)
    assert a.caption == b.caption and a.metadata == b.metadata
    np.testing.assert_array_equal(a.frames(1000, 8), b.frames(1000, 8))
    # random access equals sequential rendering
    np.testing.assert_array_equal(a.frames(0, 20)[13], a.frames(13, 1)[0])
    others = [SyntheticVideo.from_index(i, CFG).caption for i in range(6, 12)]
    other_seed = SyntheticVideo.from_index(5, SyntheticConfig(height=64, width=64, seed=8))
    assert a.caption not in others or not np.array_equal(a.frames(0, 1), other_seed.frames(0, 1))


@pytest.mark.parametrize("index", range(12))
def test_caption_matches_pixels(index):
    v = SyntheticVideo.from_index(index, CFG)
    scene = parse_caption(v.caption)
    meta = v.metadata
    assert scene.background == v.background == meta["background"]
    assert sum(o.count for o in scene.objects) == meta["count"] == len(v.objects)
    assert CFG.min_objects <= meta["count"] <= CFG.max_objects
    named = {o.color for o in scene.objects}
    assert v.background not in named
    f0 = v.frames(0, 1)[0]
    # only palette colours: the background and the named object colours
    uniq = {tuple(c) for c in f0.reshape(-1, 3).tolist()}
    assert uniq <= {COLORS[v.background]} | {COLORS[c] for c in named}
    # the background is the most common colour
    counts = {c: int(colour_mask(f0, c).sum()) for c in named | {v.background}}
    assert max(counts, key=counts.get) == v.background
    # per colour, the number of objects (no overlap at frame 0) equals the caption's count
    for colour in named:
        want = sum(o.count for o in scene.objects if o.color == colour)
        assert components(colour_mask(f0, colour)) == want, (v.caption, colour)
    # every named colour is present later in the video too
    far = v.frames(123_457, 1)[0]
    for colour in named:
        assert colour_mask(far, colour).any()


def test_objects_stay_in_frame_and_bounce_over_long_videos():
    for index in range(20):
        v = SyntheticVideo.from_index(index, SyntheticConfig(height=48, width=80, seed=index))
        t = np.arange(0, 24 * 3600, 7)  # one hour at 24 fps
        c = v.centers(t)
        for i, o in enumerate(v.objects):
            assert c[:, i, 0].min() >= o.radius - 1e-9 and c[:, i, 0].max() <= 80 - 1 - o.radius + 1e-9
            assert c[:, i, 1].min() >= o.radius - 1e-9 and c[:, i, 1].max() <= 48 - 1 - o.radius + 1e-9
            vx = np.diff(c[:, i, 0])
            assert (vx > 0).any() and (vx < 0).any()  # it bounced
        # full object footprint inside the frame far into the video
        masks = v.object_masks([24 * 3600 * 5 + 11])[0]  # 5 hours in
        for i, o in enumerate(v.objects):
            footprint = masks[i].sum()
            assert footprint >= (np.pi if o.shape == "circle" else 4) * o.radius**2 * 0.75


def test_dataset_clips_and_tensor_formats():
    ds = SyntheticVideoDataset(CFG, num_videos=4, clip_frames=33)
    it1, it2 = ds[1], ds[1]
    assert it1["start_frame"] == it2["start_frame"]
    torch.testing.assert_close(it1["video"], it2["video"])
    x = it1["video"]
    assert x.shape == (3, 33, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    starts = set()
    for e in range(4):
        ds.set_epoch(e)
        starts.add(ds[1]["start_frame"])
    assert len(starts) > 1
    u8 = SyntheticVideoDataset(CFG, num_videos=2, clip_frames=9, output="uint8")[0]["video"]
    assert u8.shape == (9, 64, 64, 3) and u8.dtype == torch.uint8
    np.testing.assert_array_equal(from_model_tensor(to_model_tensor(u8.numpy())), u8.numpy())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_samples)))
    assert batch["video"].shape == (3, 3, 33, 64, 64) and len(batch["caption"]) == 3
    assert batch["index"].tolist() == [0, 1, 2] and len(batch["metadata"]) == 3
    big = SyntheticVideo.from_index(0, SyntheticConfig(height=384, width=640)).clip(10_000, 2)
    assert big.shape == (3, 2, 384, 640)


def test_export_mp4_roundtrip(tmp_path):
    cfg = SyntheticConfig(height=64, width=96, num_frames=12, seed=3)
    csv_path = export_synthetic_videos(tmp_path, 2, cfg)
    rows = read_captions(csv_path)
    assert [r.caption for r in rows] == [SyntheticVideo.from_index(i, cfg).caption for i in range(2)]
    x = decode_video(tmp_path / rows[0].path, 12)
    ref = SyntheticVideo.from_index(0, cfg).frames(0, 12)
    err = np.abs(from_model_tensor(x).astype(int) - ref.astype(int))
    assert np.median(err) <= 2  # lossy but faithful
