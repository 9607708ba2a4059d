"""Memory plans: what runs where so that generation fits a GPU memory budget (`--memory 24gb|12gb|auto`).

Plans, fastest first; a budget takes the first one whose estimated peak fits:

- `resident`: every weight on the GPU in the model dtype (FP8 matmuls if asked), the text encoder too,
  each chunk decoded in one pass on a side stream while the next chunk is denoised. What an 80 GB card runs.
- `fp8`: the transformer's blocks in FP8, loaded shard by shard straight into FP8 (never the whole bf16
  model anywhere); the text encoder's weights in page-locked host memory, streamed through the GPU layer
  by layer when a prompt changes (prompt embeddings are cached per prompt, so that is rare); the VAE
  decode in slices of a few latent frames, after each chunk's denoising rather than beside the next one's.
  Fits a 24 GB card at 384x640.
- `streamed`: as `fp8`, and the transformer's blocks also stay in page-locked host memory, streamed
  through a ring of a few resident blocks on a side stream while the previous blocks compute
  (helios.model.offload); no CUDA graphs (the ring's copies and events live outside any graph).
  Fits a 12 GB card.

On a card without FP8 matmuls (before sm89) the weights stay in bf16 and the same plans apply.

Estimates (bytes, all from the model's configs and safetensors headers, nothing loaded): weights per
dtype exactly as the loader lays them out; the text encoder's K/V of every layer; one forward's
activations at the largest pyramid stage (per token: the FFN's hidden width in bf16 or its FP8
quantisation temporaries, and a few float32 copies of the residual for the norms and gated adds); the
VAE decode's working set, measured at about 1.9 KB per output pixel per frame for a whole chunk on an
H200 with the per-tap partial sums summed at once (benchmarks/NOTES.md: 15.6 GB for 33 frames at
384x640; a budget never defers them), scaled by the frames of one slice; the text encoder's resident
layer or whole model.

Whether the decode's and the denoising's working sets count together: under `resident` the decode of
chunk k runs on a side stream beside the denoising of chunk k+1 (`overlap_decode`), and PyTorch's caching
allocator keeps what a stream frees for that stream, so both are reserved at once. The budget plans decode
after each chunk's denoising on the same stream, so a streamed plan counts the larger of the two only;
a plan with CUDA graphs still counts both, as the graphs keep the forward's activations in their private
pool between replays. A budget keeps back a margin (CUDA context, fragmentation): max(1 GiB, 1/12 of the
budget), so "24gb" plans to 22 GiB of reserved memory and "12gb" to 11 GiB. docs/memory.md has the
measured figures these are checked against.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helios.engine.history import HistoryLayout
from helios.model.config import HeliosConfig

GiB = 2**30
TEXT_LENGTH = 512
# Whole-chunk decode working set / (frames x H x W), per-tap sums not deferred: 15.6e9 / (33 x 384 x 640),
# H200 2026-12-03, benchmarks/NOTES.md (deferring them raised it to 21.7 GB).
VAE_BYTES_PER_OUTPUT_PIXEL = 1925.0
DECODE_SLICES = (9, 4, 2, 1)  # latent frames per decode call that plans try, largest first
RING_SIZES = (3, 2)  # resident blocks under streaming
# A streamed plan is for the smallest cards: its decode slices stay small, where the estimate leaves the most
# room for what it does not count (fragmentation, the tuning's temporaries at warm-up).
STREAMED_DECODE_SLICES = (2, 1)
CUDA_CONTEXT = int(0.5 * GiB)  # what a process's CUDA context takes outside the caching allocator


class MemoryBudgetError(ValueError):
    """A memory budget that no plan fits; the message gives the figure needed and the options that fit."""


@dataclass(frozen=True)
class Budget:
    name: str  # as given: "24gb", "12gb", "auto (23.1 GiB free)"
    total: int  # bytes of the card (or free, for auto)
    margin: int  # kept back for the CUDA context and fragmentation

    @property
    def usable(self) -> int:
        """Bytes a plan's estimated peak may reach (what `max_memory_reserved` should stay under)."""
        return self.total - self.margin


def card_budget(gib: float, name: str | None = None) -> Budget:
    total = int(gib * GiB)
    return Budget(name or f"{gib:g}gb", total, max(GiB, total // 12))


def parse_budget(text: str, device: torch.device | str | None = None) -> Budget:
    """'24gb', '12gb', any '<N>gb', or 'auto' (the card's free memory now, less the CUDA context)."""
    text = str(text).strip().lower()
    if text == "auto":
        dev = torch.device(device or "cuda")
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise MemoryBudgetError("--memory auto reads the free memory of a CUDA card; there is none here "
                                    "(on the CPU, leave --memory out)")
        free, _ = torch.cuda.mem_get_info(dev)
        # Free memory already excludes this process's context; the margin is for fragmentation only.
        return Budget(f"auto ({free / GiB:.1f} GiB free)", free, GiB // 2)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*gi?b?", text)
    if not m or float(m.group(1)) <= 0:
        raise MemoryBudgetError(f"--memory must be 24gb, 12gb, another size such as 16gb, or auto; got {text!r}")
    return card_budget(float(m.group(1)), f"{m.group(1)}gb")


# ----------------------------------------------------------------------------------------------
# what a model folder weighs


@dataclass(frozen=True)
class ModelSizes:
    """The sizes a plan's estimate needs, read from configs and safetensors headers (no weights)."""

    config: HeliosConfig
    vae_params: int = 0
    text_params: int = 0  # the whole text encoder
    text_layer_params: int = 0  # its largest layer (one block)
    text_embedding_params: int = 0  # its token embedding (stays on the host when streamed)
    vae_spatial: int = 8
    vae_temporal: int = 4

    @classmethod
    def helios_14b(cls) -> "ModelSizes":
        """The released models' sizes: the 14B transformer, umT5-XXL's encoder (a 256,384 x 4,096 embedding
        and 24 blocks, 5.68B parameters), the Wan VAE (127M). For planning without the folder at hand."""
        text, embedding = 5_680_000_000, 256_384 * 4_096
        return cls(HeliosConfig(), vae_params=127_000_000, text_params=text,
                   text_layer_params=(text - embedding) // 24, text_embedding_params=embedding)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelSizes":
        from helios.model.loading import resolve_transformer_folder

        folder = Path(folder)
        config = HeliosConfig.from_file(resolve_transformer_folder(folder) / "config.json")
        vae = _params_in(folder / "vae")
        text = _params_in(folder / "text_encoder")
        layer = embedding = 0
        cfg_path = folder / "text_encoder" / "config.json"
        if text and cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            embedding = int(cfg.get("vocab_size", 0)) * int(cfg.get("d_model", 0))
            layers = int(cfg.get("num_layers", 1)) or 1
            layer = max(text - embedding, 0) // layers
        spatial = temporal = None
        vae_cfg = folder / "vae" / "config.json"
        if vae_cfg.is_file():
            raw = json.loads(vae_cfg.read_text())
            spatial, temporal = raw.get("scale_factor_spatial"), raw.get("scale_factor_temporal")
        return cls(config, vae, text, layer, embedding, int(spatial or 8), int(temporal or 4))


def _params_in(folder: Path) -> int:
    from helios.model.loading import read_header

    total = 0
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        total += sum(math.prod(shape) for _, shape in read_header(file).values())
    return total


def transformer_bytes(config: HeliosConfig, dtype: torch.dtype, fp8: bool) -> tuple[int, int]:
    """(bytes outside the blocks, bytes of one block) as the loader lays them out (built on meta)."""
    return _transformer_bytes(json.dumps(config.to_dict(), sort_keys=True), dtype, fp8)


@functools.lru_cache(maxsize=32)
def _transformer_bytes(config_json: str, dtype: torch.dtype, fp8: bool) -> tuple[int, int]:
    from helios.model.fp8 import quantize_blocks_
    from helios.model.transformer import build_transformer, cast_keeping_fp32

    one = HeliosConfig.from_dict({**json.loads(config_json), "num_layers": 1})  # the blocks are all alike
    model = cast_keeping_fp32(build_transformer(one, device="meta"), dtype)
    if fp8:
        model.fuse_projections_()
        quantize_blocks_(model)

    def size(module: torch.nn.Module) -> int:
        tensors = list(module.parameters()) + list(module.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    block = size(model.blocks[0])
    return size(model) - block, block


# ----------------------------------------------------------------------------------------------
# plans


@dataclass(frozen=True)
class MemoryPlan:
    name: str  # "resident" | "fp8" | "streamed"
    fp8: bool  # block matmul weights in FP8
    stream_blocks: bool = False
    ring_size: int = 0
    text_encoder: str = "gpu"  # "gpu": resident | "layers": streamed from pinned host memory once per prompt
    decode_slice: int | None = None  # latent frames per VAE decode call; None: the whole chunk
    cuda_graphs: bool = True
    # Each chunk's decode on a side stream beside the next chunk's denoising (the engine's default); off,
    # it runs after the denoising on the same stream, so the two working sets share one memory pool.
    overlap_decode: bool = True

    def describe(self) -> str:
        weights = "FP8" if self.fp8 else "bf16"
        if self.stream_blocks:
            where = (f"transformer blocks in {weights} in pinned host memory, streamed through a ring of "
                     f"{self.ring_size} on the GPU")
        else:
            where = f"transformer in {weights} on the GPU"
        text = ("text encoder on the GPU" if self.text_encoder == "gpu" else
                "text encoder streamed layer by layer when the prompt changes")
        decode = ("VAE decode a chunk at a time" if self.decode_slice is None else
                  f"VAE decode in slices of {self.decode_slice} latent frame{'s' if self.decode_slice > 1 else ''}")
        when = ("overlapped with the next chunk's denoising" if self.overlap_decode else
                "after each chunk's denoising")
        return f"{self.name}: {where}; {text}; {decode} {when}" + ("" if self.cuda_graphs else "; no CUDA graphs")

    @property
    def shared_working_set(self) -> bool:
        """The forward's activations and the decode's working set reuse one pool (see the module's docstring)."""
        return not self.overlap_decode and not self.cuda_graphs


@dataclass
class Estimate:
    """Estimated peak GPU bytes, by part, and the host bytes the plan keeps (pinned weights)."""

    gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.gpu.values())

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.gpu.items() if v)
        host = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.host.items() if v)
        return f"estimated GPU peak {self.total / GiB:.1f} GiB ({parts})" + (f"; host: {host} GiB" if host else "")


def tokens_per_forward(config: HeliosConfig, height: int, width: int, spatial: int = 8,
                       layout: HistoryLayout = HistoryLayout()) -> tuple[int, int]:
    """(history tokens, noisy tokens) of a full-resolution forward at a frame size."""
    pt, ph, pw = config.patch_size
    gh, gw = height // spatial // ph, width // spatial // pw
    long, mid, short = layout.term_sizes
    short += 1 if layout.keep_first_frame else 0
    history = (math.ceil(long / (4 * pt)) * math.ceil(gh / 4) * math.ceil(gw / 4)
               + math.ceil(mid / (2 * pt)) * math.ceil(gh / 2) * math.ceil(gw / 2)
               + math.ceil(short / pt) * gh * gw)
    return history, math.ceil(layout.chunk_frames / pt) * gh * gw


def estimate(plan: MemoryPlan, sizes: ModelSizes, height: int, width: int, guidance: bool = False,
             dtype: torch.dtype = torch.bfloat16) -> Estimate:
    """Estimated peak memory of generating at height x width under `plan` (see the module's docstring)."""
    cfg = sizes.config
    item = torch.tensor([], dtype=dtype).element_size()
    rest, block = transformer_bytes(cfg, dtype, plan.fp8)
    blocks = block * (plan.ring_size if plan.stream_blocks else cfg.num_layers)
    est = Estimate()
    est.gpu["transformer"] = rest + blocks
    slots = (2 if guidance else 1) * (2 if plan.cuda_graphs else 1)  # prompt + negative; graphs' static copy
    est.gpu["text K/V"] = slots * cfg.num_layers * 2 * TEXT_LENGTH * cfg.dim * item
    history, noisy = tokens_per_forward(cfg, height, width, sizes.vae_spatial)
    tokens = history + noisy
    per_token = (11 if plan.fp8 else 4) * cfg.ffn_dim + 24 * cfg.dim  # FFN hidden (+FP8 temporaries), norms
    out_frames = (plan.decode_slice or HistoryLayout().chunk_frames) * sizes.vae_temporal
    decode = int(VAE_BYTES_PER_OUTPUT_PIXEL * out_frames * height * width)
    est.gpu.update(working_sets(plan, tokens * per_token, decode))
    est.gpu["VAE"] = sizes.vae_params * item
    text_gpu = sizes.text_params if plan.text_encoder == "gpu" else sizes.text_layer_params
    est.gpu["text encoder"] = text_gpu * item
    if plan.stream_blocks:
        est.host["pinned blocks"] = block * cfg.num_layers
    if plan.text_encoder == "layers":
        est.host["text encoder"] = sizes.text_params * item
    return est


def working_sets(plan: MemoryPlan, activations: int, decode: int) -> dict[str, int]:
    """The estimate's parts for one forward's activations and one decode call: both, or where the plan runs
    them one after the other in one pool, the larger, named after it."""
    if plan.shared_working_set:
        return {f"working set ({'decode' if decode >= activations else 'activations'})": max(activations, decode)}
    return {"activations": activations, "decode": decode}


def candidate_plans(fp8_ok: bool, fp8_requested: bool = False) -> list[MemoryPlan]:
    """Every plan a budget may take, fastest first."""
    plans = [MemoryPlan("resident", fp8=fp8_requested and fp8_ok)]
    # Under a budget the decode waits for the denoising: overlapped, each stream would keep its own pool.
    for s in DECODE_SLICES:
        plans.append(MemoryPlan("fp8" if fp8_ok else "bf16", fp8=fp8_ok, text_encoder="layers",
                                decode_slice=None if s == DECODE_SLICES[0] else s, overlap_decode=False))
    for ring in RING_SIZES:
        for s in STREAMED_DECODE_SLICES:
            plans.append(MemoryPlan("streamed", fp8=fp8_ok, stream_blocks=True, ring_size=ring,
                                    text_encoder="layers", decode_slice=s, cuda_graphs=False,
                                    overlap_decode=False))
    return plans


def choose_plan(budget: Budget, sizes: ModelSizes, height: int, width: int, guidance: bool = False,
                fp8_ok: bool = True, fp8_requested: bool = False) -> tuple[MemoryPlan, Estimate]:
    """The fastest plan whose estimate fits the budget; MemoryBudgetError, with what would fit, if none."""
    plans = candidate_plans(fp8_ok, fp8_requested)
    for plan in plans:
        est = estimate(plan, sizes, height, width, guidance)
        if est.total <= budget.usable:
            return plan, est
    smallest = plans[-1]
    need = estimate(smallest, sizes, height, width, guidance)
    raise MemoryBudgetError(
        f"--memory {budget.name} leaves {budget.usable / GiB:.1f} GiB for generation, but {width}x{height}"
        f"{' with guidance' if guidance else ''} needs {need.total / GiB:.1f} GiB even with the smallest plan "
        f"({smallest.describe()}). {fitting_options(budget, sizes, height, width, guidance, fp8_ok)}")


def fitting_options(budget: Budget, sizes: ModelSizes, height: int, width: int, guidance: bool,
                    fp8_ok: bool) -> str:
    """A sentence naming frame sizes and budgets that would fit."""
    smallest = candidate_plans(fp8_ok)[-1]
    step = 16 * sizes.vae_spatial // 2  # keep multiples the pyramid accepts
    sizes_fit = []
    for f in (0.83, 0.67, 0.5):
        h, w = max(step, int(height * f) // step * step), max(step, int(width * f) // step * step)
        if (h, w) != (height, width) and estimate(smallest, sizes, h, w, guidance).total <= budget.usable:
            sizes_fit.append(f"--height {h} --width {w}")
    need = estimate(smallest, sizes, height, width, guidance).total
    card = math.ceil((need + max(GiB, need // 11)) / GiB)
    options = []
    if sizes_fit:
        options.append("a smaller frame size (" + " or ".join(sizes_fit[:2]) + ")")
    if guidance:
        options.append("no guidance (the distilled preset)")
    options.append(f"a card with at least {card} GB (--memory {card}gb)")
    return "What would fit: " + "; ".join(options) + "."


def plan_for(budget_text: str, folder: str | Path, height: int, width: int, guidance: bool = False,
             device: torch.device | str = "cuda", fp8_requested: bool = False,
             sizes: ModelSizes | None = None) -> tuple[MemoryPlan, Estimate, Budget]:
    """Parse `--memory`, read the folder's sizes and choose; all before any weight is loaded."""
    from helios.model.backends import device_capability, fp8_matmul_supported

    dev = torch.device(device)
    if dev.type != "cuda":
        raise MemoryBudgetError(f"--memory plans GPU memory; the device is {dev.type} (leave --memory out there)")
    budget = parse_budget(budget_text, dev)
    sizes = sizes or ModelSizes.from_folder(folder)
    cap = device_capability(dev)
    fp8_ok = fp8_matmul_supported(cap) if cap is not None else True
    plan, est = choose_plan(budget, sizes, height, width, guidance, fp8_ok, fp8_requested)
    return plan, est, budget
