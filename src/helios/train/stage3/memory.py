"""Stage 3 on one GPU: what keeps the official sizes (14B, LoRA r256 on G and the critic, heads of width
768) inside 80 GB without changing the update (docs/distillation.md, "Memory at 14B").

* :class:`BaseResidency` - the two frozen bf16 bases (G's and the critic's) take turns on the GPU: the
  idle one lives in page-locked host memory and comes back (one host-to-device copy) when its model
  runs next. Only frozen weights move; the values the GPU computes with are the same bytes.
* :class:`HostAdamW` - ``torch.optim.AdamW`` whose moments live in page-locked host memory: each step
  brings them to the device a chunk at a time (:func:`round_trip`: uploads on one copy stream,
  downloads on another, overlapping each other and the update), runs AdamW's own step on that chunk
  and copies them back. Same kernels on the same device as the plain optimiser, so the same numbers.
* :class:`HostEMA` - the generator's EMA in page-locked host memory, updated on the device the same way.

:class:`MemoryConfig` holds the recipe switches (``distill.memory``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn

from helios.model.offload import PinnedArena

__all__ = ["MemoryConfig", "memory_options_on", "BaseResidency", "HostAdamW", "HostEMA", "PinnedArena",
           "CudaLink", "Link", "chunks_by_bytes", "round_trip", "update_ema"]

PLACES = ("gpu", "host")


@dataclass(frozen=True)
class MemoryConfig:
    """``distill.memory``: where the idle frozen base, the AdamW moments and the EMA live between uses."""

    idle_base: str = "gpu"
    optimizer_states: str = "gpu"
    ema: str = "gpu"
    chunk_mib: int = 512  # size of one host <-> device round trip of states / EMA

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any]) -> "MemoryConfig":
        m = dict((recipe.get("distill") or {}).get("memory") or {})
        out = cls(**{k: m[k] for k in ("idle_base", "optimizer_states", "ema", "chunk_mib") if k in m})
        for key in ("idle_base", "optimizer_states", "ema"):
            if getattr(out, key) not in PLACES:
                raise ValueError(f"distill.memory.{key} = {getattr(out, key)!r}: must be one of {PLACES}")
        if out.chunk_mib < 1:
            raise ValueError(f"distill.memory.chunk_mib = {out.chunk_mib}: must be >= 1")
        return out

    @property
    def any_host(self) -> bool:
        return "host" in (self.idle_base, self.optimizer_states, self.ema)


def memory_options_on(cfg: dict[str, Any]) -> bool:
    """Whether a training config moves anything to host memory (a bad value is left to the stage to report)."""
    try:
        return MemoryConfig.from_recipe(cfg).any_host
    except (TypeError, ValueError):
        return False


def chunks_by_bytes(sizes: Sequence[int], limit: int) -> list[range]:
    """Consecutive index ranges whose ``sizes`` add up to at most ``limit`` (one item above it stands alone)."""
    out, start, total = [], 0, 0
    for i, s in enumerate(sizes):
        if i > start and total + s > limit:
            out.append(range(start, i))
            start, total = i, 0
        total += s
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


class Link(Protocol):
    """How :func:`round_trip` moves a chunk between host and device (:class:`CudaLink` on CUDA; tests
    pass one that defers every copy, as an asynchronous device would)."""

    def upload(self, host: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Device copies of ``host`` (maybe still in flight) and a token that says when they are complete."""

    def begin(self, ready: Any) -> None:
        """What the update runs after waits for the upload behind ``ready``."""

    def download(self, host: list[torch.Tensor], dev: list[torch.Tensor]) -> None:
        """Copy ``dev`` back into ``host`` after the update queued so far."""

    def finish(self) -> None:
        """Block until every download has reached the host."""


_COPY_STREAMS: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}


def _copy_streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """One upload and one download stream per device, kept: the chunks' device memory, cached by the
    allocator per stream, is reused by the next round trip instead of piling up on new streams."""
    device = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _COPY_STREAMS[device]


def reserve_copy_streams(devices: Iterable[torch.device]) -> None:
    """Make the copy streams of these CUDA devices now, while the device has memory to spare: a stream made
    later, with the caching allocator holding the card, failed with out of memory (an 80 GB H100 at the
    official stage-3 sizes, 2026-12-06)."""
    for device in {d for d in devices if d.type == "cuda"}:
        _copy_streams(device)


class CudaLink:
    """Uploads on one stream and downloads on another (two copy engines: a chunk's download overlaps the
    next chunk's upload), ordered against the compute stream (the current one) by events:

    * an upload waits for the compute stream's work so far and for the last download queued: its device
      memory is allocated on the upload stream and may be that of a chunk freed once its download was
      queued (the allocator reuses a stream's freed blocks at once, in that stream's order);
    * the update (on the compute stream) waits for its chunk's upload;
    * a download waits for the compute stream, i.e. for its chunk's update.
    ``round_trip`` frees a chunk only after queueing its download, so at most two chunks' memory is live."""

    def __init__(self, device: torch.device):
        self.device = device
        self.compute = torch.cuda.current_stream(device)
        self.up, self.down = _copy_streams(device)
        self.downloaded: torch.cuda.Event | None = None

    def upload(self, host: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        self.up.wait_stream(self.compute)
        if self.downloaded is not None:
            self.up.wait_event(self.downloaded)
        with torch.cuda.stream(self.up):
            dev = [t.to(self.device, non_blocking=True) for t in host]
        return dev, self.up.record_event()

    def begin(self, ready: torch.cuda.Event) -> None:
        self.compute.wait_event(ready)

    def download(self, host: list[torch.Tensor], dev: list[torch.Tensor]) -> None:
        self.down.wait_stream(self.compute)
        with torch.cuda.stream(self.down):
            for h, d in zip(host, dev):
                h.copy_(d, non_blocking=True)
        self.downloaded = self.down.record_event()

    def finish(self) -> None:
        self.down.synchronize()


def round_trip(host: Sequence[Sequence[torch.Tensor]], device: torch.device, chunk_bytes: int,
               update: Callable[[range, list[list[torch.Tensor]]], None], link: Link | None = None) -> None:
    """Update host tensors on ``device``, a chunk of items at a time: item ``i``'s tensors ``host[i]`` are
    uploaded, ``update(indices, device_tensors)`` changes the device copies in place (on the current
    stream) and they are copied back; the next chunk's upload is queued before the current chunk's
    update (``link``: by default :class:`CudaLink` on CUDA). The host tensors are complete when this
    returns, also when ``update`` raises. Without a link on the CPU the update works on the host
    tensors themselves."""
    ranges = chunks_by_bytes([sum(t.numel() * t.element_size() for t in ts) for ts in host], chunk_bytes)
    if link is None and device.type != "cuda":
        for r in ranges:
            update(r, [list(host[i]) for i in r])
        return
    link = link if link is not None else CudaLink(device)

    def upload(k: int) -> tuple[list[torch.Tensor], Any] | None:
        return link.upload([t for i in ranges[k] for t in host[i]]) if k < len(ranges) else None

    try:
        nxt = upload(0)
        for k, r in enumerate(ranges):
            flat, ready = nxt
            nxt = upload(k + 1)  # queued before this chunk's update: it overlaps it
            link.begin(ready)
            dev, pos = [], 0
            for i in r:
                dev.append(flat[pos:pos + len(host[i])])
                pos += len(host[i])
            update(r, dev)
            link.download([t for i in r for t in host[i]], flat)
            del flat, dev  # only now may its memory go to a later upload
    finally:
        link.finish()


class BaseResidency:
    """At most one of several models' frozen weights on the device at a time.

    ``use(name)`` makes model ``name``'s frozen parameters resident (copied back from their host copy)
    and frees the other models' frozen parameters (their storage resized to zero: every tensor that
    shares it, autograd's saved weights included, sees the bytes again after the next ``use``).
    Trainable parameters (LoRA, heads) never move. A frozen parameter read while its model is out
    fails loudly (a zero-size storage). ``enabled=False``: everything stays resident, ``use`` does nothing.

    The copies back run on the current stream (as the models' kernels do), so the storage freed here is
    reused only by work queued after the kernels that read it. ``uploads`` / ``uploaded_bytes`` count them."""

    def __init__(self, models: dict[str, nn.Module], enabled: bool = True, pin: bool | None = None):
        self.enabled, self.current = enabled, None
        self.arena = PinnedArena(pin=pin)
        self.uploads, self.uploaded_bytes = 0, 0
        self._frozen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if not enabled:
            return
        seen: set[int] = set()
        for name, model in models.items():
            pairs = []
            for p in model.parameters():
                storage = p.untyped_storage()
                whole = p.storage_offset() == 0 and storage.nbytes() == p.numel() * p.element_size()
                if p.requires_grad or not whole or storage.data_ptr() in seen:
                    continue  # trainable, a view into a bigger storage, or already listed: stays resident
                seen.add(storage.data_ptr())
                pairs.append((p, self.arena.copy(p)))
            self._frozen[name] = pairs
        self.current = "all"

    def frozen_bytes(self, name: str) -> int:
        return sum(h.numel() * h.element_size() for _, h in self._frozen.get(name, []))

    def use(self, name: str) -> None:
        if not self.enabled or self.current == name:
            return
        if name not in self._frozen:
            raise KeyError(f"no model named {name!r}; known: {sorted(self._frozen)}")
        with torch.no_grad():
            for other, pairs in self._frozen.items():
                if other != name:
                    for p, _ in pairs:
                        p.data.untyped_storage().resize_(0)
            if self.current != "all":
                for p, h in self._frozen[name]:
                    p.data.untyped_storage().resize_(h.numel() * h.element_size())
                    p.data.copy_(h, non_blocking=True)  # via .data: no version bump for saved tensors
                self.uploads += 1
                self.uploaded_bytes += self.frozen_bytes(name)
        self.current = name


class HostAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with ``exp_avg`` / ``exp_avg_sq`` in (page-locked) host memory between steps.

    ``step`` runs AdamW's own step on chunks of the parameters (about ``chunk_bytes`` of moments each)
    with their moments brought to the parameters' device for it (:func:`round_trip`): the same
    implementation on the same device as the plain optimiser, element by element, so the parameters and
    states equal the plain path's exactly. ``state_dict`` / checkpoints see ordinary host tensors."""

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, chunk_bytes: int = 512 * 2**20, pin: bool | None = None,
                 link: Callable[[torch.device], Link] | None = None, **kwargs: Any):
        if kwargs.get("amsgrad") or kwargs.get("fused") or kwargs.get("capturable"):
            raise ValueError("HostAdamW supports plain AdamW only (no amsgrad, fused or capturable)")
        super().__init__(params, **kwargs)
        self.chunk_bytes = int(chunk_bytes)
        self.arena = PinnedArena(pin=pin)
        self.link = link  # round_trip's link per device (default: CudaLink on CUDA)
        reserve_copy_streams(p.device for g in self.param_groups for p in g["params"])

    def zero_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state AdamW makes at a parameter's first update (step 0, zero moments), in host memory."""
        step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        return {"step": torch.tensor(0.0, dtype=step_dtype, device="cpu"), "exp_avg": self.arena.zeros_like(p),
                "exp_avg_sq": self.arena.zeros_like(p)}

    def states_to_host(self) -> None:
        """Moments that are elsewhere (after ``load_state_dict``, which puts them on the parameters'
        device) go to host memory."""
        for st in self.state.values():
            for k in self.MOMENTS:
                if k in st and (st[k].device.type != "cpu" or (self.arena.pin and not st[k].is_pinned())):
                    st[k] = self.arena.copy(st[k])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.states_to_host()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError("HostAdamW.step takes no closure")
        self.states_to_host()
        for gi, group in enumerate(self.param_groups):
            live = [p for p in group["params"] if p.grad is not None]
            for p in live:
                if not self.state[p]:
                    self.state[p] = self.zero_state(p)
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in live:
                by_device.setdefault(p.device, []).append(p)
            for device, ps in by_device.items():
                host = [[self.state[p][k] for k in self.MOMENTS] for p in ps]
                round_trip(host, device, self.chunk_bytes,
                           lambda r, dev, ps=ps, gi=gi: self._step_chunk(gi, ps, r, dev),
                           self.link(device) if self.link else None)

    def _step_chunk(self, gi: int, ps: list[torch.Tensor], r: range, dev: list[list[torch.Tensor]]) -> None:
        """AdamW's own step on ``ps[r]`` of group ``gi`` alone, with the device copies of their moments."""
        chunk = [ps[i] for i in r]
        saved_host = [{k: self.state[p][k] for k in self.MOMENTS} for p in chunk]
        saved_params = [g["params"] for g in self.param_groups]
        try:
            for p, ts in zip(chunk, dev):
                self.state[p].update(dict(zip(self.MOMENTS, ts)))
            for j, g in enumerate(self.param_groups):
                g["params"] = chunk if j == gi else []
            super().step()
        finally:
            for g, params in zip(self.param_groups, saved_params):
                g["params"] = params
            for p, h in zip(chunk, saved_host):
                self.state[p].update(h)


class HostEMA(dict):
    """The EMA of named parameters (a dict name -> tensor, as the trainer's and checkpoints use), kept
    in (page-locked) host memory and updated on the parameters' device a chunk at a time (same
    ``copy_`` / ``lerp_`` kernels as the resident EMA, so the same numbers)."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]], chunk_bytes: int = 512 * 2**20,
                 pin: bool | None = None, link: Callable[[torch.device], Link] | None = None):
        self.arena = PinnedArena(pin=pin)
        named = list(named)
        super().__init__((n, self.arena.copy(p)) for n, p in named)
        self.chunk_bytes = int(chunk_bytes)
        self.link = link
        reserve_copy_streams(p.device for _, p in named)

    @torch.no_grad()
    def follow(self, named: Sequence[tuple[str, torch.Tensor]], decay: float) -> None:
        """``ema = p`` when ``decay == 0``, else ``ema.lerp_(p, 1 - decay)`` (the trainer's EMA)."""
        by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for n, p in named:
            by_device.setdefault(p.device, []).append((n, p))
        for device, items in by_device.items():
            def step(r: range, dev: list[list[torch.Tensor]], items=items) -> None:
                for i, (e,) in zip(r, dev):
                    p = items[i][1].detach()
                    e.copy_(p) if decay == 0.0 else e.lerp_(p, 1.0 - decay)
            round_trip([[self[n]] for n, _ in items], device, self.chunk_bytes, step,
                       self.link(device) if self.link else None)


def update_ema(ema: dict[str, torch.Tensor], named: Sequence[tuple[str, torch.Tensor]], decay: float) -> None:
    """One EMA update of ``ema`` (resident dict or :class:`HostEMA`) towards the parameters ``named``."""
    if isinstance(ema, HostEMA):
        ema.follow(named, decay)
        return
    with torch.no_grad():
        for n, p in named:
            if decay == 0.0:
                ema[n].copy_(p.detach())
            else:
                ema[n].lerp_(p.detach(), 1.0 - decay)
