"""The loader's host memory: memory-mapped shards, one tensor at a time, never the whole checkpoint twice.

Peak resident memory is read from the kernel (VmHWM, reset through /proc/self/clear_refs), so a loader that
read every shard into memory first, or kept a bf16 copy next to the FP8 model, would fail these bounds:
the checkpoint here is 300 MB in bf16 and the bounds leave 128 MB above the loaded model (the last test
shows a loader that reads everything first breaking them).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
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


# Each load runs in a fresh interpreter: freed memory that the C allocator keeps for reuse would let a later
# measurement in the same process hide a second copy.
_MEASURE = """
import gc, json, sys
from pathlib import Path
import torch
import helios
from helios.model.loading import shard_map

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

folder, mode, warm = sys.argv[1], sys.argv[2], sys.argv[3]
kw = {"bf16": {}, "fp8": {"fp8": True}, "host": {"fp8": True, "blocks_on_host": True}}.get(mode, {})
helios.load_transformer(warm, dtype=torch.bfloat16, **kw)  # lazy imports and one-time allocations, first
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
before = status("VmRSS")
if mode == "read-everything-first":  # what the loader must not do: every shard's tensors in memory at once
    from safetensors import safe_open
    held = []
    for f in sorted(set(shard_map(Path(folder)).values())):
        with safe_open(str(f), framework="pt") as sf:
            held += [sf.get_tensor(k).clone() for k in sf.keys()]
    out = sum(t.numel() * t.element_size() for t in held)
else:
    model = helios.load_transformer(folder, dtype=torch.bfloat16, **kw)
    out = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"peak": status("VmHWM") - before, "bytes": out}))
"""


def peak_rss_of_load(folder: Path, mode: str) -> tuple[int, int]:
    """(peak resident bytes above those before the load, bytes of what was loaded), in a fresh process."""
    src = Path(helios.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    warm = Path(helios.__file__).parent / "assets" / "helios-tiny" / "transformer"
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), mode, str(warm)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["peak"], result["bytes"]


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
    peak, fp8_bytes = peak_rss_of_load(folder, "fp8")
    assert fp8_bytes < 0.6 * bf16_bytes
    # The whole bf16 model beside the FP8 one would be fp8_bytes + 300 MB; the bound is one shard and a tensor.
    assert peak <= fp8_bytes + 2 * SHARD + SLACK, (peak / 2**20, fp8_bytes / 2**20)


def test_bf16_load_holds_one_copy(checkpoint):
    folder, bf16_bytes = checkpoint
    peak, loaded = peak_rss_of_load(folder, "bf16")
    assert loaded == bf16_bytes
    assert peak <= bf16_bytes + 2 * SHARD + SLACK, (peak / 2**20, bf16_bytes / 2**20)


def test_host_blocks_for_streaming_hold_one_copy(checkpoint):
    folder, _ = checkpoint
    peak, loaded = peak_rss_of_load(folder, "host")
    assert peak <= loaded + 2 * SHARD + SLACK, (peak / 2**20, loaded / 2**20)


def test_the_bound_catches_a_loader_that_reads_everything_first(checkpoint):
    folder, bf16_bytes = checkpoint
    peak, held = peak_rss_of_load(folder, "read-everything-first")
    assert held == bf16_bytes
    assert peak > bf16_bytes // 2 + 2 * SHARD + SLACK  # what the FP8 bound above allows, roughly
