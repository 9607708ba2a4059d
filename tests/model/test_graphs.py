"""The graphed forward (`model.graphs.GraphedForward`, on with `optimize()` on CUDA) without a GPU.

With replay="host" a captured call is re-run on the graph's static buffers instead of replayed by the GPU:
an input that does not go through its buffer (a new prompt's text keys/values, the next chunk's history,
the next step's latents or timestep) is stale there just as in a CUDA graph, so the frames would differ.
Real CUDA graphs against the plain path: tests/gpu/test_fast_paths_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

import helios
from helios.cli import default_model
from helios.engine.prompts import PromptSchedule
from helios.model.graphs import GraphedForward

from helpers.tiny_pipelines import save_model_folder

# Two chunks and a prompt change: the text keys/values must be reloaded for chunk 1.
SCHEDULE = [(0, "two red circles bouncing on a blue background"), (1, "a green square on a yellow background")]


def frames(pipe, prompt, seed: int = 3, size: int = 32, **kw) -> torch.Tensor:
    return torch.cat([c.frames for c in pipe.stream(PromptSchedule.coerce(prompt), num_frames=66, seed=seed,
                                                    height=size, width=size, **kw)])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in ("base", "distilled"):
        out[kind] = tmp_path_factory.mktemp(kind)
        save_model_folder(kind, out[kind])
    return out


def test_graphed_stream_equals_the_plain_stream_with_cfg_and_a_prompt_change(folders):
    pipe = helios.load_pipeline(folders["base"])  # the base preset: CFG, so two prompt slots
    plain = frames(pipe, SCHEDULE, steps=2)
    pipe.graphs = GraphedForward(pipe.model, replay="host")
    graphed = frames(pipe, SCHEDULE, steps=2)
    assert torch.equal(graphed, plain)
    # One graph per (shape, slot): the prompt and the negative prompt at the one resolution.
    assert len(pipe.graphs.graphs) == 2 and not pipe.graphs.failed
    assert sorted(k[-1][0] for k in pipe.graphs.graphs) == [0, 1]
    # A second video reuses the graphs (new prompt, new history, same shapes).
    again = frames(pipe, "a green square on a yellow background", steps=2, seed=5)
    pipe.graphs = None
    assert torch.equal(again, frames(pipe, "a green square on a yellow background", steps=2, seed=5))


def test_graphed_pyramid_equals_the_plain_pyramid(folders):
    # The distilled preset: three stage sizes, two steps each, an amplified first chunk; no CFG.
    distilled = helios.load_pipeline(folders["distilled"])
    plain = frames(distilled, "a red fox running through snow", size=64)  # latents 8x8: stages 2x2, 4x4, 8x8
    distilled.graphs = GraphedForward(distilled.model, replay="host")
    try:
        graphed = frames(distilled, "a red fox running through snow", size=64)
        shapes = sorted(k[0] for k in distilled.graphs.graphs)
    finally:
        distilled.graphs = None
    assert torch.equal(graphed, plain)
    assert shapes == [(1, 16, 9, 2, 2), (1, 16, 9, 4, 4), (1, 16, 9, 8, 8)]


def test_a_stale_input_would_show(folders):
    # The check above can fail: a graph that skips reloading the text keeps drawing the first prompt.
    pipe = helios.load_pipeline(folders["base"])
    pipe.graphs = GraphedForward(pipe.model, replay="host")
    first = frames(pipe, "two red circles bouncing on a blue background", steps=2)
    for slot in pipe.graphs.texts.values():
        slot.load = lambda text: None  # never reload
    stale = frames(pipe, "a green square on a yellow background", steps=2)
    pipe.graphs = None
    fresh = frames(pipe, "a green square on a yellow background", steps=2)
    assert not torch.equal(stale, fresh)
    assert torch.equal(stale, first)  # the same seed, so exactly the first prompt's video


def test_shapes_past_the_graph_limit_run_without_a_graph(folders):
    pipe = helios.load_pipeline(folders["distilled"])
    plain = frames(pipe, "a red fox running through snow", size=64)
    pipe.graphs = GraphedForward(pipe.model, replay="host", max_graphs=1)
    graphed = frames(pipe, "a red fox running through snow", size=64)
    assert len(pipe.graphs.graphs) == 1 and torch.equal(graphed, plain)  # stages 1 and 2 ran plain


def test_replay_mode_is_checked():
    pipe = helios.load_pipeline(default_model())
    with pytest.raises(ValueError, match="replay must be"):
        GraphedForward(pipe.model, replay="cpu")


def test_optimize_enables_graphs_only_on_cuda():
    pipe = helios.load_pipeline(default_model())
    assert pipe.graphs is None
    pipe.optimize(compile=False, fuse=False)
    assert pipe.graphs is None  # CPU: nothing to replay
