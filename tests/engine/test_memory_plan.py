"""Memory plans (helios.engine.memory): budgets, the plan each one picks for the 14B model, refusals with
what would fit, and the engine under a plan computing the same frames as the resident engine (CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helios.cli import app, default_model
from helios.engine.components import load_components
from helios.engine.memory import (GiB, Budget, MemoryBudgetError, MemoryPlan, ModelSizes, candidate_plans, card_budget,
                                  choose_plan, estimate, parse_budget, tokens_per_forward, transformer_bytes)
from helios.engine.pipeline import HeliosVideoPipeline, InputError, MemoryState, load_pipeline
from helios.model.config import HeliosConfig


def sizes_14b() -> ModelSizes:
    return ModelSizes.helios_14b()


def test_card_budgets_keep_a_margin():
    assert parse_budget("24gb").usable == 22 * GiB
    assert parse_budget("12gb").usable == 11 * GiB
    assert parse_budget("48GB").usable == 44 * GiB
    for bad in ("", "lots", "-3gb", "0gb"):
        with pytest.raises(MemoryBudgetError, match="24gb, 12gb"):
            parse_budget(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_auto_budget_needs_a_gpu():
    with pytest.raises(MemoryBudgetError, match="CUDA"):
        parse_budget("auto", "cpu")


def test_fp8_blocks_weigh_half_of_bf16_and_the_14b_model_is_its_known_size():
    rest, block_bf16 = transformer_bytes(HeliosConfig(), torch.bfloat16, fp8=False)
    _, block_fp8 = transformer_bytes(HeliosConfig(), torch.bfloat16, fp8=True)
    total_bf16 = rest + 40 * block_bf16
    assert 28.0e9 < total_bf16 < 29.0e9  # 28.6 GB in bf16
    assert 0.49 < block_fp8 / block_bf16 < 0.51


def test_token_count_of_a_384x640_forward():
    history, noisy = tokens_per_forward(HeliosConfig(), 384, 640)
    assert (history, noisy) == (2400, 8640)  # the sequence of benchmarks/bench_cp.py: 11040 tokens


@pytest.mark.parametrize("budget, name, streamed", [("80gb", "resident", False), ("24gb", "fp8", False),
                                                    ("12gb", "streamed", True)])
def test_each_budget_takes_the_fastest_plan_that_fits(budget, name, streamed):
    plan, est = choose_plan(parse_budget(budget), sizes_14b(), 384, 640)
    assert plan.name == name and plan.stream_blocks == streamed
    assert est.total <= parse_budget(budget).usable
    if name != "resident":
        assert plan.fp8 and plan.text_encoder == "layers" and plan.decode_slice is not None
    # The next faster plan would not have fitted.
    faster = MemoryPlan("resident", fp8=False) if name == "fp8" else MemoryPlan("fp8", fp8=True, text_encoder="layers",
                                                                               decode_slice=1)
    if name != "resident":
        assert estimate(faster, sizes_14b(), 384, 640).total > parse_budget(budget).usable


def test_the_14b_model_at_384x640_gets_these_plans():
    # What the estimates choose (docs/memory.md's table): FP8 blocks resident with 2-frame decode slices at 24 GB
    # (CUDA graphs hold the activations apart, so both working sets count); at 12 GB the streamed plan's decode
    # follows the denoising in one pool, and its slices stay at 2 frames (STREAMED_DECODE_SLICES) though 4 would
    # fit the estimate: room for what it does not count.
    plan24, est24 = choose_plan(card_budget(24), sizes_14b(), 384, 640)
    assert (plan24.name, plan24.decode_slice, plan24.cuda_graphs, plan24.overlap_decode) == ("fp8", 2, True, False)
    assert {"activations", "decode"} <= set(est24.gpu)
    plan12, est12 = choose_plan(card_budget(12), sizes_14b(), 384, 640)
    assert (plan12.name, plan12.ring_size, plan12.decode_slice, plan12.overlap_decode) == ("streamed", 3, 2, False)
    assert "working set (decode)" in est12.gpu and "activations" not in est12.gpu and "decode" not in est12.gpu


def test_only_the_resident_plan_overlaps_the_decode():
    plans = candidate_plans(fp8_ok=True) + candidate_plans(fp8_ok=False)
    assert all(p.overlap_decode == (p.name == "resident") for p in plans)
    resident = next(p for p in plans if p.name == "resident")
    assert "overlapped with the next chunk's denoising" in resident.describe()
    assert all("after each chunk's denoising" in p.describe() for p in plans if p.name != "resident")


def test_one_after_the_other_without_graphs_the_larger_working_set_counts_once():
    streamed = MemoryPlan("streamed", fp8=True, stream_blocks=True, ring_size=3, text_encoder="layers",
                          decode_slice=4, cuda_graphs=False, overlap_decode=False)
    overlapped = dataclasses.replace(streamed, overlap_decode=True)
    one, both = (estimate(p, sizes_14b(), 384, 640) for p in (streamed, overlapped))
    working = one.gpu.pop("working set (decode)")
    assert working == max(both.gpu["activations"], both.gpu["decode"]) == both.gpu["decode"]
    assert one.gpu == {k: v for k, v in both.gpu.items() if k not in ("activations", "decode")}
    assert "working set (decode)" in estimate(streamed, sizes_14b(), 384, 640).summary()
    # Small slices: the activations are the larger, and the part is named after them.
    small = estimate(dataclasses.replace(streamed, decode_slice=1), sizes_14b(), 384, 640)
    assert small.gpu["working set (activations)"] == both.gpu["activations"]
    # CUDA graphs keep the forward's activations in their own pool: both count even one after the other.
    graphed = dataclasses.replace(streamed, stream_blocks=False, cuda_graphs=True)
    assert {"activations", "decode"} <= set(estimate(graphed, sizes_14b(), 384, 640).gpu)


def test_a_whole_chunk_decode_is_estimated_at_the_measured_undeferred_peak():
    from helios.engine.memory import VAE_BYTES_PER_OUTPUT_PIXEL

    assert abs(VAE_BYTES_PER_OUTPUT_PIXEL * 33 * 384 * 640 / 15.6e9 - 1) < 0.002  # H200 2026-12-03, NOTES.md


def test_without_fp8_matmuls_a_24gb_card_streams_bf16_blocks():
    plan, _ = choose_plan(parse_budget("24gb"), sizes_14b(), 384, 640, fp8_ok=False)
    assert not plan.fp8 and plan.stream_blocks


def test_too_small_a_budget_is_refused_with_the_figure_and_what_fits():
    with pytest.raises(MemoryBudgetError) as e:
        choose_plan(parse_budget("12gb"), sizes_14b(), 720, 1280, guidance=True)
    msg = str(e.value)
    assert "12gb" in msg and "needs" in msg and "GiB" in msg
    assert "--height" in msg and "no guidance" in msg and "--memory" in msg
    need = float(msg.split("needs ")[1].split(" GiB")[0])
    assert need * GiB > parse_budget("12gb").usable


def test_sizes_of_a_folder_are_read_without_loading_it():
    sizes = ModelSizes.from_folder(default_model())
    comps = load_components(default_model())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert sizes.text_params == count(comps.text_encoder)
    assert sizes.vae_params == count(comps.vae)
    rest, block = transformer_bytes(sizes.config, torch.float32, fp8=False)
    assert rest + block * sizes.config.num_layers == sum(p.numel() * 4 for p in comps.transformer.parameters())


def _frames(pipe, **kw):
    return torch.cat([c.frames for c in pipe.stream("two red circles", num_frames=33, steps=2, seed=1, **kw)])


def _planned_pipeline(plan: MemoryPlan, budget: Budget) -> HeliosVideoPipeline:
    comps = load_components(default_model(), fp8=plan.fp8, blocks_on_host=plan.stream_blocks, text_device="cpu")
    pipe = HeliosVideoPipeline(comps).optimize(compile=False, fp8=plan.fp8, cuda_graphs=False)
    pipe.apply_memory_plan(MemoryState(plan, budget, ModelSizes.from_folder(default_model())))
    return pipe


@pytest.mark.slow
def test_streamed_plan_gives_the_resident_frames_exactly():
    # float32 weights: FP8 is emulated slowly on the CPU, and streamed FP8 blocks are pinned in tests/model.
    plan = MemoryPlan("streamed", fp8=False, stream_blocks=True, ring_size=2, text_encoder="layers",
                      decode_slice=2, cuda_graphs=False)
    streamed = _planned_pipeline(plan, card_budget(12))
    resident = load_pipeline(default_model())
    resident.codec.decode_slice = 2  # the same decode: what is compared is where the weights live
    a, b = _frames(resident), _frames(streamed)
    assert a.shape == b.shape and (a.int() - b.int()).abs().max().item() == 0
    ring = streamed.model.block_stream
    assert ring is not None and ring.max_resident <= 2 and len(ring.slots) == 2
    # Slicing the decode changes the frames by rounding at most (the causal decoder carries its state over).
    resident.codec.decode_slice = None
    whole = _frames(resident)
    assert (whole.int() - a.int()).abs().max().item() <= 2


def test_load_pipeline_under_a_plan_decodes_after_the_denoising_with_tap_sums_not_deferred(monkeypatch):
    # On the CPU no plan can be chosen (they plan GPU memory): the 12 GB plan is handed to load_pipeline as chosen.
    from helios.engine import pipeline

    plan = MemoryPlan("streamed", fp8=False, stream_blocks=True, ring_size=2, text_encoder="layers",
                      decode_slice=2, cuda_graphs=False, overlap_decode=False)
    state = MemoryState(plan, card_budget(12), ModelSizes.from_folder(default_model()))
    monkeypatch.setattr(pipeline, "plan_memory", lambda *a, **k: state)
    seen = {}
    optimize = HeliosVideoPipeline.optimize

    def spy(self, **kw):
        seen.update(kw, defer_tap_sums=self.codec.decoder.defer_tap_sums)
        return optimize(self, **kw)

    monkeypatch.setattr(HeliosVideoPipeline, "optimize", spy)
    pipe = load_pipeline(default_model(), memory_budget="12gb", optimize=True)  # compiles lazily: never here
    assert seen["overlap_decode"] is False and seen["defer_tap_sums"] is False  # before the decode is tuned
    assert pipe.overlap_decode is False and pipe.codec.decoder.defer_tap_sums is False
    assert pipe._overlap(None, live=False) is False and pipe._overlap(True, live=False) is False
    pipe.decode_beside = False  # in line (bench_memory --inline): one working set, so a chunk may be queued ahead
    assert pipe._overlap(True, live=False) is True and pipe._overlap(None, live=False) is False
    resident = load_pipeline(default_model()).optimize(compile=False, fuse=False)
    assert resident._overlap(None, live=False) is True and resident.codec.decoder.defer_tap_sums is True


def test_a_planned_pipeline_refuses_a_request_beyond_its_budget():
    plan = MemoryPlan("fp8", fp8=False, text_encoder="layers", decode_slice=1)
    pipe = _planned_pipeline(plan, Budget("tiny", 300 * 2**20, 0))
    with pytest.raises(InputError, match="memory plan") as e:
        next(pipe.stream("a red fox", num_frames=33, height=1024, width=1024, steps=1))
    assert "--height" in str(e.value) or "card with at least" in str(e.value)


def test_cli_memory_on_the_cpu_is_refused_before_loading():
    result = CliRunner().invoke(app, ["generate", "a red fox", "--memory", "12gb", "--device", "cpu"])
    assert result.exit_code == 2
    assert "--memory" in result.output and "cpu" in result.output


def test_serve_engines_take_the_budget_and_refuse_it_where_it_cannot_apply():
    from helios.serve.engines import load_engines

    with pytest.raises(ValueError, match="one GPU per engine"):
        load_engines(default_model(), [["cuda:0", "cuda:1"]], memory="24gb")
    with pytest.raises(MemoryBudgetError, match="device is cpu"):
        load_engines(default_model(), [["cpu"]], memory="12gb")


@pytest.fixture
def restore_kernel_flags():
    import torch._inductor.config as inductor

    before = inductor.deterministic, torch.backends.cudnn.benchmark
    yield
    inductor.deterministic, torch.backends.cudnn.benchmark = before


def test_deterministic_load_fixes_the_kernel_choices(restore_kernel_flags):
    import torch._inductor.config as inductor

    inductor.deterministic = False
    pipe = load_pipeline(default_model(), deterministic=True)
    assert inductor.deterministic is True and torch.backends.cudnn.benchmark is False
    assert pipe.deterministic is True


def test_cli_and_server_pass_deterministic_to_the_loader(monkeypatch, tmp_path):
    from helios.engine import pipeline
    from helios.serve.engines import load_engines

    seen = []

    def refuse(*a, **kw):
        seen.append(kw.get("deterministic"))
        raise ValueError("not loading in this test")

    monkeypatch.setattr(pipeline, "load_pipeline", refuse)
    result = CliRunner().invoke(app, ["generate", "two red circles", "--deterministic", "--device", "cpu",
                                      "--out", str(tmp_path / "v.mp4")])
    assert result.exit_code == 2 and "not loading in this test" in result.output
    with pytest.raises(ValueError, match="not loading"):
        load_engines(default_model(), [["cpu"]], deterministic=True)
    assert seen == [True, True]
    assert "--deterministic" in CliRunner().invoke(app, ["serve", "--help"]).output


@pytest.mark.parametrize("option", [["--deterministic"], ["--memory", "24gb"]])
def test_serve_refuses_single_host_options_with_ray_before_loading(monkeypatch, option):
    from helios.engine import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **kw: pytest.fail("loaded a model"))
    result = CliRunner().invoke(app, ["serve", "--ray", *option])
    assert result.exit_code == 2
    assert "--memory, --decoder and --deterministic are not supported with --ray yet" in result.output


def test_allocator_segments_are_summed_by_stream_and_by_pool(monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # its own imports
    bench_memory = importlib.import_module("bench_memory")
    segments = [{"stream": 0, "segment_pool_id": (0, 0), "total_size": GiB, "allocated_size": GiB // 2},
                {"stream": 0, "segment_pool_id": (0, 1), "total_size": 2 * GiB, "allocated_size": GiB},
                {"stream": 7, "segment_pool_id": [0, 0], "total_size": GiB, "allocated_size": 0}]
    out = bench_memory.segment_totals(segments)
    assert out["by_stream"] == {"0": {"segments": 2, "total_gib": 3.0, "allocated_gib": 1.5},
                                "7": {"segments": 1, "total_gib": 1.0, "allocated_gib": 0.0}}
    assert out["by_pool"] == {"(0, 0)": {"segments": 2, "total_gib": 2.0, "allocated_gib": 0.5},
                              "(0, 1)": {"segments": 1, "total_gib": 2.0, "allocated_gib": 1.0}}


def test_expandable_segments_keep_a_setting_the_user_made(monkeypatch):
    from helios import runtime

    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    assert runtime.use_expandable_segments() is False and calls == []
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert runtime.use_expandable_segments() is True and calls == ["expandable_segments:True"]
