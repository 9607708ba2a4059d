"""The one writer and reader of the model folder layout (helios.model_folder), as training uses it."""

from __future__ import annotations

import json

import pytest
import torch

from helios.model.loading import load_transformer
from helios.model_folder import (CHUNK_FRAMES, COMPONENT_PARTS, LATENT_CHUNK_FRAMES, TEMPORAL_COMPRESSION,
                                 ModelFolderError, frames_for_latents, read_model_index, write_model_folder)


def test_chunk_geometry():
    assert (CHUNK_FRAMES, LATENT_CHUNK_FRAMES, TEMPORAL_COMPRESSION) == (33, 9, 4)
    assert frames_for_latents(LATENT_CHUNK_FRAMES) == CHUNK_FRAMES and frames_for_latents(5) == 17


def _copy_parts(src):
    return {p: src / p for p in (*COMPONENT_PARTS, "transformer")}


def test_written_folder_reads_back_and_replaces_the_old_one(tmp_path, tiny_model):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    index = {**read_model_index(tiny_model), "helios_default_size": [64, 64]}
    write_model_folder(out, index, _copy_parts(tiny_model), scheduler_config={"_class_name": "HeliosDMDScheduler"})
    assert read_model_index(out)["helios_default_size"] == [64, 64]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == {
        "_class_name": "HeliosDMDScheduler"}
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left beside it
    a, b = load_transformer(tiny_model / "transformer"), load_transformer(out / "transformer")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_refused_folder_leaves_the_old_one(tmp_path, tiny_model):
    out = tmp_path / "model"
    write_model_folder(out, read_model_index(tiny_model), _copy_parts(tiny_model))

    def refuse(folder):
        raise RuntimeError("too big")

    with pytest.raises(RuntimeError, match="too big"):
        write_model_folder(out, {**read_model_index(tiny_model), "is_distilled": True}, _copy_parts(tiny_model),
                           check=refuse)
    assert read_model_index(out).get("is_distilled") is False


def test_writer_and_reader_refuse_incomplete_folders(tmp_path, tiny_model):
    parts = _copy_parts(tiny_model)
    del parts["vae"]
    with pytest.raises(ValueError, match=r"missing \['vae'\]"):
        write_model_folder(tmp_path / "model", read_model_index(tiny_model), parts)
    with pytest.raises(ModelFolderError, match="missing part"):
        read_model_index(_without(tmp_path, tiny_model, "tokenizer"))


def _without(tmp_path, src, part):
    import shutil

    dst = tmp_path / f"without-{part}"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(part))
    return dst


def test_bundle_writes_the_official_layout(tmp_path, tiny_model):
    from helios.train.tiny import MID_SAMPLING, bundle

    out = bundle(tiny_model, tmp_path / "bundle", "mid")
    index = read_model_index(out)
    assert index["helios_default_sampling"] == MID_SAMPLING and index["is_cfg_zero_star"] is True
    assert load_transformer(out / "transformer").proj_out.weight.dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="over the"):
        bundle(tiny_model, tmp_path / "small", "mid", max_mb=1e-3)
    assert not (tmp_path / "small").exists()
