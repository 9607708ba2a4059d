"""evaluate_video / evaluate_path / plot_report / eval_command end to end, plus CLIP error handling."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from helios.engine.video_io import write_video
from helios.eval.cli import eval_command
from helios.eval.clip_score import check_clip_folder
from helios.scenes import COLORS
from helios.eval.report import evaluate_path, evaluate_video, plot_report, write_json


def bouncing_video(t: int = 72, size: int = 64, color: str = "red", background: str = "blue") -> np.ndarray:
    """Two circles moving horizontally in separate bands."""
    yy, xx = np.mgrid[0:size, 0:size]
    video = np.empty((t, size, size, 3), np.uint8)
    video[:] = COLORS[background]
    for i in range(t):
        for cy, x0, v in ((16, 10, 1), (46, 50, -1)):
            x = 7 + abs((x0 - 7 + v * i) % (2 * (size - 14)) - (size - 14))
            video[i][(yy - cy) ** 2 + (xx - x) ** 2 <= 36] = COLORS[color]
    return video


CAPTION = "two red circles bouncing on a blue background"


def test_report_is_json_round_trippable():
    r = evaluate_video(bouncing_video(), caption=CAPTION, window_seconds=1, fps=24)
    text = json.dumps(r, allow_nan=False)  # NaN would not be valid JSON
    assert json.loads(text) == r
    assert r["frames"] == 72 and r["fps"] == 24 and (r["width"], r["height"]) == (64, 64)
    assert [(w["start_frame"], w["end_frame"]) for w in r["windows"]] == [(0, 24), (24, 48), (48, 72)]
    assert r["scene"]["expected_counts"] == {"red": 2}
    assert all(w["count_match"] == 1 for w in r["windows"])
    assert r["summary"]["motion"] > 0.1 and r["summary"]["smoothness"] > 0.95
    assert r["chunk_boundary"]["flicker"]["seams"] == 2
    assert len(r["per_frame"]["sharpness"]) == 72 and r["per_frame"]["motion"][0] is None


def test_palette_survives_video_compression(tmp_path):
    path = write_video(tmp_path / "shapes.mp4", bouncing_video(48), fps=24)
    r = evaluate_video(path, caption=CAPTION, window_seconds=1)
    assert r["fps"] == 24 and r["frames"] == 48
    assert r["summary"]["count_match"] == 1
    assert r["summary"]["background_error"] < 20


def test_plot_report_writes_png_atomically(tmp_path):
    r = evaluate_video(bouncing_video(40), caption=CAPTION, window_seconds=0.5, fps=24)
    png = plot_report(r, tmp_path / "r.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    write_json(r, tmp_path / "r.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temp files left


def test_evaluate_folder_with_sidecar_captions(tmp_path):
    vids = tmp_path / "vids"
    vids.mkdir()
    write_video(vids / "a.mp4", bouncing_video(30), fps=24)
    write_video(vids / "b.mp4", bouncing_video(30, color="yellow", background="black"), fps=24)
    write_video(vids / ".c.partial.mp4", bouncing_video(30), fps=24)  # in-progress writer file: skipped
    (vids / "broken.mp4").write_text("not a video")
    (vids / "captions.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": CAPTION}) + "\n")
    (vids / "b.txt").write_text("two yellow circles bouncing on a black background\n")
    out = tmp_path / "out"
    results = evaluate_path(vids, out_dir=out, window_seconds=1)
    by_name = {Path(r["source"]).name: r for r in results}
    assert set(by_name) == {"a.mp4", "b.mp4", "broken.mp4"}
    assert "not a readable video" in by_name["broken.mp4"]["error"]
    assert by_name["a.mp4"]["caption"] == CAPTION
    assert by_name["b.mp4"]["scene"]["expected_counts"] == {"yellow": 2}
    assert by_name["b.mp4"]["summary"]["count_match"] == 1
    for stem in ("a", "b"):
        assert json.loads((out / f"{stem}.eval.json").read_text())["frames"] == 30
        assert (out / f"{stem}.eval.png").stat().st_size > 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert len(summary["videos"]) == 3


def test_eval_command_exit_codes_and_table(tmp_path, capsys):
    write_video(tmp_path / "v.mp4", bouncing_video(36), fps=24)
    assert eval_command(str(tmp_path / "v.mp4"), caption=CAPTION, window_seconds=1) == 0
    printed = capsys.readouterr().out
    assert "v.mp4: 36 frames" in printed and "drift" in printed and "count_ok" in printed
    assert (tmp_path / "v.eval.json").exists() and (tmp_path / "v.eval.png").exists()

    assert eval_command(str(tmp_path / "missing.mp4")) == 2
    assert "missing.mp4 does not exist" in capsys.readouterr().err

    (tmp_path / "bad.mp4").write_text("nope")
    assert eval_command(str(tmp_path)) == 1
    assert "1 of 2 videos could not be evaluated" in capsys.readouterr().err


def test_missing_clip_model_is_a_clear_error(tmp_path, capsys):
    write_video(tmp_path / "v.mp4", bouncing_video(8), fps=24)
    code = eval_command(str(tmp_path / "v.mp4"), caption=CAPTION, clip_model=str(tmp_path / "no_clip"))
    err = capsys.readouterr().err
    assert code == 2
    assert "CLIP model folder" in err and "does not exist" in err and "config.json" in err
    assert "Nothing is downloaded" in err
    assert not (tmp_path / "v.eval.json").exists()  # failed before any work


def test_non_clip_folder_is_rejected(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="holds a 'bert' model, not CLIP"):
        check_clip_folder(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        check_clip_folder(tmp_path / "empty")


@pytest.mark.slow
def test_clip_similarity_with_tiny_local_model(tmp_path):
    """A randomly initialised tiny CLIP saved locally: exercises loading and scoring, offline."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    d = tmp_path / "tinyclip"
    d.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(d)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **tiny),
        vision_config=dict(image_size=32, patch_size=8, **tiny), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(d)

    r = evaluate_video(bouncing_video(24), caption=CAPTION, window_seconds=0.5, fps=24, clip_model=d)
    sims = [w["clip_similarity"] for w in r["windows"]]
    assert len(sims) == 2 and all(s is not None and -1 <= s <= 1 for s in sims)
    assert math.isfinite(r["summary"]["clip_similarity"])
    with pytest.raises(ValueError, match="needs a caption"):
        evaluate_video(bouncing_video(4), clip_model=d)
