"""The training loop on a tiny model (CPU): loss falls for stages 1 and 2, a crash and resume gives
bitwise the same weights, LoRA and full fine-tuning export model folders that load and generate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import helios
from helios.train.checkpoint import list_checkpoints
from helpers.train_runs import Crash, checkpoint_tensors, crash_after
from helios.train.trainer import lr_factor, train


def mean(xs):
    return sum(xs) / len(xs)


def test_stage1_loss_falls(make_config):
    r = train(make_config(max_steps=12, finetune="full", **{"optim.lr": 1e-3}))
    assert r.step == 12 and len(r.losses) == 12
    assert mean(r.losses[-4:]) < 0.9 * mean(r.losses[:4]), r.losses


def test_stage2_pyramid_loss_falls(make_config):
    r = train(make_config(max_steps=10, stage=2, finetune="full", **{"pyramid.enabled": True, "optim.lr": 1e-3,
                                                                    "timesteps.weighting_scheme": "none"}))
    assert mean(r.losses[-3:]) < 0.9 * mean(r.losses[:3]), r.losses


def test_crash_and_resume_is_bitwise_identical(make_config, tmp_path):
    over = dict(max_steps=6, finetune="lora", **{
        "ema.enabled": True, "ema.start_step": 2, "ema.decay": 0.9, "optim.lr_schedule": "constant_with_warmup",
        "optim.warmup_steps": 3, "batch.grad_accum": 2, "data.caption_dropout": 0.3, "checkpointing.keep_last": 5})
    whole = train(make_config("whole", **over))

    with pytest.raises(Crash):  # dies after step 3: the newest checkpoint is step 2
        train(make_config("crashed", **over), on_step=crash_after(3))
    crashed_dir = tmp_path / "crashed"
    assert [s for s, _ in list_checkpoints(crashed_dir / "checkpoints")] == [2]
    (crashed_dir / "checkpoints" / ".tmp-step-00000004").mkdir()  # as if it died while saving step 4
    resumed = train(make_config("crashed", **over), resume=True)

    assert resumed.step == 6 and resumed.losses == whole.losses[2:]
    a = checkpoint_tensors(tmp_path / "whole", tmp_path, 6)
    b = checkpoint_tensors(crashed_dir, tmp_path, 6)
    assert a.keys() == b.keys() and any(".ema." in k for k in a) and any("exp_avg" in k for k in a)
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    assert not list((crashed_dir / "checkpoints").glob(".tmp-*"))


def test_resume_needs_a_checkpoint(make_config):
    from helios.train.config import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        train(make_config("fresh"), resume=True)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_export_loads_and_generates(make_config, tiny_model, tmp_path, finetune):
    over = {"export.enabled": True, "optim.lr": 1e-3}
    if finetune == "lora":  # also the on-the-fly synthetic source and a validation video
        over.update({"data.source": "synthetic", "synthetic.num_videos": 2, "synthetic.clip_frames": 66,
                     "validation.enabled": True, "validation.every_steps": 2, "logging.tensorboard": True,
                     "ema.enabled": True})
    r = train(make_config(finetune, max_steps=2, finetune=finetune, **over))
    folder = r.export_dir
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                       "transformer", "vae"]
    assert json.loads((folder / "model_index.json").read_text())["helios_default_size"] == [64, 64]
    trained = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    init = load_file(tiny_model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == init.keys()  # LoRA merged away: the plain transformer's names
    changed = {k for k in init if not torch.equal(init[k], trained[k])}
    assert "blocks.0.attn1.to_q.weight" in changed  # LoRA merged (or fully trained)
    assert {"patch_short.bias", "patch_mid.bias", "patch_long.bias"} <= changed  # memory patches trained in full
    if finetune == "lora":
        assert "blocks.0.norm2.weight" not in changed  # frozen
        assert list((r.output_dir / "validation").glob("step-00000002.mp4"))
        assert list((r.output_dir / "tensorboard").iterdir())

    pipe = helios.load_pipeline(folder)
    assert pipe.default_size == (64, 64)
    video = pipe.generate("a red circle bouncing", num_frames=33, height=64, width=64, steps=1, seed=0)
    assert video.shape == (33, 64, 64, 3) and video.dtype == torch.uint8


def test_lr_schedules():
    f = lr_factor("constant_with_warmup", 4, 100)
    assert [f(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor("constant", 4, 100)(0) == 1.0
    c = lr_factor("cosine", 2, 12)
    assert c(1) == 0.5 and c(2) == 1.0 and abs(c(7) - 0.5) < 1e-12 and c(12) == 0.0


@pytest.mark.parametrize("switches", [
    {"data.keep_anchor": False},  # no first-frame anchor: the short term is the two newest frames
    {"corruption.style": "per_frame", "task_dropout.per_sample": True},  # the paper's variants
    {"corruption.enabled": False, "task_dropout.enabled": False},  # plain history conditioning
])
def test_anti_drifting_switches_run(make_config, switches):
    r = train(make_config(max_steps=2, **{"checkpointing.every_steps": 0, **switches}))
    assert r.step == 2 and all(torch.isfinite(torch.tensor(r.losses)))


def test_compiled_blocks_train_like_eager(make_config):
    # model.compile: the blocks run through inductor (fused kernels; on a GPU far fewer launches per
    # step), the step's numbers stay those of the eager model
    from torch._dynamo.utils import counters

    eager = train(make_config("eager", max_steps=3, finetune="full"))
    counters.clear()
    compiled = train(make_config("compiled", max_steps=3, finetune="full", **{"model.compile": True}))
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did go through dynamo
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    assert len(set(eager.losses)) == 3  # the steps moved the weights



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_logs_its_peak_memory(make_config, tmp_path):
    train(make_config("cuda", max_steps=2, device="cuda", **{"model.mixed_precision": "bf16"}))
    rows = [json.loads(ln) for ln in (tmp_path / "cuda" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["peak_memory_gib"] > 0 for r in rows)
