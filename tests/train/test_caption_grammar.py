"""The wide caption grammar of the synthetic data: every wording parses into its scene, triangles render,
and the classic grammar (the bundled model's data) and its tokenization stay as they were."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from helios.scenes import (COLORS, WIDE_FORMS, CaptionForm, ObjectSpec, Scene, caption_vocabulary, describe_scene,
                           parse_caption)
from helios.train.synthetic import ObjectTrack, SyntheticConfig, SyntheticVideo

WIDE = SyntheticConfig(height=64, width=64, grammar="wide", seed=11)


def scene_of(video: SyntheticVideo) -> tuple[str, set[tuple[int, str, str]]]:
    return video.background, set(video.groups)


def parsed(caption: str) -> tuple[str | None, set[tuple[int | None, str, str]]]:
    scene = parse_caption(caption)
    return scene.background, {(o.count, o.color, o.shape) for o in scene.objects}


@pytest.mark.parametrize("form", WIDE_FORMS, ids=lambda f: f"{f.order}-{f.place}-{f.motion}")
def test_every_wide_form_parses_into_its_scene(form):
    scenes = [Scene([ObjectSpec(1, "red", "triangle")], "blue"),
              Scene([ObjectSpec(2, "green", "circle"), ObjectSpec(1, "white", "square")], "black"),
              Scene([ObjectSpec(3, "orange", "triangle"), ObjectSpec(2, "cyan", "triangle")], "purple")]
    for scene in scenes:
        caption = describe_scene(scene, form=form)
        got = parse_caption(caption)
        assert got.background == scene.background and got.objects == scene.objects, caption
        if form.motion is None:
            assert not any(m in caption for m in ("moving", "floating", "drifting", "bouncing")), caption


def test_wide_videos_use_every_form_and_shape_and_say_what_they_draw():
    videos = [SyntheticVideo.from_index(i, WIDE) for i in range(400)]
    forms = Counter(v.form for v in videos)
    assert set(forms) == set(WIDE_FORMS)
    assert Counter(o.shape for v in videos for o in v.objects).keys() == {"circle", "square", "triangle"}
    for v in videos:
        assert parsed(v.caption) == scene_of(v), v.caption
    # both orders occur: the background first and the objects first
    assert any(v.caption.startswith(("on a", "over a", "a " + v.background + " background")) for v in videos)
    assert any(v.caption.endswith(" background") for v in videos)


def test_wide_captions_are_deterministic_per_seed_and_index():
    a = [SyntheticVideo.from_index(i, WIDE).caption for i in range(30)]
    assert a == [SyntheticVideo.from_index(i, WIDE).caption for i in range(30)]
    other = SyntheticConfig(height=64, width=64, grammar="wide", seed=12)
    assert a != [SyntheticVideo.from_index(i, other).caption for i in range(30)]


def test_the_wording_never_changes_the_scene():
    # Same shapes, other grammar: the same scene and pixels, only the caption's wording differs.
    classic = SyntheticConfig(height=64, width=64, seed=11, shapes=("circle", "square", "triangle"))
    for i in range(20):
        a, b = SyntheticVideo.from_index(i, WIDE), SyntheticVideo.from_index(i, classic)
        assert scene_of(a) == scene_of(b)
        np.testing.assert_array_equal(a.frames(100, 3), b.frames(100, 3))
        assert b.caption == describe_scene(b.scene)  # classic wording


def test_classic_grammar_is_unchanged():
    # Captions of the default data (the bundled model's), as the generator wrote them before the wide grammar.
    assert [SyntheticVideo.from_index(i, SyntheticConfig()).caption for i in range(3)] == [
        "a purple circle and a blue circle bouncing on a orange background",
        "two orange squares and a blue square bouncing on a magenta background",
        "a blue circle bouncing on a purple background"]
    for i in range(50):
        v = SyntheticVideo.from_index(i, SyntheticConfig(seed=4))
        assert {o.shape for o in v.objects} <= {"circle", "square"}
        objects = " and ".join(f"{'a' if c == 1 else ['', '', 'two', 'three'][c]} {col} {sh}{'' if c == 1 else 's'}"
                               for c, col, sh in v.groups)
        assert v.caption == f"{objects} bouncing on a {v.background} background"


def test_circles_and_squares_render_as_before():
    # The old renderer's rules, written out: a disc of the radius, a square of the half side.
    for i in range(10):
        v = SyntheticVideo.from_index(i, SyntheticConfig(height=48, width=56, seed=i))
        t = np.array([0, 333])
        masks, centres = v.object_masks(t), v.centers(t)
        ys, xs = np.mgrid[0:48, 0:56].astype(np.float64)
        for k, o in enumerate(v.objects):
            for j in range(len(t)):
                dx, dy = xs - centres[j, k, 0], ys - centres[j, k, 1]
                old = (dx ** 2 + dy ** 2 <= o.radius ** 2 if o.shape == "circle"
                       else (np.abs(dx) <= o.radius) & (np.abs(dy) <= o.radius))
                np.testing.assert_array_equal(masks[j, k], old)


def test_a_triangle_renders_as_a_filled_triangle_pointing_up():
    cfg = SyntheticConfig(height=64, width=64, grammar="wide")
    r = 8
    v = SyntheticVideo(index=0, cfg=cfg, background="blue", objects=[ObjectTrack("triangle", "red", r, 30, 30, 0.5, 0.3)])
    frame = v.frames(40, 1)[0]
    mask = np.all(frame == np.asarray(COLORS["red"], np.uint8), axis=-1)
    rows = np.nonzero(mask.any(axis=1))[0]
    widths = mask[rows].sum(axis=1)
    assert len(rows) == 2 * r + 1  # as tall as a square of half side r
    assert widths[0] <= 2 and widths[-1] == 2 * r + 1  # a point on top, the square's width at the base
    assert np.all(np.diff(widths) >= 0) and widths[-1] > widths[len(widths) // 2] > widths[0]
    for y in rows:  # every row one filled run, symmetric about the centre column
        xs = np.nonzero(mask[y])[0]
        assert xs[-1] - xs[0] + 1 == len(xs)
    assert abs(mask.sum() - 2 * r * r) < 2 * (2 * r + 1)  # half the square's area, up to the edge rows
    # it moves as the other shapes do: its box centre is the object's centre
    cx, cy = v.centers([40])[0, 0]
    xs = np.nonzero(mask.any(axis=0))[0]
    assert abs((xs[0] + xs[-1]) / 2 - cx) <= 0.5 and abs((rows[0] + rows[-1]) / 2 - cy) <= 0.5


def test_bad_grammar_or_shape_is_refused():
    with pytest.raises(ValueError, match="grammar"):
        SyntheticConfig(grammar="poetic")
    with pytest.raises(ValueError, match="hexagon"):
        SyntheticConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="motion"):
        CaptionForm(motion="spinning")
    assert SyntheticConfig.from_dict({"grammar": "wide", "shapes": None}).shape_names() == (
        "circle", "square", "triangle")


def test_tokenizer_keeps_the_bundled_ids_and_reads_the_new_words():
    from helios.cli import default_model
    from helios.train.tiny import build_tokenizer, held_out_captions
    from transformers import PreTrainedTokenizerFast

    bundled = PreTrainedTokenizerFast.from_pretrained(default_model() / "tokenizer")
    ours = build_tokenizer()
    old_vocab, new_vocab = bundled.get_vocab(), ours.get_vocab()
    assert all(new_vocab[w] == i for w, i in old_vocab.items())  # nothing re-indexed
    classic = [*held_out_captions(16), *(SyntheticVideo.from_index(i, SyntheticConfig()).caption for i in range(50))]
    assert bundled(classic).input_ids == ours(classic).input_ids
    wide = [SyntheticVideo.from_index(i, WIDE).caption for i in range(200)]
    unk = ours.unk_token_id
    assert not any(unk in ids for ids in ours(wide).input_ids)
    assert any(unk in ids for ids in bundled(wide).input_ids)  # the bundle has not seen the new words
    # the words a wide-grammar model declares are the words its captions use (with three objects at most,
    # the count words above three do not occur)
    used = {w for c in wide for w in c.replace(",", " ").split()}
    assert used == set(caption_vocabulary("wide")) - {"one", "four", "five"}
    assert set(caption_vocabulary("wide")) - set(caption_vocabulary()) == {
        "triangle", "triangles", "moving", "floating", "drifting", "over", "with"}
    index = json.loads((default_model() / "model_index.json").read_text())
    assert index["helios_vocabulary"] == caption_vocabulary()  # the bundle's declared words stay the classic ones


def test_a_training_config_picks_the_grammar_and_refuses_an_unknown_one(tmp_path):
    from helios.train.config import ConfigError, load_config

    base = {"recipe": "tiny", "output_dir": str(tmp_path / "o"), "model": {"init_from": str(tmp_path)},
            "data": {"source": "synthetic"}}
    cfg = load_config(base, ["synthetic.grammar=wide"], check_paths=False)
    fields = {k: v for k, v in cfg["synthetic"].items() if k in SyntheticConfig.__dataclass_fields__}
    assert SyntheticConfig.from_dict(fields).shape_names() == ("circle", "square", "triangle")
    with pytest.raises(ConfigError, match="synthetic.grammar"):
        load_config(base, ["synthetic.grammar=poetic"], check_paths=False)
    with pytest.raises(ConfigError, match="synthetic.shapes"):
        load_config(base, ["synthetic.shapes=[circle, hexagon]"], check_paths=False)
