"""Process-wide switches of helios.runtime."""

from __future__ import annotations

import pytest
import torch

from helios.runtime import use_deterministic_kernels


@pytest.fixture
def inductor_config():
    import torch._inductor.config as inductor

    saved = (inductor.deterministic, inductor.test_configs.force_filter_reduction_configs,
             inductor.dynamic_scale_rblock, torch.backends.cudnn.benchmark)
    yield inductor
    (inductor.deterministic, inductor.test_configs.force_filter_reduction_configs,
     inductor.dynamic_scale_rblock, torch.backends.cudnn.benchmark) = saved


def test_reductions_keep_one_block_size_after_dynamo_traces_frames(inductor_config, monkeypatch):
    """What a compiled kernel's metadata carries decides whether Inductor times several block sizes for a
    reduction (and so its summation order). Dynamo resets Inductor's deterministic flag after each frame it
    traces; the reduction settings must hold for the graphs compiled after the first one too."""
    import torch.utils._triton
    from torch._inductor.codegen.triton import TritonKernel

    monkeypatch.setattr(torch.utils._triton, "triton_hash_with_backend", lambda: "no triton here")
    done = use_deterministic_kernels()
    assert done["cudnn_benchmark_off"] and not torch.backends.cudnn.benchmark
    for fn in (lambda x: (x * 2).sum(-1), lambda x: x.abs().amax(-1)):  # two frames, as two blocks' graphs
        torch.compile(fn, backend="eager")(torch.randn(4, 8))
    meta = TritonKernel.inductor_meta_common()
    one_config = meta["deterministic"] or meta["force_filter_reduction_configs"]  # the filter's own condition
    no_runtime_scaling = meta["deterministic"] or not meta["dynamic_scale_rblock"]
    assert one_config and no_runtime_scaling
