"""The transformer's forward replayed as CUDA graphs: one graph per input shape (pyramid stage) and prompt slot.

A distilled 14B chunk is 6 forwards of ~40 blocks; each forward launches on the order of a thousand kernels.
The host queues them ahead of the GPU, but every launch still leaves a gap of a few microseconds on the
device between kernels. A graph replays the whole forward as one launch.

How it stays exact: a graph reads and writes fixed addresses, so every input of the forward is copied into
a static buffer owned by its graph before each replay (the noisy latents, the timestep, the history latents
and indices, the RoPE tables) and the output is copied out after it. The text keys/values of all layers
(hundreds of MB on 14B) are copied only when the prompt changes: each `TextContext` carries a serial number,
and the buffers of a prompt slot (0: the prompt, 1: the negative prompt under CFG) remember the serial they
hold. The first call of each shape runs the forward normally on the capture stream (compiling the blocks for
that shape, initialising library handles there), then captures it; later calls replay.

`replay="host"` replaces the CUDA graph by re-running the captured call on the static buffers: it runs on
any device and checks the same plumbing (an input that did not go through its static buffer would be stale
there too), which is how the tests on machines without a GPU pin it.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from helios.model.transformer import HeliosTransformer, TextContext, TokenLayout

log = logging.getLogger("helios")


class _CudaGraph:
    def __init__(self, pool, stream: torch.cuda.Stream):
        self.pool, self.stream = pool, stream
        self.graph: torch.cuda.CUDAGraph | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a server thread doing unrelated CUDA work must not invalidate the capture.
        with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class _HostGraph:
    """Stands in for a CUDA graph: replay re-runs the captured call, reading the same static buffers."""

    def __init__(self):
        self.fn: Callable[[], torch.Tensor] | None = None
        self.out: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.fn())


class _CaptureStream:
    """The side stream and memory pool one owner's CUDA graphs are captured on, and the capture itself:
    the call runs once on that stream first (compiling its kernels for the shape, initialising library
    handles and plans there), then is captured; a call that cannot be captured reports why."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None
        self.pool = None

    def warm_up_and_capture(self, fn: Callable[[], torch.Tensor], device: torch.device
                            ) -> tuple[torch.Tensor, _CudaGraph | None, torch.Tensor | None, str | None]:
        """(the warm-up's result, the graph, its static output, None), or (result, None, None, the error)."""
        with torch.cuda.device(device):  # the graph's memory comes from this device's allocator
            if self.stream is None:
                self.stream = torch.cuda.Stream(device)
                self.pool = torch.cuda.graph_pool_handle()  # one pool per owner: its graphs replay one at a time
            current = torch.cuda.current_stream(device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                result = fn()
            current.wait_stream(self.stream)
            result = result.clone()  # made on the main stream: its memory is not the capture stream's to reuse
            graph = _CudaGraph(self.pool, self.stream)
            try:
                out = graph.capture(fn)
            except Exception as e:  # an op that cannot be captured: the caller runs this shape without a graph
                torch.cuda.synchronize(device)
                return result, None, None, f"{type(e).__name__}: {e}"
            return result, graph, out, None


class _Captured:
    def __init__(self, graph, x, t, inputs, cos, sin):
        self.graph, self.x, self.t, self.inputs, self.cos, self.sin = graph, x, t, inputs, cos, sin
        self.out: torch.Tensor | None = None


class _TextSlot:
    def __init__(self, text: TextContext):
        self.static = TextContext([(k.clone(), v.clone()) for k, v in text.kv])
        self.serial = text.serial

    def load(self, text: TextContext) -> None:
        if text.serial == self.serial:
            return
        torch._foreach_copy_([t for kv in self.static.kv for t in kv], [t for kv in text.kv for t in kv])
        self.serial = text.serial


class GraphedForward:
    """`model(x, t, text, layout=layout, **inputs).sample`, replayed from a graph per (shapes, slot).

    Use it for inference with a fixed set of shapes (the pyramid stages of a chunk): each new shape costs a
    capture (a normal forward plus the host's walk through the blocks once more). Not for context-parallel
    models (their collectives are not captured here) or training.
    """

    def __init__(self, model: HeliosTransformer, replay: str = "cuda", max_graphs: int = 24):
        if replay not in ("cuda", "host"):
            raise ValueError(f"replay must be 'cuda' or 'host', got {replay!r}")
        self.model = model
        self.replay = replay
        # A server taking many frame sizes would otherwise keep a graph (and its memory) for each: past this
        # many, new shapes run without a graph. 24: three pyramid stages x two prompt slots x four sizes.
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.failed: dict[tuple, str] = {}  # shapes whose capture raised: they run without a graph
        self.texts: dict[tuple, _TextSlot] = {}
        self._capture_stream = _CaptureStream()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: TextContext, layout: TokenLayout,
                 inputs: dict[str, torch.Tensor], slot: int = 0) -> torch.Tensor:
        kv0 = text.kv[0][0]
        text_key = (slot, tuple(kv0.shape), kv0.dtype, len(text.kv))
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, layout.num_history, layout.noisy_grid,
               tuple(layout.cos.shape), tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())),
               text_key)
        captured = self.graphs.get(key)
        if captured is None:
            if key in self.failed or len(self.graphs) >= self.max_graphs:
                return self.model(x, t, text, layout=layout, **inputs).sample
            return self._capture(key, text_key, x, t, text, layout, inputs)
        captured.x.copy_(x)
        captured.t.copy_(t)
        captured.cos.copy_(layout.cos)
        captured.sin.copy_(layout.sin)
        for k, v in inputs.items():
            captured.inputs[k].copy_(v)
        self.texts[text_key].load(text)
        captured.graph.replay()
        return captured.out.clone()  # the next replay overwrites the static output; multistep solvers keep it

    def _capture(self, key, text_key, x, t, text, layout, inputs) -> torch.Tensor:
        model = self.model
        if text_key not in self.texts:
            self.texts[text_key] = _TextSlot(text)
        slot = self.texts[text_key]
        slot.load(text)
        static = _Captured(None, x.clone(), t.clone(), {k: v.clone() for k, v in inputs.items()},
                           layout.cos.clone(), layout.sin.clone())
        static_layout = TokenLayout(static.cos, static.sin, layout.num_history, layout.noisy_grid, layout.parallel)

        def forward() -> torch.Tensor:
            return model(static.x, static.t, slot.static, layout=static_layout, **static.inputs).sample

        if self.replay == "host":
            static.graph = _HostGraph()
            static.out = static.graph.capture(forward)
            self.graphs[key] = static
            return static.out.clone()
        result, graph, out, error = self._capture_stream.warm_up_and_capture(forward, x.device)
        if error is not None:  # this shape runs without a graph from now on
            self.failed[key] = error
            log.warning("CUDA graph capture failed for shape %s (%s); running it without a graph",
                        tuple(x.shape), error[:200])
            return result
        static.graph, static.out = graph, out
        self.graphs[key] = static
        return result


class GraphedDecode:
    """`decoder.decode(z)` (helios.model.wan_vae) replayed from one CUDA graph per latent shape.

    A decode launches a few hundred kernels; replayed as a graph they leave no gaps on the device, which
    matters most while the decode shares the GPU with the next chunk's denoising. The graphs have their own
    memory pool (not the transformer's): the decode runs on a side stream at the same time as its forwards.
    The output is copied out of the graph's static buffer, so a caller may keep it.
    """

    def __init__(self, decoder, replay: str = "cuda", max_graphs: int = 4):
        if replay not in ("cuda", "host"):
            raise ValueError(f"replay must be 'cuda' or 'host', got {replay!r}")
        self.decoder, self.replay, self.max_graphs = decoder, replay, max_graphs
        self.graphs: dict[tuple, tuple[object, torch.Tensor, torch.Tensor]] = {}
        self.failed: set[tuple] = set()
        self._capture_stream = _CaptureStream()  # its own pool: the decode overlaps the transformer's replays

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        key = (tuple(z.shape), z.dtype, z.device)
        entry = self.graphs.get(key)
        if entry is None:
            if key in self.failed or len(self.graphs) >= self.max_graphs:
                return self.decoder.decode(z)
            return self._capture(key, z)
        graph, static_z, out = entry
        static_z.copy_(z)
        graph.replay()
        return out.clone()

    def _capture(self, key: tuple, z: torch.Tensor) -> torch.Tensor:
        static_z = z.clone()
        decode = lambda: self.decoder.decode(static_z)  # noqa: E731
        if self.replay == "host":
            graph = _HostGraph()
            out = graph.capture(decode)
            self.graphs[key] = (graph, static_z, out)
            return out.clone()
        result, graph, out, error = self._capture_stream.warm_up_and_capture(decode, z.device)
        if error is not None:  # decode this shape without a graph from now on
            self.failed.add(key)
            log.warning("CUDA graph capture of the VAE decode failed for %s (%s); decoding without a graph",
                        tuple(z.shape), error[:200])
            return result
        self.graphs[key] = (graph, static_z, out)
        return result
