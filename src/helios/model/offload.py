"""Weights that live on the host and visit the GPU only while they run.

Two mechanisms, for the two large models of a pipeline:

- `BlockRing`: the transformer's blocks stay in page-locked host memory, one flat buffer per block, and
  run on the device through a ring of `size` resident copies. While block i computes on the current
  stream, the blocks after it are copied into the other slots on a side stream (one copy per block);
  a slot is refilled only once the block in it has finished. The order is cyclic (0..N-1, then 0 again),
  so the next forward's first blocks are already on their way while the last ones run. The values are
  the same numbers in the same dtype, so a streamed forward equals the resident one exactly.
- `stream_layers_`: for a model run rarely (the text encoder, once per prompt), hooks that move each
  layer's weights to the device just before it runs and drop the device copy right after.

Pinned memory: copies from page-locked buffers run at the link's bandwidth (51.7 GiB/s measured on an
H200 against 7.9 from pageable memory) and can overlap compute; pageable ones cannot. It comes from a
`PinnedArena`, which packs many buffers into few page-locked blocks (the CUDA host allocator rounds each
allocation up to a power of two: a 358 MB FP8 block alone would take 512 MB).
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Iterator, Sequence

import torch
import torch.nn as nn

ALIGN = 256  # bytes: every tensor in a flat buffer starts on a boundary any kernel accepts


def module_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `module`, in a fixed order (the flat-buffer layout's order)."""
    named = list(module.named_parameters(recurse=True)) + list(module.named_buffers(recurse=True))
    return sorted(named, key=lambda kv: kv[0])


def flat_layout(module: nn.Module) -> tuple[list[tuple[str, int, int]], int]:
    """[(name, byte offset, bytes)] of `module`'s tensors packed in one buffer, and the buffer's size."""
    layout, offset = [], 0
    for name, t in module_tensors(module):
        nbytes = t.numel() * t.element_size()
        layout.append((name, offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return layout, offset


class PinnedArena:
    """Host tensors carved out of page-locked blocks. The CUDA host allocator rounds every allocation up to a
    power of two, so one allocation per tensor (or per streamed block) wastes up to half of the pinned memory;
    here the waste is a block's tail. Without a hint each new block is `block_bytes`, and a larger request gets
    a block of its own. `expected_bytes`, what the caller will ask for in all, sizes each new block to the
    largest power of two that the rest still fills, so the tails stay small (40 FP8 blocks of 358 MB: 14.5 GiB
    pinned for 13.3 GiB, against 20 GiB one by one). `reserved_bytes` counts what the host allocator takes.
    pin=False (default: without CUDA) gives ordinary host tensors. Always on the CPU, also inside a
    `torch.device` context."""

    ALIGN = 512

    def __init__(self, block_bytes: int = 2**30, expected_bytes: int = 0, pin: bool | None = None):
        self.block_bytes = int(block_bytes)
        self.expected = int(expected_bytes)  # still to be asked for, when hinted
        self.hinted = self.expected > 0
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self._block: torch.Tensor | None = None
        self._used = 0
        self.reserved_bytes = 0

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if not self.pin:
            return torch.empty(tuple(shape), dtype=dtype, device="cpu")
        n = torch.Size(shape).numel() * dtype.itemsize
        if n > self.block_bytes and not self.hinted:  # on its own; the current block stays open
            lone = self._pinned(power_of_two_above(n))
            self.reserved_bytes += lone.numel()
            return lone[:n].view(dtype).view(tuple(shape))
        start = -(-self._used // self.ALIGN) * self.ALIGN
        if self._block is None or start + n > self._block.numel():
            self._block = self._pinned(self.next_block_bytes(n))
            self.reserved_bytes += self._block.numel()
            start = 0
        self._used = start + n
        self.expected = max(0, self.expected - n)
        return self._block[start:start + n].view(dtype).view(tuple(shape))

    def next_block_bytes(self, n: int) -> int:
        """The size of the block opened for a request of n bytes that does not fit the current one."""
        if self.hinted:  # the largest power of two that the rest (this request included) fills
            return max(power_of_two_above(n), 1 << max(self.expected, n).bit_length() - 1)
        return max(power_of_two_above(n), self.block_bytes)

    def _pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        out = self.empty(t.shape, t.dtype)
        out.copy_(t.detach())
        return out

    def zeros_like(self, t: torch.Tensor) -> torch.Tensor:
        return self.empty(t.shape, t.dtype).zero_()


def power_of_two_above(n: int) -> int:
    """The smallest power of two >= n: what the CUDA host allocator takes for a request of n bytes."""
    return 1 << max(0, n - 1).bit_length()


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def materialize_flat_(module: nn.Module, device: torch.device | str,
                      arena: PinnedArena | None = None) -> torch.Tensor:
    """Give every tensor of `module` (e.g. on the meta device) storage in one new flat byte buffer on
    `device` (on the host from `arena`, if given), uninitialised; returns the buffer. Shapes and dtypes are kept."""
    layout, total = flat_layout(module)
    flat = arena.empty((total,), torch.uint8) if arena is not None else \
        torch.empty(total, dtype=torch.uint8, device=device)
    tensors = dict(module_tensors(module))
    for name, offset, nbytes in layout:
        t = tensors[name]
        view = flat[offset:offset + nbytes].view(t.dtype).view(t.shape)
        _set_tensor(module, name, view)
    return flat


def flat_buffer(module: nn.Module) -> torch.Tensor | None:
    """The flat buffer `materialize_flat_` gave `module` (a view: it may lie inside a larger block of a
    `PinnedArena`), or None if its tensors are not packed in one."""
    tensors = module_tensors(module)
    if not tensors:
        return None
    layout, total = flat_layout(module)
    first = tensors[0][1]
    storage = first.untyped_storage()
    start = first.storage_offset() * first.element_size()  # where the layout's byte 0 is
    for (_, offset, _), (_, t) in zip(layout, tensors):
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or not t.is_contiguous()
                or t.storage_offset() * t.element_size() != start + offset):
            return None
    if start + total > storage.nbytes():
        return None
    return torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, start, (total,), (1,))


class BlockRing:
    """Runs `blocks` (host-resident, each packed by `materialize_flat_`) through `size` device slots.

    `blocks()` is a generator over the resident copies, in order: the caller runs each one before
    asking for the next (the transformer's forward and `prepare_text` do, through
    `HeliosTransformer.iter_blocks`). `max_resident` records the most blocks that were ever in the
    ring at once (loaded, loading or running): at most `size` by construction, checked by the tests.
    """

    def __init__(self, blocks: Sequence[nn.Module], size: int, device: torch.device | str):
        if size < 1:
            raise ValueError(f"the ring needs at least one slot, got {size}")
        self.host = list(blocks)
        self.device = torch.device(device)
        self.size = min(size, len(self.host))
        self.host_flat = [flat_buffer(b) for b in self.host]
        if any(f is None for f in self.host_flat):
            raise ValueError("every streamed block must hold its tensors in one flat buffer (materialize_flat_)")
        self.slots = [self._resident_copy(self.host[0]) for _ in range(self.size)]
        self.slot_flat = [flat_buffer(s) for s in self.slots]
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.loaded = [self._event() for _ in range(self.size)]  # slot's copy done
        self.freed = [self._event() for _ in range(self.size)]  # slot's block done computing
        self.queue: deque[tuple[int, int]] = deque()  # (block, slot) loaded or loading, in run order
        self.free_slots: deque[int] = deque(range(self.size))
        self.next_load = 0
        self.loads = 0
        self.max_resident = 0

    @property
    def slot_bytes(self) -> int:
        return self.slot_flat[0].numel()

    def _event(self):
        return torch.cuda.Event() if self.cuda else None

    def _resident_copy(self, block: nn.Module) -> nn.Module:
        """A module like `block` whose tensors live in one flat buffer on the device (values unset)."""
        memo: dict[int, object] = {}
        for _, t in module_tensors(block):  # deepcopy takes these instead of copying the host tensors
            memo[id(t)] = torch.empty(0, dtype=t.dtype)
        clone = copy.deepcopy(block, memo)
        for name, t in module_tensors(block):
            _set_tensor(clone, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        materialize_flat_(clone, self.device)
        return clone.requires_grad_(False)

    def _issue_load(self) -> None:
        slot = self.free_slots.popleft()
        block = self.next_load
        self.next_load = (block + 1) % len(self.host)
        src, dst = self.host_flat[block], self.slot_flat[slot]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.freed[slot])  # the block in this slot has finished
                dst.copy_(src, non_blocking=True)
                self.loaded[slot].record(self.copy_stream)
        else:
            dst.copy_(src)
        self.queue.append((block, slot))
        self.loads += 1
        self.max_resident = max(self.max_resident, len(self.queue))

    def _restart_at_zero(self) -> None:
        """After a pass that stopped early: forget what is in the ring and load from block 0."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.queue.clear()
        self.free_slots = deque(range(self.size))
        self.next_load = 0

    def blocks(self) -> Iterator[nn.Module]:
        if self.queue and self.queue[0][0] != 0:
            self._restart_at_zero()
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        for i in range(len(self.host)):
            while self.free_slots and len(self.queue) < self.size:
                self._issue_load()
            block, slot = self.queue[0]
            assert block == i, f"ring out of order: block {block} is next, block {i} was asked for"
            if main is not None:
                main.wait_event(self.loaded[slot])
            yield self.slots[slot]
            # The block's kernels are queued: its slot may be refilled once they have run.
            self.queue.popleft()
            if main is not None:
                self.freed[slot].record(main)
            self.free_slots.append(slot)
        while self.free_slots and len(self.queue) < self.size:  # the next pass's first blocks, ahead
            self._issue_load()

    def compile_(self, **options) -> "BlockRing":
        for s in self.slots:
            s.compile(dynamic=False, **options)
        return self


def pack_on_host_(blocks: Sequence[nn.Module], pin: bool) -> None:
    """Move each block's tensors into one flat host buffer of its own (page-locked if `pin`), the layout a
    BlockRing streams from, values kept; the copies they had elsewhere (a GPU) are freed."""
    arena = PinnedArena(expected_bytes=sum(flat_layout(b)[1] for b in blocks), pin=pin)
    for block in blocks:
        before = dict(module_tensors(block))
        materialize_flat_(block, "cpu", arena)
        for name, t in module_tensors(block):
            t.copy_(before[name])


def enable_block_streaming(model: nn.Module, size: int, device: torch.device | str) -> BlockRing:
    """Stream `model.blocks` through a ring of `size` device slots. Blocks not yet packed on the host (a model
    loaded resident) are packed first (`pack_on_host_`): the same weights, streamed."""
    device = torch.device(device)
    packed = [flat_buffer(b) for b in model.blocks]
    if any(f is None or f.device.type != "cpu" for f in packed):
        pack_on_host_(model.blocks, pin=device.type == "cuda")
    ring = BlockRing(model.blocks, size, device)
    model.block_stream = ring
    return ring


# ----------------------------------------------------------------------------------------------
# a rarely run model, layer by layer


def stream_layers_(layers: Sequence[nn.Module], device: torch.device | str, pin: bool = True) -> None:
    """Keep each layer's weights on the host and move them to `device` only for its forward.

    The inputs a layer receives are moved to `device` too, so a model whose embedding stays on the host
    (a 256k-token table is cheap to look up where it is) hands its activations over at the first layer.
    """
    device = torch.device(device)
    pin = pin and device.type == "cuda"
    tensors = [module_tensors(layer) for layer in layers]
    to_pin = [t for named in tensors for _, t in named if pin and not t.is_pinned()]
    arena = PinnedArena(expected_bytes=sum(t.numel() * t.element_size() for t in to_pin), pin=True)
    for layer, named in zip(layers, tensors):
        host = {name: (arena.copy(t) if pin and not t.is_pinned() else t) for name, t in named}
        for name, t in host.items():
            _set_tensor(layer, name, t)
        layer.register_forward_pre_hook(_to_device_hook(host, device), with_kwargs=True)
        layer.register_forward_hook(_back_to_host_hook(host))


def _move(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _to_device_hook(host: dict[str, torch.Tensor], device: torch.device):
    def hook(module, args, kwargs):
        for name, t in host.items():
            _set_tensor(module, name, t.to(device, non_blocking=True))
        return _move(args, device), _move(kwargs, device)
    return hook


def _back_to_host_hook(host: dict[str, torch.Tensor]):
    def hook(module, args, output):
        for name, t in host.items():
            _set_tensor(module, name, t)
        return output
    return hook
