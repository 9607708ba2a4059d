"""The tensor operations of one training step do not grow with the batch (stages 1 and 2).

A CPU train step (forward and backward) runs under a ``TorchDispatchMode`` that sees every aten
operator. On a GPU the per-sample random draws come from CPU generators (``ctx.sample_generator``),
so they are host work, not kernel launches; the counter therefore splits the operators in two:

* host: an operator that takes a ``torch.Generator``, makes a tensor from Python data
  (``torch.tensor``), or whose tensor inputs all come from such operators (the CPU-side maths on
  the draws before they are batched and moved to the device once);
* device: everything else (anything touching the batch, the model, or a tensor of unknown origin).

The device count must not depend on the batch. The host count grows by a few operators per sample:
drawing per sample (each row from its own generator) is what makes a run independent of how the
global batch is split over processes, and a resume redraw exactly the same numbers.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helios.model.config import HeliosConfig
from helios.model.transformer import build_transformer
from helios.train.config import load_config
from helios.train.modeling import build_trainable
from helios.train.recipes import history_layout
from helios.train.stages import StepContext, make_stage
from helpers.tiny_pipelines import TINY_TRANSFORMER

BATCHES = (2, 4, 8)
# host operators per extra sample: one noise tensor and up to five scalar draws (timesteps, caption
# dropout; each factory call with a generator also dispatches a detach), plus the scalar maths of
# stage 1's logit-normal density. Measured: 9 (stage 1), 13 (stage 2).
HOST_OPS_PER_SAMPLE = 16

CASES = {  # name: (config overrides, steps, allowed spread of the device count over the batch sizes)
    # steps 4 and 5 of the tiny recipe: full history with downsample, resp. noise corruption
    "stage1": ({}, (4, 5), 0),
    "stage2": ({"stage": 2, "pyramid.enabled": True, "timesteps.weighting_scheme": "none"}, (4, 5), 0),
    # the paper's variants decide per sample and per frame, so which kernels run depends on the draws
    # (one downsample resize per distinct reduced size: 7x7 and 8x8 here; the saturation and
    # task-dropout kernels only when drawn): a spread of a few operators, whatever the batch
    "stage1-paper": ({"corruption.style": "per_frame", "task_dropout.per_sample": True,
                      "corruption.saturation_enabled": True, "corruption.p_saturation": 0.2}, (0, 1), 16),
}


class OpCounter(TorchDispatchMode):
    """Counts aten operators, split into host (CPU draws) and device operators (module docstring)."""

    def __init__(self):
        super().__init__()
        self.host, self.device = Counter(), Counter()
        self._host_ids: set[int] = set()
        self._keep: list[torch.Tensor] = []  # host outputs stay alive: their ids are not reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        host = (any(isinstance(x, torch.Generator) for x in leaves) or func is torch.ops.aten.lift_fresh.default
                or (bool(tensors) and all(id(t) in self._host_ids for t in tensors)))
        if host:
            self.host[func.overloadpacket.__name__] += 1
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._host_ids.add(id(t))
                    self._keep.append(t)
        else:
            self.device[func.overloadpacket.__name__] += 1
        return out


def tiny_config(**over) -> dict:
    """The tiny recipe, full fine-tuning, on a transformer made here (no model folder, no data)."""
    base = {"recipe": "tiny", "output_dir": "unused", "device": "cpu", "finetune": "full",
            "model": {"init_from": "unused"}, "data": {"source": "cache", "cache_dir": "unused"}}
    return load_config(base, [f"{k}={v}" for k, v in over.items()], check_paths=False)


def tiny_model(cfg: dict) -> torch.nn.Module:
    """The transformer of the tests' tiny model folders (tests/helpers/tiny_pipelines.py)."""
    torch.manual_seed(0)
    model = build_transformer(HeliosConfig(**TINY_TRANSFORMER))
    build_trainable(model, cfg)
    return model.train()


def random_batch(B: int, C: int, text_dim: int, layout, h: int = 8, w: int = 8, text_len: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"target": torch.randn(B, C, layout.chunk_frames, h, w, generator=g),
            "history": torch.randn(B, C, sum(layout.term_sizes), h, w, generator=g),
            "anchor": torch.randn(B, C, 1, h, w, generator=g),
            "prompt_embeds": torch.randn(B, text_len, text_dim, generator=g),
            "sample_ids": list(range(B))}


def count_step_ops(cfg: dict, model: torch.nn.Module, B: int, step: int) -> tuple[Counter, Counter]:
    """(host, device) operators of one ``stage.train_step`` at batch ``B``."""
    model.zero_grad(set_to_none=True)  # accumulating into an existing .grad would add operators
    stage, layout = make_stage(cfg), history_layout(cfg)
    batch = random_batch(B, model.config.in_channels, model.config.text_dim, layout)
    ctx = StepContext(model, layout, int(cfg["seed"]), step, 0, 0, batch["sample_ids"],
                      lambda loss, last=True: loss.backward())
    with OpCounter() as c:
        stage.train_step(ctx, batch)
    return c.host, c.device


@pytest.mark.parametrize("name", list(CASES))
def test_device_ops_do_not_grow_with_the_batch(name):
    over, steps, spread = CASES[name]
    cfg = tiny_config(**over, **{"data.caption_dropout": 0.3})
    model = tiny_model(cfg)
    for step in steps:
        counts = {B: count_step_ops(cfg, model, B, step) for B in BATCHES}
        device = {B: sum(c[1].values()) for B, c in counts.items()}
        host = {B: sum(c[0].values()) for B, c in counts.items()}
        print(f"{name} step {step}: device operators {device}, host operators {host}")
        assert max(device.values()) - min(device.values()) <= spread, (device, counts[8][1] - counts[2][1])
        if not spread:  # the paper's variants also draw per frame on the host (scalars, from the batch generator)
            assert host[8] - host[4] <= HOST_OPS_PER_SAMPLE * 4, host


def test_batched_per_sample_draws_equal_row_by_row_calls():
    """The batched helpers give bitwise what one call per row (each with its own generator) gives."""
    from helios.train.corrupt import TaskDropoutConfig, apply_task_dropout
    from helios.train.timesteps import (
        TimestepConfig,
        build_pyramid_schedule,
        sample_pyramid_training_inputs,
        sample_pyramid_training_inputs_per_sample,
        sample_training_sigmas,
        sample_training_sigmas_per_sample,
    )

    def gens(n, base):
        return [torch.Generator().manual_seed(base + i) for i in range(n)]

    x0 = torch.randn(5, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for cfg in (TimestepConfig(weighting_scheme="none"), TimestepConfig(use_dynamic_shifting=True)):
        batched = sample_pyramid_training_inputs_per_sample(x0, build_pyramid_schedule(), (1, 2, 1), cfg, gens(5, 10))
        rows = [sample_pyramid_training_inputs(x0[i : i + 1], build_pyramid_schedule(), (1, 2, 1), cfg, g)
                for i, g in enumerate(gens(5, 10))]
        for j, d in enumerate(batched):
            for f in ("noisy", "target", "sigmas", "timesteps"):
                assert torch.equal(getattr(d, f), torch.cat([getattr(r[j], f) for r in rows])), (j, f)
        sigmas, timesteps = sample_training_sigmas_per_sample(cfg, x0.shape, gens(5, 20))
        rows = [sample_training_sigmas(1, cfg, x0.shape, g) for g in gens(5, 20)]
        assert torch.equal(sigmas, torch.cat([r[0] for r in rows]))
        assert torch.equal(timesteps, torch.cat([r[1] for r in rows]))

    # per-sample task dropout = the per-batch decision taken row after row from the same generator
    full = torch.randn(6, 4, 20, 2, 2, generator=torch.Generator().manual_seed(1))
    anchor, (long, mid, last) = full[:, :, :1], full[:, :, 1:].split([16, 2, 1], dim=2)
    cfg = TaskDropoutConfig(per_sample=True, t2v_ratio=0.3, i2v_ratio=0.3, v2v_ratio=0.6)
    g = torch.Generator().manual_seed(2)
    *batched, tasks = apply_task_dropout(anchor, long, mid, last, cfg, g)
    g = torch.Generator().manual_seed(2)
    rows = [apply_task_dropout(anchor[i : i + 1], long[i : i + 1], mid[i : i + 1], last[i : i + 1],
                               TaskDropoutConfig(t2v_ratio=0.3, i2v_ratio=0.3, v2v_ratio=0.6), g) for i in range(6)]
    assert tasks == [r[4][0] for r in rows] and len(set(tasks)) > 1
    for k, t in enumerate(batched):
        assert torch.equal(t, torch.cat([r[k] for r in rows])), k


def test_per_sample_pyramid_inputs_need_one_generator_per_row():
    from helios.train.timesteps import build_pyramid_schedule, sample_pyramid_training_inputs_per_sample

    x0 = torch.zeros(3, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample_pyramid_training_inputs_per_sample(x0, build_pyramid_schedule(), (1, 2, 1), None,
                                                  [torch.Generator(), torch.Generator()])
