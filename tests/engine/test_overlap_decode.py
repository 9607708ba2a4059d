"""The overlapped decode (`optimize(overlap_decode=...)`, `stream(overlap_decode=...)`) off CUDA: the
option is accepted and the chunks run one after the other, as without it. The overlap itself is
checked on the GPU in tests/gpu/test_overlap_decode_gpu.py."""

from __future__ import annotations

import torch

import helios
from helios.cli import default_model


def run(pipe, **kw):
    steps = []
    chunks = [(c.index, c.first_frame, c.frames, c.seconds, c.denoise_seconds, c.decode_seconds)
              for c in pipe.stream("two red circles bouncing", num_frames=33, seed=4,
                                   on_step=lambda *a: steps.append(a), **kw)]
    return chunks, steps


def test_overlap_decode_is_accepted_and_falls_back_on_the_cpu():
    pipe = helios.load_pipeline(default_model())
    assert pipe.overlap_decode is False  # only optimize() turns it on
    assert pipe.optimize(compile=False, fuse=False).overlap_decode is True
    on, steps_on = run(pipe)  # the optimized default, overlap on: ignored off CUDA
    off, steps_off = run(pipe, overlap_decode=False)
    assert [c[:2] for c in on] == [c[:2] for c in off] == [(0, 0)]  # longer streams: tests/engine, sequential
    for a, b in zip(on, off):
        assert a[2].dtype == torch.uint8 and a[2].shape[1:] == (64, 64, 3)
        assert torch.equal(a[2], b[2])
        assert all(t > 0 for t in a[3:])  # wall-clock seconds, sampling and decode
    assert on[0][2].shape[0] == 33
    assert steps_on == steps_off and steps_on[0] == (0, 0, 0)
    assert pipe.optimize(compile=False, fuse=False, overlap_decode=False).overlap_decode is False


def test_the_first_frame_can_be_handed_over_before_the_rest_of_its_chunk():
    # stream(first_frame_early=True) (--fast-start): chunk 0's frame 0 comes alone, then its other frames;
    # together the same frames as one hand-over, and only chunk 0 is split.
    pipe = helios.load_pipeline(default_model())
    whole = list(pipe.stream("two red circles bouncing", num_frames=66, seed=4, steps=2))
    split = list(pipe.stream("two red circles bouncing", num_frames=66, seed=4, steps=2, first_frame_early=True))
    assert [(c.index, c.first_frame, c.frames.shape[0], c.complete) for c in whole] == [(0, 0, 33, True),
                                                                                        (1, 33, 32, True)]
    assert [(c.index, c.first_frame, c.frames.shape[0], c.complete) for c in split] == [
        (0, 0, 1, False), (0, 1, 32, True), (1, 33, 32, True)]
    assert torch.equal(torch.cat([c.frames for c in whole]), torch.cat([c.frames for c in split]))
    assert all(c.decode_seconds > 0 and c.denoise_seconds > 0 for c in split)
    assert split[0].denoise_seconds == split[1].denoise_seconds  # one chunk's sampling, told twice


def test_decode_seconds_time_the_decode():
    # The hand-over times the VAE decode between its marks: a decode made slower by 0.2 s must show it.
    import time

    pipe = helios.load_pipeline(default_model())
    decode = pipe.codec.decode

    def slow(latents):
        time.sleep(0.2)
        return decode(latents)

    pipe.codec.decode = slow
    try:
        (chunk,) = pipe.stream("two red circles bouncing", num_frames=33, seed=4, steps=1)
    finally:
        del pipe.codec.decode
    assert chunk.decode_seconds >= 0.2
