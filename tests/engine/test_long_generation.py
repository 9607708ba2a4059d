"""A long generation streams with flat memory and writes a playable mp4 of the frame count asked for."""

from __future__ import annotations

import gc
import os
import statistics
import weakref

import pytest
import torch

import helios
from helios.engine.video_io import video_info
from helpers.tiny_pipelines import save_model_folder


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for memory readings")
def test_twenty_chunks_stream_with_flat_memory(tmp_path):
    folder = tmp_path / "model"
    save_model_folder("distilled", folder, seed=5)
    pipe = helios.load_pipeline(folder)
    torch.set_num_threads(2)
    frames_asked = 20 * 33  # 660 frames -> 20 chunks, trimmed to 657 (4k+1) as the reference does
    out = tmp_path / "long.mp4"
    readings, written, handed_out = [], 0, []
    from helios.engine.video_io import VideoWriter

    stream = pipe.stream("two red circles bouncing", num_frames=frames_asked, height=64, width=64, seed=1)
    with VideoWriter(out, fps=24) as writer:
        for chunk in stream:
            writer.write(chunk.frames)
            written += chunk.frames.shape[0]
            handed_out.append(weakref.ref(chunk.frames))
            del chunk
            gc.collect()
            readings.append(rss_mb())
            # Nothing the engine handed out earlier is still held by it: memory cannot grow per chunk.
            assert sum(r() is not None for r in handed_out[:-1]) == 0
            assert not out.exists()  # appears only when complete
    assert written == 657
    assert video_info(out).frames == 657
    # RSS wobbles by tens of MB (allocator arenas); its level must not climb from early to late chunks.
    assert statistics.median(readings[-5:]) - statistics.median(readings[4:9]) < 40, readings
