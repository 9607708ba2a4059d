"""Helios under memory budgets on one large GPU: the 24 GB and 12 GB plans, capped to the budget.

One command, several parts, each in a fresh process (a fresh process is what a user runs: its peak host
RSS, its GPU memory cap and its compiled code are its own), in this order, within a time budget:

- `folder`: a real model folder with random weights, written once and reused (the 14B transformer as ~5 GB
  bf16 safetensors shards with an index; a umT5-XXL-sized text encoder, 5.7 B parameters in bf16 shards;
  the default Wan VAE; a small word-level tokenizer padding to umT5's 512 tokens). Written straight from a
  small pool of random bytes by 8 threads, into /dev/shm when it has room, else the temporary folder.
- `bandwidth`: host-to-device copies from pinned and from pageable memory.
- `fp8`: the unconstrained FP8 engine (`load_pipeline(fp8=True)`, everything on the GPU): the reference.
- `24gb`, `12gb`: the process capped with `torch.cuda.set_per_process_memory_fraction` to the budget,
  `load_pipeline(memory_budget=...)`, then generation. The `24gb` part ends by moving its blocks to pinned
  host memory and streaming them (the 12 GB plan's path) in the same process, against its own resident chunk.
- `attention`: the attention each compute capability gets (forced) against float32.
- `text-cpu`: the text encoder on the host CPU, against the GPU's embeddings.
- `sm86`: the 12 GB plan as an sm86 card gets it (forced): bf16 blocks streamed, FlashAttention-2.

Every generation part measures: load time; peak GPU memory allocated/reserved in each phase (load, text
encoder, warm-up, generation); peak host RSS (the kernel's high-water mark of the process, and a 10 Hz
sample with its anonymous/file/shared split) and the pinned host memory PyTorch holds; frames/s at 14B
distilled 1/1/1 and 384x640 (prompt embeddings random, of umT5's shape, the same for every part) from
the chunk arrival times of a long run; every chunk's peak over that run (first against last), and at its
end the caching allocator's segments by stream and by graph pool with its fragmentation and retry counters
(`generation.allocator`); the latents and frames against the reference; the text encoder as the plan
places it (seconds per 512-token prompt, embeddings against the resident encoder's); the weights streamed
per chunk and what that predicts on a PCIe 4 card (25 GB/s). The long run asks for a 60-second video
(1,452 frames) and stops at the part's deadline (at least 3 chunks), so a short budget gives a shorter
video, said in the JSON.

Each part writes its results into `--out` as soon as it has them, so a run cut short keeps what it did;
the parent ends with a table of the issue's targets (also `--summarize FILE`).

    python benchmarks/bench_memory.py --out memory.json                        # all parts, 540 s budget
    python benchmarks/bench_memory.py --parts folder,fp8,12gb --out m.json     # a subset
    python benchmarks/bench_memory.py --smoke --folder /tmp/smoke --out s.json # CPU: the plumbing
    python benchmarks/bench_memory.py --deterministic --out d.json            # load_pipeline(deterministic=True)
    python benchmarks/bench_memory.py --parts fp8,24gb --inline --out i.json  # decode in line, a chunk queued ahead
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from bench_e2e import EMB_SHAPE, FixedPrompt  # same folder
from host_memory import RssMeter, proc_kib, proc_status

if TYPE_CHECKING:
    from helios.engine.pipeline import HeliosVideoPipeline

GiB = 2**30
SIZE = {"height": 384, "width": 640}  # --smoke: 64x64
STEPS = (1, 1, 1)
SHARD_BYTES = 5 * 10**9
PCIE4_BYTES_PER_S = 25e9
LONG_FRAMES = 1452  # 60 s at 24 frames/s
CHUNK = 33  # frames a chunk adds
PROMPT = "two red circles bouncing on a blue background"
CUDA = torch.cuda.is_available()

# part: (most seconds it may take, fewest worth starting it with); generation parts size their long run
# to the time they are given. Core parts keep their minimum reserved while earlier parts run.
PARTS: dict[str, tuple[int, int]] = {
    "bandwidth": (45, 15), "fp8": (150, 75), "24gb": (170, 80), "12gb": (180, 90),
    "attention": (45, 20), "text-cpu": (90, 45), "sm86": (160, 100)}
CORE = ("bandwidth", "fp8", "24gb", "12gb")
DEFAULT_PARTS = "folder,bandwidth,fp8,24gb,12gb,attention,text-cpu,sm86"


# ----------------------------------------------------------------------------------------------
# results: one JSON file, updated by whichever process is running


def read_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def put_result(path: Path, key: str, value: Any) -> None:
    """Set one top-level key of the results file, atomically (the parent and a part never write at once)."""
    res = read_results(path)
    res[key] = value
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# the random model folder


class BytePool:
    """Random bf16 values (and ones, zeros) as bytes, repeated to fill any tensor: fast to write."""

    def __init__(self, numel: int, dim: int):
        g = torch.Generator().manual_seed(0)
        self.pools = {"random": (torch.randn(numel, generator=g) * 0.02).to(torch.bfloat16),
                      "table": (torch.randn(numel, generator=g) * dim ** -0.5).to(torch.bfloat16),
                      "ones": torch.ones(numel, dtype=torch.bfloat16),
                      "zeros": torch.zeros(numel, dtype=torch.bfloat16)}
        self.views = {k: memoryview(v.view(torch.uint8).numpy()) for k, v in self.pools.items()}

    def write(self, f, source: str, nbytes: int) -> None:
        view = self.views[source]
        while nbytes > 0:
            n = min(nbytes, len(view))
            f.write(view[:n])
            nbytes -= n


def tensor_source(name: str, shape: tuple[int, ...]) -> str:
    """Which pool a checkpoint tensor's values come from: modulation tables, biases, norm weights, the rest."""
    if "scale_shift_table" in name:
        return "table"
    if name.rsplit(".", 1)[-1] == "bias":
        return "zeros"
    return "ones" if len(shape) == 1 else "random"


Tensors = list[tuple[str, tuple[int, ...]]]


def split_shards(tensors: Tensors, shard_bytes: int) -> list[Tensors]:
    shards: list[Tensors] = [[]]
    size = 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def write_shard(path: Path, tensors: Tensors, pool: BytePool) -> None:
    """One bf16 safetensors file, written directly (header, then each tensor's bytes from the pool)."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            pool.write(f, tensor_source(name, shape), math.prod(shape) * 2)
    tmp.replace(path)


def sharded_jobs(folder: Path, stem: str, tensors: Tensors, shard_bytes: int) -> list[tuple[Path, Tensors]]:
    """(file, tensors) of each shard, and the index file written now (the shards are written later)."""
    from helios.model.loading import write_text_atomic

    shards = split_shards(tensors, shard_bytes)
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {k: name for name, shard in zip(names, shards) for k, _ in shard}
    total = sum(math.prod(s) * 2 for _, s in tensors)
    write_text_atomic(folder / f"{stem}.safetensors.index.json",
                      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return [(folder / name, shard) for name, shard in zip(names, shards)]


def transformer_tensors(cfg) -> Tensors:
    from helios.model.transformer import build_transformer

    model = build_transformer(cfg, device="meta")
    return [(k, tuple(p.shape)) for k, p in model.named_parameters()]


UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, tie_word_embeddings=False)  # google/umt5-xxl, as Wan2.1 uses it


def umt5_tensors(folder: Path, config: dict | None = None) -> Tensors:
    """A umT5 encoder's tensors (default: umT5-XXL's; the token embedding once: the encoder's copy is tied
    to it), and its config.json written into `folder`."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**(config or UMT5_XXL))
    cfg.architectures = ["UMT5EncoderModel"]
    with torch.device("meta"):
        enc = UMT5EncoderModel(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(str(folder / "config.json"))
    return [(k, tuple(p.shape)) for k, p in enc.named_parameters()]


def write_small_text_encoder(folder: Path, max_length: int, encoder: bool) -> None:
    """A word-level tokenizer padding to `max_length` and (if `encoder`) a two-block T5 encoder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", *PROMPT.split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                            model_max_length=max_length).save_pretrained(folder / "tokenizer")
    if encoder:
        torch.manual_seed(0)
        T5EncoderModel(T5Config(vocab_size=len(words), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
                       ).eval().save_pretrained(folder / "text_encoder")


def folder_bytes(smoke: bool, text: str) -> int:
    """Bytes the folder takes on disk (to choose where it fits)."""
    if smoke:
        return 64 * 2**20
    from helios.model.config import HeliosConfig

    transformer = sum(math.prod(s) * 2 for _, s in transformer_tensors(HeliosConfig()))
    return transformer + (11_362_000_000 if text == "xxl" else 0) + 300 * 2**20


def choose_folder(requested: str, smoke: bool) -> tuple[Path, str]:
    """(folder, text encoder "xxl" | "small"): `requested`, or for "auto" the first of /dev/shm and the
    temporary folder that holds a finished folder or has room for one (the umT5-XXL encoder if it fits)."""
    name = "helios-smoke-random" if smoke else "helios-14b-random"
    bases = [Path("/dev/shm"), Path(tempfile.gettempdir())]
    if requested != "auto":
        bases, name = [Path(requested).parent], Path(requested).name
    for base in bases:
        done = base / name / ".complete"
        if done.exists():
            return base / name, json.loads(done.read_text()).get("text_encoder", "xxl")
    for text in ("xxl", "small"):
        for base in bases:
            if base.is_dir() and shutil.disk_usage(base).free >= folder_bytes(smoke, text) + 2 * GiB:
                return base / name, text
    return bases[-1] / name, "small"


def write_folder(folder: Path, smoke: bool = False, text: str = "xxl") -> dict:
    """A Helios-Distilled-shaped model folder with random weights (kept: a second run reuses it).
    smoke: a tiny transformer, a small VAE and a two-block T5 encoder. text "small": the tokenizer with a
    two-block encoder instead of umT5-XXL (where the disk has no room for it)."""
    done = folder / ".complete"
    if done.exists():
        return {**json.loads(done.read_text()), "reused": True}
    from diffusers import AutoencoderKLWan, HeliosDMDScheduler

    from helios.model.config import HeliosConfig, named_config

    t0 = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    cfg = named_config("tiny", text_dim=EMB_SHAPE[-1]) if smoke else HeliosConfig()
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tensors = transformer_tensors(cfg)
    jobs = sharded_jobs(folder / "transformer", "diffusion_pytorch_model", tensors,
                        200_000 if smoke else SHARD_BYTES)
    info: dict[str, Any] = {"transformer_bytes": sum(math.prod(s) * 2 for _, s in tensors),
                            "transformer_shards": len(jobs), "text_encoder": "small" if smoke else text}
    write_small_text_encoder(folder, 64 if smoke else 512, encoder=smoke or text == "small")
    if not smoke and text == "xxl":
        enc = umt5_tensors(folder / "text_encoder")
        enc_jobs = sharded_jobs(folder / "text_encoder", "model", enc, SHARD_BYTES)
        jobs += enc_jobs
        info.update(text_encoder_params=sum(math.prod(s) for _, s in enc), text_encoder_shards=len(enc_jobs))
    pool = BytePool(2**16 if smoke else 2**25, cfg.dim)
    with ThreadPoolExecutor(8) as ex:  # file writes release the GIL: the shards are written in parallel
        list(ex.map(lambda job: write_shard(*job, pool), jobs))
    torch.manual_seed(0)
    vae = (AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]) if smoke else AutoencoderKLWan())
    vae.to(torch.bfloat16).save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir()
    sched = HeliosDMDScheduler(use_dynamic_shifting=True, time_shift_type="linear").config
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "HeliosDMDScheduler", **dict(sched)}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "HeliosPyramidPipeline", "is_distilled": True, "is_cfg_zero_star": False,
        "helios_default_size": [SIZE["height"], SIZE["width"]]}))
    info["write_s"] = time.perf_counter() - t0
    info["bytes_on_disk"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    done.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------
# measuring host and GPU memory


def host_memory(meter: RssMeter | None = None) -> dict[str, float]:
    """Peak RSS of the process so far: the kernel's high-water mark (VmHWM) or, where it is higher or
    missing, the largest sample; and the pinned host memory PyTorch's allocator holds (its caching
    allocator rounds each block up to a power of two)."""
    hwm = proc_status().get("VmHWM", 0)
    sampled = meter.lifetime if meter is not None else 0
    out = {"peak_rss_gib": max(hwm, sampled) / GiB, "vmhwm_gib": hwm / GiB, "sampled_peak_rss_gib": sampled / GiB}
    if CUDA and hasattr(torch.cuda, "host_memory_stats"):
        try:
            stats = torch.cuda.host_memory_stats()
        except RuntimeError:
            stats = {}
        for key, value in stats.items():
            if "_bytes." in key and key.endswith((".current", ".peak")):
                out[f"pinned_{key.replace('.', '_')}_gib"] = value / GiB
            elif key in ("host_alloc_time.total", "num_host_alloc"):
                out[f"pinned_{key.replace('.', '_')}"] = value
    return out


def system_memory() -> dict[str, float]:
    keys = ("MemTotal", "MemAvailable", "Shmem", "Cached")
    return {f"{k}_gib": v / GiB for k, v in proc_kib("/proc/meminfo", keys).items()}


def gpu_peaks() -> dict[str, float]:
    if not CUDA:
        return {}
    return {"max_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / GiB}


def reset_gpu_peaks() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def cap_memory(budget: str | None) -> dict[str, float]:
    """Limit this process's GPU memory (the caching allocator's) to the budget; None: the whole card."""
    if not CUDA or budget is None:
        return {"memory_fraction": 1.0}
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, float(budget.rstrip("gb")) * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"memory_fraction": fraction, "cap_gib": fraction * total / GiB, "card_gib": total / GiB}


# ----------------------------------------------------------------------------------------------
# a generation part: one pipeline, loaded under a plan (or none), measured phase by phase


class Part:
    """A part's results, written to the results file after every phase; `left()` is the time to its deadline."""

    def __init__(self, name: str, out: Path, deadline: float):
        self.name, self.out, self.deadline = name, out, deadline
        self.t0 = time.perf_counter()
        self.res: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds")}
        self.rss = RssMeter()

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        put_result(self.out, self.name, self.res)

    def phase(self, key: str, fn: Callable[[], dict]) -> dict | None:
        """Run one phase with fresh GPU and RSS peaks; record its results, peaks and seconds (or its error)."""
        reset_gpu_peaks()
        self.rss.reset()
        t0 = time.perf_counter()
        try:
            out = fn()
            ok = True
        except Exception as e:  # an out-of-memory under a cap is a result too: keep it and the peaks
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
                   "traceback": traceback.format_exc()[-2000:]}
            ok = False
        sync()
        self.res[key] = {**out, "s": time.perf_counter() - t0, "gpu": gpu_peaks(),
                         "host": {**host_memory(self.rss), **self.rss.report()}}
        self.save()
        print(self.name, key, json.dumps({k: v for k, v in self.res[key].items() if k != "traceback"},
                                         default=str)[:1500], flush=True)
        return out if ok else None


def load_for(folder: Path, budget: str | None, smoke: bool, deterministic: bool = False,
             inline: bool = False) -> "HeliosVideoPipeline":
    """`_load_for`, then with `inline` (--inline) each chunk's decode queued in line with the host a chunk ahead
    (`optimize(decode_beside=False)`), under a plan too (the plans otherwise wait for each chunk's frames)."""
    pipe = _load_for(folder, budget, smoke, deterministic)
    if inline:
        pipe.overlap_decode, pipe.decode_beside = True, False
    return pipe


def _load_for(folder: Path, budget: str | None, smoke: bool, deterministic: bool = False) -> "HeliosVideoPipeline":
    """The pipeline as a user gets it: `load_pipeline(fp8=True, memory_budget=budget, deterministic=...)` on
    the GPU. On the CPU (--smoke), a plan cannot be chosen (it plans GPU memory): the plan the budget takes on
    a card is applied by hand, in float32, so that the rest of the script runs."""
    from helios.engine.pipeline import load_pipeline

    if CUDA or budget is None:
        return load_pipeline(folder, dtype=torch.bfloat16 if CUDA else torch.float32,
                             device="cuda" if CUDA else "cpu", fp8=CUDA, memory_budget=budget,
                             deterministic=deterministic)
    from helios.engine.components import load_components
    from helios.engine.memory import MemoryPlan, ModelSizes, card_budget
    from helios.engine.pipeline import HeliosVideoPipeline, MemoryState
    from helios.runtime import use_deterministic_kernels

    if deterministic:
        use_deterministic_kernels()
    streamed = budget == "12gb"
    plan = MemoryPlan("streamed" if streamed else "fp8", fp8=False, stream_blocks=streamed,
                      ring_size=2 if streamed else 0, text_encoder="layers", decode_slice=2, cuda_graphs=False,
                      overlap_decode=False)
    comps = load_components(folder, blocks_on_host=streamed, text_device="cpu")
    pipe = HeliosVideoPipeline(comps).optimize(compile=False, cuda_graphs=False, deterministic=deterministic)
    pipe.apply_memory_plan(MemoryState(plan, card_budget(float(budget.rstrip("gb"))), ModelSizes.from_folder(folder),
                                       f"(CPU smoke) {plan.describe()}"))
    return pipe


def stream_args(frames: int, seed: int) -> dict:
    return dict(num_frames=frames, settings="distilled", steps=list(STEPS), seed=seed, **SIZE)


def encode_timed(prompts) -> tuple[torch.Tensor, float]:
    """One prompt through the pipeline's own encoder (its cache bypassed), and the seconds it took."""
    sync()
    t0 = time.perf_counter()
    emb = prompts._encode(PROMPT)
    sync()
    return emb, time.perf_counter() - t0


def text_encoder_check(pipe, scratch: Path, reference: bool) -> dict:
    """The text encoder as the pipeline placed it (resident, or streamed layer by layer from pinned memory):
    seconds per prompt (the second call: the first pins and warms up) and, for a plan, the largest
    difference of its embeddings from the resident encoder's (0 expected: same kernels and weights)."""
    if pipe.c.text_encoder is None:
        return {"skipped": "no text encoder"}
    encode_timed(pipe.prompts)
    emb, seconds = encode_timed(pipe.prompts)
    emb = emb.float().cpu()
    out = {"device": str(emb.device), "s_per_prompt": seconds, "tokens": emb.shape[1]}
    if reference:
        torch.save(emb, scratch / "text_gpu.pt")
    elif (scratch / "text_gpu.pt").exists():
        ref = torch.load(scratch / "text_gpu.pt")
        out["max_abs_vs_resident"] = (emb - ref).abs().max().item()
    return out


def warm_up(pipe) -> dict:
    """Two chunks: compiles each stage size and captures graphs where the plan has them."""
    pipe.prompts = FixedPrompt(pipe.device)  # the same random umT5-shaped embeddings in every part
    t0 = time.perf_counter()
    for _ in pipe.stream(PROMPT, **stream_args(2 * CHUNK, 0)):
        pass
    return {"warmup_s": time.perf_counter() - t0}


def compare_run(pipe, scratch: Path, name: str, reference: bool) -> dict:
    """One chunk (seed 3) with its latents; saved by the reference (and the 24gb plan), compared by the
    others: latents (0 expected: the plans move weights, not numbers) and frames (max difference and
    PSNR: the plans decode in slices, the reference a chunk at once)."""
    mine, seconds = compared_chunk(pipe)
    out: dict[str, Any] = {"first_chunk_s": seconds, "decode_slice": pipe.codec.decode_slice}
    if reference or name == "24gb":
        torch.save(mine, scratch / f"run_{name}.pt")
    for other in ("fp8", "24gb"):
        path = scratch / f"run_{other}.pt"
        if other != name and path.exists():
            out[f"vs_{other}"] = compare(mine, torch.load(path))
    return out


def compared_chunk(pipe) -> tuple[dict, float]:
    """The compared chunk (seed 3): its latents, frames and decode slice, and the seconds it took."""
    t0 = time.perf_counter()
    chunks = list(pipe.stream(PROMPT, keep_latents=True, **stream_args(CHUNK, 3)))
    mine = {"latents": torch.cat([c.latents for c in chunks], dim=2),
            "frames": torch.cat([c.frames for c in chunks]), "decode_slice": pipe.codec.decode_slice}
    return mine, time.perf_counter() - t0


def compare(a: dict, b: dict) -> dict:
    mse = ((a["frames"].float() - b["frames"].float()) ** 2).mean().item()
    return {"latents_max_abs": (a["latents"] - b["latents"]).abs().max().item(),
            "frames_max_abs": (a["frames"].int() - b["frames"].int()).abs().max().item(),
            "frames_psnr_db": 10 * math.log10(255**2 / mse) if mse > 0 else float("inf"),
            "same_decode_slices": a["decode_slice"] == b["decode_slice"]}


def long_run(pipe, frames: int, stop_at: float) -> dict:
    """A long video, chunk by chunk: each chunk's arrival time and GPU peaks (allocated and reserved,
    reset after every chunk), stopped at `stop_at` once 3 chunks are in. Frames/s over the steady
    chunks: after the first (the distilled preset doubles its steps) and, for a run that completed,
    before the last (its interval holds only its decode)."""
    ring = getattr(pipe.model, "block_stream", None)
    loads0 = ring.loads if ring is not None else 0
    times, counts, alloc, reserved = [], [], [], []
    peaks_seen: dict[str, int] = {}  # the allocator's peak counters, over the chunks (reset after each)
    complete = False
    reset_gpu_peaks()
    t0 = time.perf_counter()
    gen = pipe.stream(PROMPT, **stream_args(frames, 0))
    for c in gen:
        times.append(time.perf_counter() - t0)
        counts.append(c.frames.shape[0])
        peaks = gpu_peaks()
        alloc.append(peaks.get("max_allocated_gib", 0.0))
        reserved.append(peaks.get("max_reserved_gib", 0.0))
        keep_peaks(peaks_seen)
        reset_gpu_peaks()
        complete = c.index == c.total_chunks - 1
        if time.time() > stop_at and len(times) >= 3:
            break
    gen.close()
    allocator = allocator_summary(peaks_seen)
    steady = list(range(1, len(times) - 1 if complete else len(times)))
    out: dict[str, Any] = {
        "frames_asked": frames, "frames": sum(counts), "video_s_at_24fps": sum(counts) / 24, "complete": complete,
        "chunks": len(times), "steady_chunks": len(steady), "chunk_arrival_s": times,
        "chunk_peaks_allocated_gib": alloc, "chunk_peaks_reserved_gib": reserved, "allocator": allocator}
    seconds = sum(times[i] - times[i - 1] for i in steady)
    if steady and seconds > 0:
        out.update(s_per_chunk=seconds / len(steady), fps=sum(counts[i] for i in steady) / seconds)
    out["flat_memory"] = flatness(alloc, reserved, steady)
    if ring is not None:
        out["ring"] = {"size": ring.size, "slot_bytes": ring.slot_bytes, "max_resident": ring.max_resident,
                       "blocks": len(ring.host), "loads": ring.loads - loads0,
                       "loads_per_chunk_with_first": (ring.loads - loads0) / max(len(times), 1)}
    return out


ALLOCATOR_PEAKS = ("inactive_split_bytes.all.peak", "reserved_bytes.all.peak")
ALLOCATOR_COUNTS = ("num_alloc_retries",)


def keep_peaks(seen: dict[str, int]) -> None:
    """Fold the caching allocator's peak counters into `seen` (the long run resets them after every chunk)."""
    if not CUDA:
        return
    stats = torch.cuda.memory_stats()
    for key in ALLOCATOR_PEAKS:
        seen[key] = max(seen.get(key, 0), int(stats.get(key, 0)))


def allocator_summary(peaks_seen: dict[str, int]) -> dict:
    """What the caching allocator holds at the end of a generation: `allocator_segments`, the segments of
    `torch.cuda.memory_snapshot()` summed by stream and by pool (graph pools: a CUDA graph's private memory);
    the peaks over the run of its inactive split bytes (fragmentation) and reserved bytes; and how often it
    had to free its cache and retry an allocation (`num_alloc_retries`, since the process started)."""
    if not CUDA:
        return {}
    sync()
    keep_peaks(peaks_seen)
    stats = torch.cuda.memory_stats()
    return {"allocator_segments": segment_totals(torch.cuda.memory_snapshot()),
            "current_stream": torch.cuda.current_stream().cuda_stream,  # the key of the main stream's segments
            **peaks_seen, **{key: int(stats.get(key, 0)) for key in ALLOCATOR_COUNTS}}


def segment_totals(segments: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Segments' count, total_size and allocated_size (GiB), by `stream` and by `segment_pool_id`."""
    out: dict[str, dict[str, dict[str, float]]] = {"by_stream": {}, "by_pool": {}}
    for seg in segments:
        for group, key in (("by_stream", seg.get("stream")), ("by_pool", seg.get("segment_pool_id"))):
            row = out[group].setdefault(str(tuple(key) if isinstance(key, list) else key),
                                        {"segments": 0, "total_gib": 0.0, "allocated_gib": 0.0})
            row["segments"] += 1
            row["total_gib"] += seg.get("total_size", 0) / GiB
            row["allocated_gib"] += seg.get("allocated_size", 0) / GiB
    return out


def flatness(alloc: list[float], reserved: list[float], steady: list[int]) -> dict:
    """First chunk's peak against the last steady chunk's (a complete run's very last interval holds only
    its decode), and the spread over the steady chunks; allocated and reserved."""
    out = {}
    for key, peaks in (("allocated", alloc), ("reserved", reserved)):
        body = [peaks[i] for i in steady] or peaks
        if not body or not peaks[0]:
            continue
        last = body[-1]
        out[key] = {"first_gib": peaks[0], "last_gib": last, "first_vs_last_rel": abs(last - peaks[0]) / peaks[0],
                    "steady_min_gib": min(body), "steady_max_gib": max(body),
                    "steady_spread_rel": (max(body) - min(body)) / max(body)}
    return out


def conditioning_peaks(pipe, video_frames: int) -> dict:
    """Image- and video-to-video under the plan: one chunk each, conditioned on a random image and on a
    random video (the VAE encodes them first); the peak GPU memory of each, or the error if it did not fit."""
    g = torch.Generator().manual_seed(5)
    h, w = SIZE["height"], SIZE["width"]
    inputs = {"image": {"image": torch.rand(3, h, w, generator=g) * 2 - 1},
              "video": {"video": torch.rand(3, video_frames, h, w, generator=g) * 2 - 1}}
    out: dict[str, Any] = {"video_frames": video_frames}
    for name, kwargs in inputs.items():
        reset_gpu_peaks()
        try:
            for _ in pipe.stream(PROMPT, **kwargs, **stream_args(CHUNK, 0)):
                pass
            out[name] = gpu_peaks()
        except torch.OutOfMemoryError as e:
            out[name] = {"oom": str(e).splitlines()[0], **gpu_peaks()}
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
    return out


def streaming_prediction(run: dict, pinned_gib_s: float | None) -> dict:
    """The weights a steady chunk streams (every block once per forward, one forward per step of 1/1/1),
    the seconds that takes at the measured pinned rate and at PCIe 4's 25 GB/s, and the frames/s a PCIe 4
    card would get if streaming stays hidden behind compute wherever it is shorter than the measured chunk."""
    ring, per_chunk_s = run.get("ring"), run.get("s_per_chunk")
    if not ring or not per_chunk_s:
        return {}
    nbytes = ring["slot_bytes"] * ring["blocks"] * sum(STEPS)
    out = {"gb_per_chunk": nbytes / 1e9, "effective_gib_s": nbytes / per_chunk_s / GiB,
           "s_at_pcie4": nbytes / PCIE4_BYTES_PER_S,
           "predicted_fps_pcie4": CHUNK / max(per_chunk_s, nbytes / PCIE4_BYTES_PER_S)}
    if pinned_gib_s:
        out["s_at_measured_pinned"] = nbytes / (pinned_gib_s * GiB)
    return out


def generation_part(p: Part, args, budget: str | None, reference: bool) -> None:
    """Load under `budget`, then measure: the text encoder, warm-up, a compared chunk, a long run, and
    image/video conditioning while time is left."""
    folder, scratch = Path(args.folder), Path(args.scratch)
    p.res.update(budget=budget, **cap_memory(budget), size=f"{SIZE['width']}x{SIZE['height']}", steps=list(STEPS),
                 deterministic=args.deterministic, inline=args.inline, system_before=system_memory())
    holder: dict[str, Any] = {}

    def load() -> dict:
        holder["pipe"] = pipe = load_for(folder, budget, args.smoke, args.deterministic, args.inline)
        sync()
        return {"plan": pipe.memory.report if pipe.memory else "unconstrained FP8, everything on the GPU"}

    if p.phase("load", load) is None:
        return
    pipe = holder.pop("pipe")
    p.phase("text_encoder", lambda: text_encoder_check(pipe, scratch, reference))
    if p.phase("warmup", lambda: warm_up(pipe)) is None:
        return
    p.phase("compare", lambda: compare_run(pipe, scratch, p.name, reference))
    reserve = 30 if p.left() > 90 else 5  # the conditioning runs after it, if it still has time
    frames = min(args.long_frames, 5 * CHUNK) if reference else args.long_frames
    run = p.phase("generation", lambda: long_run(pipe, frames, p.deadline - reserve))
    bandwidth = read_results(p.out).get("bandwidth", {}).get("pinned_gib_s")
    if run is not None:
        p.res["streaming"] = streaming_prediction(run, bandwidth)
    p.res["host"] = host_memory(p.rss)  # the process's peak RSS: load and generation
    p.res["system_after"] = system_memory()
    p.save()
    if budget is not None and p.left() > 25:
        p.phase("conditioning", lambda: conditioning_peaks(pipe, 81 if CUDA else 33))
    if budget == "24gb" and p.left() > 30:  # last: it turns this pipeline into a streaming one
        p.phase("streamed_same_process", lambda: streamed_same_process(pipe, scratch))


def streamed_same_process(pipe, scratch: Path) -> dict:
    """This plan's pipeline with its blocks then moved to pinned host memory and streamed through a ring of 3
    (the 12 GB plan's path: no CUDA graphs, compiled ring slots), in the same process: its compared chunk against
    the resident one's. Equal latents show that streaming moves weights and not numbers, with no question of
    whether another process compiles the blocks alike (docs/memory.md)."""
    from helios.model.offload import enable_block_streaming

    pipe.graphs = None  # captured on the resident blocks' addresses; the streamed path runs without graphs
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    ring = enable_block_streaming(pipe.model, 3, pipe.device)
    if CUDA:
        ring.compile_()
    mine, seconds = compared_chunk(pipe)
    return {"first_chunk_s": seconds, "ring": 3, "vs_resident": compare(mine, torch.load(scratch / "run_24gb.pt"))}


# ----------------------------------------------------------------------------------------------
# the other parts


def bandwidth_part(p: Part, nbytes: int = GiB) -> None:
    """Host-to-device copy rate from pinned and from pageable memory (median of 5 after one warm-up)."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for kind, src in (("pinned", torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)),
                      ("pageable", torch.empty(nbytes, dtype=torch.uint8))):
        src.fill_(1)
        times = []
        for _ in range(6):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        p.res[f"{kind}_gib_s"] = nbytes / sorted(times[1:])[2] / GiB
    p.res["pcie4_gib_s"] = PCIE4_BYTES_PER_S / GiB
    p.save()


def attention_part(p: Part) -> None:
    """The attention each compute capability gets (forced on this card), at the 14B's largest forward."""
    from helios.model.attention import attention
    from helios.model.backends import configure_device

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 11040, 40, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for cap in ((9, 0), (8, 9), (8, 6), (8, 0), (7, 5)):
        chosen = configure_device("cuda", capability=cap)
        out = attention(q, k, v)
        sync()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(5):
            attention(q, k, v)
        t1.record()
        t1.synchronize()
        p.res[chosen["capability"]] = {"backends": chosen["attention"], "fp8_matmul": chosen["fp8_matmul"],
                                       "ms": t0.elapsed_time(t1) / 5,
                                       "rel_error_vs_float32": ((out.float() - exact).norm() / exact.norm()).item()}
        p.save()


def text_cpu_part(p: Part, args) -> None:
    """The third place the text encoder could run: the host CPU (bf16, all its cores), on the same 512-token
    prompt, against the GPU's embeddings (other kernels: small rounding differences expected)."""
    import transformers

    from helios.engine.text import PromptEncoder

    folder, ref_path = Path(args.folder), Path(args.scratch) / "text_gpu.pt"
    arch = json.loads((folder / "text_encoder" / "config.json").read_text())["architectures"][0]
    t0 = time.perf_counter()
    enc = getattr(transformers, arch).from_pretrained(folder / "text_encoder", torch_dtype=torch.bfloat16).eval()
    p.res.update(threads=torch.get_num_threads(), load_s=time.perf_counter() - t0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
    prompts = PromptEncoder(tokenizer, enc, max_length=int(getattr(tokenizer, "model_max_length", 512)))
    with torch.no_grad():
        emb, seconds = encode_timed(prompts)
    p.res.update(s_per_prompt=seconds, host=host_memory(p.rss))
    if ref_path.exists():
        diff = (emb.float() - torch.load(ref_path)).abs()
        p.res.update(max_abs_vs_gpu=diff.max().item(), mean_abs_vs_gpu=diff.mean().item())
    p.save()


def run_part(name: str, args) -> None:
    """The body of one part, in this (child) process."""
    p = Part(name, Path(args.out), args.deadline)
    p.res["gpu"] = torch.cuda.get_device_name() if CUDA else "cpu"
    p.save()
    if name == "bandwidth":
        bandwidth_part(p)
    elif name == "attention":
        attention_part(p)
    elif name == "text-cpu":
        text_cpu_part(p, args)
    elif name == "sm86":
        from helios.model.backends import force_capability

        force_capability((8, 6))  # an RTX 3090's: no FP8 matmuls, FlashAttention-2, bf16 blocks streamed
        generation_part(p, args, "12gb", reference=False)
    else:
        generation_part(p, args, None if name == "fp8" else name, reference=name == "fp8")
    p.res["part_s"] = time.perf_counter() - p.t0
    p.res["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    p.save()


# ----------------------------------------------------------------------------------------------
# the parent: the folder, then each part in a fresh process within the time budget


def part_timeout(name: str, later: list[str], left: float) -> float:
    """Seconds part `name` may take: its most, less what the core parts after it need at least."""
    most, _ = PARTS[name]
    keep = sum(PARTS[n][1] for n in later if n in CORE)
    return min(most, left - keep)


def runnable(name: str, smoke: bool, text: str) -> str | None:
    """Why a part cannot run here (None: it can)."""
    if not CUDA and name in ("bandwidth", "attention", "sm86"):
        return "needs a GPU"
    if not CUDA and not smoke and name in ("fp8", "24gb", "12gb"):
        return "needs a GPU (or --smoke)"
    if name == "text-cpu" and text != "xxl" and not smoke:
        return "the folder has no umT5-XXL encoder"
    return None


_child: subprocess.Popen | None = None


def _stop_child(*_) -> None:
    """On SIGTERM/SIGINT: end the running part's process group, then this process."""
    if _child is not None and _child.poll() is None:
        os.killpg(_child.pid, signal.SIGKILL)
    raise SystemExit(124)


def spawn(name: str, args, timeout: float) -> dict:
    """Run one part in a fresh process (its own process group); kill it at `timeout`."""
    global _child
    cmd = [sys.executable, __file__, "--part", name, "--out", args.out, "--folder", args.folder,
           "--scratch", args.scratch, "--long-frames", str(args.long_frames), "--deadline", str(time.time() + timeout)]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--deterministic"] if args.deterministic else []
    cmd += ["--inline"] if args.inline else []
    t0 = time.perf_counter()
    _child = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = _child.wait(timeout=timeout + 10)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(_child.pid, signal.SIGKILL)
        rc, timed_out = _child.wait(), True
    _child = None
    return {"rc": rc, "timed_out": timed_out, "s": time.perf_counter() - t0, "timeout_s": timeout}


def orchestrate(args) -> None:
    t_start = time.time()
    out = Path(args.out)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p != "folder" and p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from folder, {', '.join(PARTS)}")
    signal.signal(signal.SIGTERM, _stop_child)
    signal.signal(signal.SIGINT, _stop_child)
    out.write_text("{}")  # one run's results, compared within the run only
    shutil.rmtree(args.scratch, ignore_errors=True)
    # (no CUDA context here: the parts' processes have the GPU to themselves; each records its name)
    put_result(out, "meta", {"cuda": CUDA, "torch": torch.__version__,
                             "date": datetime.date.today().isoformat(), "budget_s": args.budget_s,
                             "size": f"{SIZE['width']}x{SIZE['height']}", "steps": list(STEPS),
                             "prompt_embeddings": list(EMB_SHAPE), "parts": parts, "smoke": args.smoke,
                             "deterministic": args.deterministic, "inline": args.inline})
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    folder, text = choose_folder(args.folder, args.smoke)
    args.folder = str(folder)
    status: dict[str, Any] = {}
    if "folder" in parts or not (folder / ".complete").exists():
        t0 = time.perf_counter()
        try:
            info = write_folder(folder, args.smoke, text)
        except OSError as e:
            info = {"error": f"{type(e).__name__}: {e}"}
        put_result(out, "folder", {**info, "path": str(folder), "s": time.perf_counter() - t0})
        print("folder", json.dumps(read_results(out)["folder"]), flush=True)
        if "error" in info:
            parts = [p for p in parts if p in ("bandwidth", "attention")]
    text = read_results(out).get("folder", {}).get("text_encoder", text)
    todo = [p for p in parts if p != "folder"]
    for i, name in enumerate(todo):
        why = runnable(name, args.smoke, text)
        left = args.budget_s - (time.time() - t_start) - 15  # the summary and the process's end
        timeout = part_timeout(name, todo[i + 1:], left)
        if why is None and timeout < PARTS[name][1]:
            why = f"no time left ({left:.0f} s in the budget)"
        if why is not None:
            status[name] = {"skipped": why}
        else:
            print(f"== {name} (up to {timeout:.0f} s)", flush=True)
            status[name] = spawn(name, args, timeout)
        put_result(out, "parts", status)
    res = read_results(out)
    res["targets"] = targets(res)
    put_result(out, "targets", res["targets"])
    put_result(out, "total_s", time.time() - t_start)
    print(summary_table(res), flush=True)
    table = Path(args.out).with_name(Path(args.out).stem + "-summary.txt")
    table.write_text(summary_table(res) + "\n")


# ----------------------------------------------------------------------------------------------
# the targets, from the results


def _get(res: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(res, dict) or key not in res:
            return None
        res = res[key]
    return res


def peak_over_phases(part: dict, metric: str, phases=("load", "text_encoder", "warmup", "compare", "generation")
                     ) -> float | None:
    values = [_get(part, ph, "gpu", metric) for ph in phases]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _row(target: str, value: float | None, limit: float | None, at_most: bool, where: str, unit: str = "") -> dict:
    met = None if value is None or limit is None else (value <= limit if at_most else value >= limit)
    return {"target": target, "value": value, "limit": limit, "unit": unit, "met": met, "where": where}


def targets(res: dict) -> list[dict]:
    """Issue 23's targets, each with the measured value, the limit, whether it is met and its JSON path."""
    rows = []
    for plan, reserved, fps, rss in (("24gb", 22, 25, 24), ("12gb", 11, 20, 32)):
        part = res.get(plan) or {}
        rows += [
            _row(f"{plan}: peak reserved GPU memory", peak_over_phases(part, "max_reserved_gib"), reserved, True,
                 f"{plan}.<load|text_encoder|warmup|compare|generation>.gpu.max_reserved_gib", "GiB"),
            _row(f"{plan}: frames/s end to end", _get(part, "generation", "fps"), fps, False,
                 f"{plan}.generation.fps", "frames/s"),
            _row(f"{plan}: peak host RSS, load and generation", _get(part, "host", "peak_rss_gib"), rss, True,
                 f"{plan}.host.peak_rss_gib", "GiB"),
            _row(f"{plan}: pinned host memory held, peak (no target)", _get(part, "host", "pinned_allocated_bytes_peak_gib"),
                 None, True, f"{plan}.host.pinned_allocated_bytes_peak_gib", "GiB"),
            _row(f"{plan}: latents vs unconstrained FP8 (max abs)", _get(part, "compare", "vs_fp8", "latents_max_abs"),
                 0.0, True, f"{plan}.compare.vs_fp8.latents_max_abs"),
            _row(f"{plan}: text encoder embeddings vs resident (max abs)",
                 _get(part, "text_encoder", "max_abs_vs_resident"), 0.0, True,
                 f"{plan}.text_encoder.max_abs_vs_resident"),
            _row(f"{plan}: first vs last chunk peak (allocated)",
                 _get(part, "generation", "flat_memory", "allocated", "first_vs_last_rel"), 0.01, True,
                 f"{plan}.generation.flat_memory.allocated.first_vs_last_rel (over "
                 f"{_get(part, 'generation', 'video_s_at_24fps') or 0:.0f} s of video)"),
        ]
    rows.append(_row("12gb: frames vs 24gb plan (max abs, same decode slices)",
                     _get(res, "12gb", "compare", "vs_24gb", "frames_max_abs"), 0.0, True,
                     "12gb.compare.vs_24gb.frames_max_abs"))
    rows.append(_row("24gb: streamed vs resident, same process (latents max abs)",
                     _get(res, "24gb", "streamed_same_process", "vs_resident", "latents_max_abs"), 0.0, True,
                     "24gb.streamed_same_process.vs_resident.latents_max_abs"))
    rows.append(_row("12gb: predicted frames/s on PCIe 4 (no target)", _get(res, "12gb", "streaming",
                     "predicted_fps_pcie4"), None, False, "12gb.streaming.predicted_fps_pcie4", "frames/s"))
    rows.append(_row("pinned host-to-device (no target)", _get(res, "bandwidth", "pinned_gib_s"), None, False,
                     "bandwidth.pinned_gib_s", "GiB/s"))
    return rows


def summary_table(res: dict) -> str:
    lines = [f"{'target':58} {'measured':>12} {'limit':>8}  met", "-" * 86]
    for r in res.get("targets") or targets(res):
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        limit = "-" if r["limit"] is None else f"{r['limit']:g}"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"{r['target'][:58]:58} {value:>12} {limit:>8}  {met}")
    for name, st in (res.get("parts") or {}).items():
        lines.append(f"part {name}: " + json.dumps(st))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="auto", help="the random model folder (auto: /dev/shm if it has room)")
    ap.add_argument("--parts", default=DEFAULT_PARTS)
    ap.add_argument("--long-frames", type=int, default=LONG_FRAMES, help="frames the long run asks for "
                    "(1452: 60 s at 24 fps); it stops at the part's deadline once 3 chunks are in")
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds for everything, the folder included")
    ap.add_argument("--out", default="bench-memory.json")
    ap.add_argument("--scratch", default=str(Path(tempfile.gettempdir()) / "helios-bench-memory"),
                    help="the reference's latents, frames and embeddings, for the later parts")
    ap.add_argument("--smoke", action="store_true", help="a tiny model at 64x64 (on the CPU: the plans applied "
                    "by hand in float32): the script's own plumbing")
    ap.add_argument("--deterministic", action="store_true", help="load every part's pipeline with "
                    "load_pipeline(deterministic=True): kernels chosen by fixed rules, not timing")
    ap.add_argument("--inline", action="store_true", help="every part decodes in line with the host a chunk "
                    "ahead (optimize(decode_beside=False)), the plans included")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    ap.add_argument("--summarize", help="print the targets table of a results file and exit")
    args = ap.parse_args()
    if args.smoke:
        SIZE.update(height=64, width=64)
    if args.summarize:
        print(summary_table(read_results(Path(args.summarize))))
    elif args.part:
        run_part(args.part, args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
