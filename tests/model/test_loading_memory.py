"""The loader's host memory: memory-mapped shards, one tensor at a time, never the whole checkpoint twice.

Peak resident memory is read from the kernel (VmHWM, reset through /proc/self/clear_refs), so a loader that
read every shard into memory first, or kept a bf16 copy next to the FP8 model, would fail these bounds:
the checkpoint here is 270 MB in bf16 and the bounds leave about 130 MB above the loaded model.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import helios
from helios.model.config import named_config
from helios.model.loading import save_transformer
from helios.model.transformer import build_transformer

SHARD = 32 * 2**20
SLACK = 64 * 2**20  # the interpreter's own allocations, one tensor's float32 quantisation temporaries

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_rss_during(fn):
    """(result of fn(), peak resident bytes above the resident bytes before it)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status("VmRSS")
    result = fn()
    return result, _status("VmHWM") - before


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """A 136M-parameter transformer saved in bf16 as 32 MB shards; returns (folder, bytes on disk)."""
    torch.manual_seed(0)
    cfg = named_config("small", num_attention_heads=8, attention_head_dim=128, ffn_dim=4096, num_layers=8,
                       rope_dim=(44, 42, 42))
    model = build_transformer(cfg, dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp("rss") / "transformer"
    save_transformer(model, folder, max_shard_bytes=SHARD)
    size = model_bytes(model)
    del model
    gc.collect()
    return folder, size


def test_fp8_load_never_holds_the_bf16_model(checkpoint):
    folder, bf16_bytes = checkpoint
    model, peak = peak_rss_during(lambda: helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True))
    fp8_bytes = model_bytes(model)
    assert fp8_bytes < 0.6 * bf16_bytes
    # Whole bf16 model + FP8 model would be fp8_bytes + 270 MB; the bound is one open shard and one tensor.
    assert peak <= fp8_bytes + 2 * SHARD + SLACK, (peak / 2**20, fp8_bytes / 2**20)
    assert peak < fp8_bytes + bf16_bytes


def test_bf16_load_holds_one_copy(checkpoint):
    folder, bf16_bytes = checkpoint
    model, peak = peak_rss_during(lambda: helios.load_transformer(folder, dtype=torch.bfloat16))
    assert model_bytes(model) == bf16_bytes
    assert peak <= bf16_bytes + 2 * SHARD + SLACK, (peak / 2**20, bf16_bytes / 2**20)


def test_host_blocks_for_streaming_hold_one_copy(checkpoint):
    folder, bf16_bytes = checkpoint
    model, peak = peak_rss_during(lambda: helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True,
                                                                  blocks_on_host=True))
    assert peak <= model_bytes(model) + 2 * SHARD + SLACK, (peak / 2**20, model_bytes(model) / 2**20)
