"""FSDP2 with a bf16 parameter policy and activation checkpointing: the blocks must get their RoPE
tables in float32, in the forward and in the backward's recompute, as on one GPU. On two H100s
(torch 2.11) FSDP2 cast the tables to bf16 in the forward but not in the recompute, and the first
FSDP run failed with torch.utils.checkpoint's "Recomputed values ... have different metadata"; only
the root may cast its inputs. Checked on the CPU with one gloo process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helios.engine.history import HistoryLayout
from helios.model.config import named_config
from helios.model.rope import apply_rope
from helios.model.transformer import build_transformer
from helios.train.modeling import shard_model
from helpers.net import free_port


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_bf16_policy_keeps_rope_float32_through_checkpoint_recompute(one_process_group, monkeypatch):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from helios.model import transformer

    seen = []

    def recording_apply_rope(x, cos, sin):
        seen.append((torch.is_grad_enabled(), cos.dtype, sin.dtype))
        return apply_rope(x, cos, sin)

    monkeypatch.setattr(transformer, "apply_rope", recording_apply_rope)

    torch.manual_seed(0)
    cfg = named_config("tiny")
    model = build_transformer(cfg)
    model.enable_gradient_checkpointing()
    shard_model(model, one_process_group, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    long, mid, short = HistoryLayout().term_sizes
    hist = {"latents_history_long": torch.randn(1, cfg.in_channels, long, 8, 8, generator=g),
            "latents_history_mid": torch.randn(1, cfg.in_channels, mid, 8, 8, generator=g),
            "latents_history_short": torch.randn(1, cfg.in_channels, short + 1, 8, 8, generator=g),
            **HistoryLayout().indices()}
    x = torch.randn(1, cfg.in_channels, 9, 8, 8, generator=g)
    text = torch.randn(1, 4, cfg.text_dim, generator=g)
    out = model(x, torch.tensor([500.0]), text, **hist).sample
    forward_calls = len(seen)
    out.float().square().mean().backward()
    # 2 layers x (q, k): once in the forward, once more when checkpointing recomputes each block
    assert forward_calls == 4 and len(seen) == 8
    assert {(c, s) for _, c, s in seen} == {(torch.float32, torch.float32)}
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(gr is not None for gr in grads)
    assert all(torch.isfinite(gr.full_tensor() if hasattr(gr, "full_tensor") else gr).all() for gr in grads)
