"""The overlapped decode of `HeliosVideoPipeline.stream` on CUDA (run on a GPU; skipped elsewhere).

With overlap, chunk k's VAE decode and copy to the host run on a side stream while chunk k+1 is
denoised. The frames must be bit for bit those of the sequential loop, stopping early must leave
nothing queued that writes into freed memory, and inside the loop nothing may wait for the device
but the one wait per handed-over chunk.
"""

from __future__ import annotations

import pytest
import torch

import helios
from helios.cli import default_model
from helios.engine.prompts import LivePrompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = "two red circles bouncing"
FRAMES = 99  # three chunks


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def pipe():
    # Eager: the tests are about ordering, not speed; each call says whether to overlap.
    return helios.load_pipeline(default_model(), dtype=torch.bfloat16, device="cuda", optimize=False)


def run(pipe, prompt=PROMPT, **kw):
    """(chunks, events): ("step", chunk, stage, i) and ("chunk", index) in the order they happened."""
    events, chunks = [], []
    for c in pipe.stream(prompt, num_frames=FRAMES, seed=7, on_step=lambda *a: events.append(("step", *a)), **kw):
        events.append(("chunk", c.index))
        chunks.append(c)
    return chunks, events


def handed_over_before_next_chunk_steps(events) -> bool:
    return events.index(("chunk", 0)) < events.index(("step", 1, 0, 0))


def test_overlap_gives_the_same_frames_bit_for_bit(pipe):
    seq, seq_events = run(pipe, overlap_decode=False)
    ovl, ovl_events = run(pipe, overlap_decode=True)
    assert [(c.index, c.first_frame, c.frames.shape) for c in ovl] == \
        [(c.index, c.first_frame, c.frames.shape) for c in seq]
    assert sum(c.frames.shape[0] for c in ovl) == 97
    for a, b in zip(ovl, seq):
        assert a.frames.device.type == "cpu" and a.frames.dtype == torch.uint8
        assert torch.equal(a.frames, b.frames), a.index
        for t in (a.seconds, a.denoise_seconds, a.decode_seconds):
            assert 0 < t < 60
    assert [e for e in ovl_events if e[0] == "step"] == [e for e in seq_events if e[0] == "step"]
    # What moves: with overlap chunk 0 is handed over only once chunk 1's steps are queued.
    assert handed_over_before_next_chunk_steps(seq_events)
    assert not handed_over_before_next_chunk_steps(ovl_events)


def test_an_inline_decode_queues_ahead_on_one_stream_with_the_same_frames(pipe):
    # optimize(decode_beside=False): the decode between the chunks' denoising on one stream, the host a chunk ahead
    seq, _ = run(pipe, overlap_decode=False)
    pipe.decode_beside = False
    try:
        streams_before = pipe._decode_stream
        inline, events = run(pipe, overlap_decode=True)
        assert pipe._decode_stream is streams_before  # no side stream made or used for it
        stream = pipe.stream(PROMPT, num_frames=5 * 33, seed=7, overlap_decode=True)
        next(stream)
        torch.cuda.set_sync_debug_mode("error")
        try:
            rest = list(stream)  # still no host sync inside the loop
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        pipe.decode_beside = True
    assert [c.index for c in rest] == [1, 2, 3, 4]
    assert not handed_over_before_next_chunk_steps(events)  # the host queued chunk 1 before waiting for chunk 0
    for a, b in zip(inline, seq, strict=True):
        assert torch.equal(a.frames, b.frames), a.index
    assert all(0 < c.decode_seconds < 60 and 0 < c.denoise_seconds < 60 for c in inline)  # each timed by its marks


def test_optimize_turns_overlap_on_except_for_a_live_prompt(pipe):
    pipe.overlap_decode = True  # what optimize() sets, without compiling
    try:
        _, plain = run(pipe)
        _, live = run(pipe, LivePrompt(PROMPT))
        _, live_asked = run(pipe, LivePrompt(PROMPT), overlap_decode=True)
    finally:
        pipe.overlap_decode = False
    assert not handed_over_before_next_chunk_steps(plain)
    assert handed_over_before_next_chunk_steps(live)  # the server's steer and stop stay one chunk sooner
    assert not handed_over_before_next_chunk_steps(live_asked)


def test_closing_after_the_first_chunk_is_safe(pipe):
    reference, _ = run(pipe, overlap_decode=False)
    stream = pipe.stream(PROMPT, num_frames=FRAMES, seed=7, overlap_decode=True)
    first = next(stream)  # chunk 1 is queued (denoise and decode) at this point
    stream.close()
    assert pipe._decode_stream.query()  # closing waited for the queued copy
    # Memory freed by the closed stream is handed out again; nothing of it may still be written to.
    scribble = [torch.full((64 << 20,), 7, dtype=torch.uint8, device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    assert all(bool((s == 7).all()) for s in scribble)
    del scribble
    assert torch.equal(first.frames, reference[0].frames)
    again, _ = run(pipe, overlap_decode=True)
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(again, reference))


def test_an_exception_in_on_step_ends_the_stream_with_nothing_left_queued(pipe):
    def stop_in_chunk_1(k, stage, i):
        if k == 1:
            raise Stop

    got = []
    with pytest.raises(Stop):
        for c in pipe.stream(PROMPT, num_frames=FRAMES, seed=7, overlap_decode=True, on_step=stop_in_chunk_1):
            got.append(c.index)
    assert pipe._decode_stream.query()  # chunk 0's decode, queued when the exception came, has landed
    assert got == []  # documented: under overlap chunk 0 goes out after chunk 1's steps are queued


def test_no_host_sync_inside_the_overlapped_loop(pipe):
    stream = pipe.stream(PROMPT, num_frames=5 * 33, seed=7, overlap_decode=True)
    next(stream)  # the setup and the first uses (prompt encoding, cached factors) are behind us
    torch.cuda.set_sync_debug_mode("error")  # stream/device syncs and blocking copies raise
    try:
        rest = list(stream)  # event waits (one per chunk) are not syncs of a stream
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [c.index for c in rest] == [1, 2, 3, 4]


def test_non_blocking_noise_copies_give_the_same_draws():
    from helios.sampling.pyramid import initial_noise, sample_block_noise

    def draws(non_blocking):
        g = torch.Generator().manual_seed(3)
        return (initial_noise((1, 16, 9, 12, 20), g, "cuda", non_blocking=non_blocking),
                sample_block_noise((1, 16, 9, 24, 40), 0.25, generator=g, device="cuda", non_blocking=non_blocking))

    for a, b in zip(draws(False), draws(True)):
        assert a.is_cuda and torch.equal(a, b)


def test_an_early_first_frame_under_overlap_gives_the_same_frames(pipe):
    # first_frame_early (--fast-start): chunk 0's frame 0 is copied out on its own event, before the rest.
    seq, _ = run(pipe, overlap_decode=False)
    split, events = run(pipe, overlap_decode=True, first_frame_early=True)
    # frame 0 goes out before chunk 1 is queued (its decode alone on the GPU), the rest of chunk 0 after
    first, rest = [i for i, e in enumerate(events) if e == ("chunk", 0)]
    assert first < events.index(("step", 1, 0, 0)) < rest
    # chunk 0 in two parts (frame 0, then its other 32), the later chunks as the sequential loop gave them
    expected = [(0, 0, 1, False), (0, 1, 32, True)]
    expected += [(c.index, c.first_frame, c.frames.shape[0], True) for c in seq[1:]]
    assert seq[0].frames.shape[0] == 33 and len(seq) == 3
    assert [(c.index, c.first_frame, c.frames.shape[0], c.complete) for c in split] == expected
    assert torch.equal(torch.cat([c.frames for c in split]), torch.cat([c.frames for c in seq]))
    assert all(c.decode_seconds > 0 for c in split[:2])  # each part timed by its own marks
