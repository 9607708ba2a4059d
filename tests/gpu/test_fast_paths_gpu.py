"""CUDA versions of the fast paths against the plain PyTorch path (run on a GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_cudnn_attention_matches_math():
    from helios.model.attention import attention, set_attention_backends

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2000, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    set_attention_backends(["math"])
    ref = attention(q.float(), k.float(), v.float())
    set_attention_backends(["cudnn", "flash", "efficient", "math"])
    fast = attention(q, k, v)
    assert rel(fast.float(), ref) < 1e-2


def test_fa4_attention_matches_math_and_keeps_its_op_in_a_cuda_graph():
    from helios.model.attention import attention, fa4_available, set_attention_backends

    if fa4_available() is not None:
        pytest.skip(f"FlashAttention-4 is not installed: {fa4_available()}")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 1500, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2000, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    set_attention_backends(["math"])
    ref = attention(q.float(), k.float(), v.float())
    try:
        set_attention_backends(["fa4", "cudnn", "flash", "efficient", "math"])
        fast = attention(q, k, v)
        assert rel(fast.float(), ref) < 1e-2
        graph, out = torch.cuda.CUDAGraph(), None
        with torch.cuda.graph(graph):
            out = attention(q, k, v)
        q.copy_(q.flip(1))
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out.float(), attention(q.float(), k.float(), v.float()).float()) < 1e-2
    finally:
        set_attention_backends(["cudnn", "flash", "efficient", "math"])


def test_fp8_scaled_mm_matches_the_emulated_product():
    from helios.model.fp8 import Fp8Linear

    g = torch.Generator(device="cuda").manual_seed(1)
    lin = torch.nn.Linear(512, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1000, 512, device="cuda", generator=g, dtype=torch.bfloat16)  # 1000: padded to 16
    q = Fp8Linear(lin)
    fast = q(x)
    emulated = q.cpu()(x.cpu()).cuda()
    assert fast.shape == (1000, 384)
    assert rel(fast.float(), emulated.float()) < 1e-2
    assert rel(fast.float(), lin(x).float()) < 5e-2


def test_compiled_fused_model_matches_eager_bf16():
    from helios.model.config import named_config
    from helios.model.transformer import build_transformer

    torch.manual_seed(0)
    model = build_transformer(named_config("small"), device="cuda", dtype=torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(1, 16, 9, 16, 16, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(1, 20, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = model(x, 400.0, ctx).sample.float()
        model.fuse_projections_().compile_blocks_()
        fast = model(x, 400.0, ctx).sample.float()
    assert rel(fast, plain) < 2e-2


def _video(pipe, prompt, **kw):
    return torch.cat([c.frames for c in pipe.stream(prompt, num_frames=99, seed=9, **kw)]).float()


def test_cuda_graphs_replay_the_plain_forward():
    # The bundled model in bf16 with CFG (two prompt slots), a prompt change at chunk 1 (text reload), three
    # chunks (history reload): eager kernels against the same forwards replayed from CUDA graphs.
    import helios
    from helios.cli import default_model
    from helios.engine.prompts import PromptSchedule
    from helios.model.graphs import GraphedForward

    pipe = helios.load_pipeline(default_model(), dtype=torch.bfloat16, device="cuda", optimize=False)
    prompt = PromptSchedule.coerce([(0, "two red circles bouncing on a blue background"),
                                    (1, "a green square on a yellow background")])
    plain, plain_again = _video(pipe, prompt), _video(pipe, prompt)
    pipe.graphs = GraphedForward(pipe.model)
    graphed = _video(pipe, prompt)
    graphed_again = _video(pipe, prompt)  # replays only
    assert not pipe.graphs.failed, pipe.graphs.failed
    assert len(pipe.graphs.graphs) == 2
    noise = (plain - plain_again).abs().max().item()  # run-to-run spread of the plain path itself
    d1, d2 = (graphed - plain).abs(), (graphed_again - plain).abs()
    print(f"plain vs plain max {noise}; graphed vs plain max {d1.max().item()} mean {d1.mean().item():.2e}; "
          f"replayed vs plain max {d2.max().item()} mean {d2.mean().item():.2e}")
    # Measured on the H200: the same kernels on the same inputs, bit for bit (and the plain path repeats itself).
    assert noise == 0.0
    assert torch.equal(graphed, plain) and torch.equal(graphed_again, plain)


def test_cuda_graphs_with_compiled_blocks_and_fp8_in_the_optimized_pipeline():
    # optimize() turns graphs on: compiled blocks captured per shape, FP8 matmuls inside; equal to the
    # same optimized pipeline launched kernel by kernel.
    import helios
    from helios.cli import default_model

    pipe = helios.load_pipeline(default_model(), dtype=torch.bfloat16, device="cuda", optimize=True, fp8=True)
    assert pipe.graphs is not None
    graphed = _video(pipe, "two red circles bouncing on a blue background")
    assert len(pipe.graphs.graphs) == 2 and not pipe.graphs.failed, pipe.graphs.failed
    graphs, pipe.graphs = pipe.graphs, None
    plain = _video(pipe, "two red circles bouncing on a blue background")
    pipe.graphs = graphs
    d = (graphed - plain).abs()
    print(f"optimized fp8: graphed vs plain max {d.max().item()} mean {d.mean().item():.2e}")
    assert torch.equal(graphed, plain)
