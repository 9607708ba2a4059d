"""Helios under memory budgets on one large GPU: the 24 GB and 12 GB plans, capped to the budget.

Writes a real model folder with random weights first (the 14B transformer as ~5 GB bf16 safetensors shards
with an index, the default Wan VAE, a umT5-XXL-sized text encoder (5.7 B parameters, bf16 shards) and a small
word-level tokenizer padding to umT5's 512 tokens; reused when present), then in one process:

1. `fp8`: the unconstrained FP8 engine (`load_pipeline(fp8=True)`, everything on the GPU), the reference.
2. each plan (`--plans 24gb,12gb`): the process capped with `torch.cuda.set_per_process_memory_fraction` to
   the budget, `load_pipeline(memory_budget=...)`, then generation.

For each: load time, peak GPU memory allocated/reserved during load and generation, peak host RSS (the
kernel's high-water mark, reset before each load), frames/s at 14B distilled 1/1/1 and 384x640 (prompt
embeddings random, of umT5's shape), the peak of each chunk over a long run (first vs last), the latents
and frames against the reference (latents: max difference, 0 expected: the plans move weights, not
numbers; frames: max difference and PSNR, since the plans decode in slices). Also: pinned and pageable
host-to-device bandwidth and what the 12 GB plan's streaming predicts on a PCIe 4 card (25 GB/s), the
attention backends each compute capability gets (forced) against the math kernel; where the text encoder
could run (resident on the GPU, streamed layer by layer from pinned memory as the plans do, or on the CPU):
seconds per 512-token prompt and the embeddings' difference; image- and video-to-video under each plan (the
VAE encode's peak); and (`--ampere`, on by default) the 12 GB plan as an sm86 card gets it, forced: bf16 blocks
streamed, FlashAttention-2.

    python benchmarks/bench_memory.py --folder /tmp/helios-14b-random --out memory.json
    python benchmarks/bench_memory.py --plans 12gb --long-frames 1452     # a 60-second video
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import shutil
import time
from pathlib import Path

import torch

from bench_e2e import EMB_SHAPE, FixedPrompt  # same folder

GiB = 2**30
SIZE = {"height": 384, "width": 640}  # --smoke: 64x64
STEPS = (1, 1, 1)
SHARD_BYTES = 5 * 10**9
PCIE4_BYTES_PER_S = 25e9


# ----------------------------------------------------------------------------------------------
# the random model folder


def _random_bytes(numel: int, std: float, device: str) -> torch.Tensor:
    return (torch.randn(numel, device=device) * std).to(torch.bfloat16).cpu().view(torch.uint8)


def write_transformer(folder: Path, device: str, cfg=None, shard_bytes: int = SHARD_BYTES) -> dict:
    """The transformer's tensors (default: 14B) as bf16 shards, values from one random buffer reused (fast)."""
    from helios.model.config import HeliosConfig
    from helios.model.loading import write_text_atomic
    from helios.model.transformer import build_transformer

    cfg = cfg or HeliosConfig()
    model = build_transformer(cfg, device="meta")
    tensors = [(k, tuple(p.shape)) for k, p in model.named_parameters()]
    biggest = max(math.prod(s) for _, s in tensors)
    pool = {"random": _random_bytes(biggest, 0.02, device),
            "table": _random_bytes(biggest, cfg.dim ** -0.5, device),
            "ones": torch.ones(biggest, dtype=torch.bfloat16).view(torch.uint8),
            "zeros": torch.zeros(biggest * 2, dtype=torch.uint8)}

    def source(name: str, shape) -> str:
        leaf = name.rsplit(".", 1)[-1]
        if "scale_shift_table" in name:
            return "table"
        if leaf == "bias":
            return "zeros"
        return "ones" if len(shape) == 1 else "random"

    shards, current, size = [], [], 0
    for k, s in tensors:
        n = math.prod(s) * 2
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((k, s))
        size += n
    shards.append(current)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    def write_shard(name: str, shard: list) -> None:
        header, offset = {}, 0
        for k, s in shard:
            n = math.prod(s) * 2
            header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for k, s in shard:
                f.write(memoryview(pool[source(k, s)][:math.prod(s) * 2].numpy()))
        tmp.replace(folder / name)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as ex:  # file writes release the GIL: the shards go to the page cache in parallel
        list(ex.map(write_shard, names, shards))
    for name, shard in zip(names, shards):
        weight_map.update({k: name for k, _ in shard})
    total = sum(math.prod(s) * 2 for _, s in tensors)
    write_text_atomic(folder / "diffusion_pytorch_model.safetensors.index.json",
                      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    write_text_atomic(folder / "config.json", json.dumps(cfg.to_dict(), indent=2))
    return {"transformer_bytes": total, "shards": len(shards)}


def write_small_text_encoder(folder: Path, max_length: int = 64) -> None:
    """A two-block T5 encoder and a word-level tokenizer (the folder layout needs both parts)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "two", "red", "circles", "bouncing", "on", "a", "blue", "background"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                            model_max_length=max_length).save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                            dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
                   ).eval().save_pretrained(folder / "text_encoder")


UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, tie_word_embeddings=False)  # google/umt5-xxl, as Wan2.1 uses it


def write_xxl_text_encoder(folder: Path, device: str) -> int:
    """A umT5-XXL-sized encoder (5.7 B parameters, bf16, 5 GB shards) with random weights, so that the plans
    carry, stream and hold in host memory what a real folder has; the small word-level tokenizer stays."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    with torch.device(device):
        enc = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16).eval()
    enc.save_pretrained(folder / "text_encoder", max_shard_size="5GB")
    n = sum(p.numel() for p in enc.parameters())
    del enc
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def write_folder(folder: Path, device: str, smoke: bool = False) -> dict:
    """A Helios-Distilled-shaped model folder with random weights (kept: a second run reuses it).
    smoke: a tiny transformer and the bundled small VAE, to run this script through on the CPU."""
    done = folder / ".complete"
    if done.exists():
        return json.loads(done.read_text())
    from diffusers import AutoencoderKLWan, HeliosDMDScheduler

    t0 = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    if smoke:
        from helios.model.config import named_config

        info = write_transformer(folder / "transformer", device, named_config("tiny", text_dim=EMB_SHAPE[-1]),
                                 shard_bytes=200_000)
        AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                         temperal_downsample=[False, True, True]).save_pretrained(folder / "vae")
    else:
        info = write_transformer(folder / "transformer", device)
        torch.manual_seed(0)
        AutoencoderKLWan().to(torch.bfloat16).save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir()
    sched = HeliosDMDScheduler(use_dynamic_shifting=True, time_shift_type="linear").config
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "HeliosDMDScheduler", **dict(sched)}))
    write_small_text_encoder(folder, 64 if smoke else 512)  # the word-level tokenizer (and, for --smoke, its 2-block encoder)
    if not smoke:  # the encoder at its real size: what the plans stream and what host memory holds
        shutil.rmtree(folder / "text_encoder")
        info["text_encoder_params"] = write_xxl_text_encoder(folder, device)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "HeliosPyramidPipeline", "is_distilled": True, "is_cfg_zero_star": False,
        "helios_default_size": [SIZE["height"], SIZE["width"]]}))
    info["write_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------
# measuring


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


CUDA = torch.cuda.is_available()


def gpu_peaks() -> dict:
    if not CUDA:
        return {}
    return {"max_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / GiB}


def record_latents(pipe, store: list) -> None:
    """Keep a copy of every chunk's latents as the VAE receives them."""
    codec = pipe.codec
    decode, parts = codec.decode, codec.decode_parts
    codec.decode = lambda z: (store.append(z.detach().float().cpu()), decode(z))[1]
    codec.decode_parts = lambda z: (store.append(z.detach().float().cpu()), parts(z))[1]


def run(pipe, frames: int, seed: int = 0, per_chunk_peaks: list | None = None):
    chunks = []
    t0 = time.perf_counter()
    for c in pipe.stream("benchmark", num_frames=frames, settings="distilled", steps=list(STEPS), seed=seed, **SIZE):
        chunks.append(c)
        if per_chunk_peaks is not None:
            per_chunk_peaks.append(torch.cuda.max_memory_allocated() / GiB if CUDA else 1.0)
            reset_gpu_peaks()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cat([c.frames for c in chunks])


def reset_gpu_peaks() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def cap_memory(budget: str | None) -> float:
    """Limit this process's GPU memory to the budget (1.0: the whole card); returns the fraction."""
    if not CUDA:
        return 1.0
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = 1.0 if budget is None else min(1.0, float(budget.rstrip("gb")) * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def measure(name: str, folder: Path, budget: str | None, long_frames: int, reference: dict | None) -> dict:
    from helios.engine.pipeline import load_pipeline

    fraction = cap_memory(budget)
    reset_gpu_peaks()
    reset_peak_rss()
    out = {"budget": budget, "memory_fraction": fraction,
           "gpu_in_use_before_gib": torch.cuda.memory_allocated() / GiB if CUDA else 0.0}
    t0 = time.perf_counter()
    pipe = load_pipeline(folder, dtype=torch.bfloat16, device="cuda" if CUDA else "cpu", fp8=CUDA,
                         memory_budget=budget)
    if CUDA:
        torch.cuda.synchronize()
    out["load_s"] = time.perf_counter() - t0
    out["plan"] = pipe.memory.report if pipe.memory else "unconstrained FP8, everything on the GPU"
    out["load"] = {**gpu_peaks(), "peak_rss_gib": _proc_status("VmHWM") / GiB}
    print(name, out["plan"], flush=True)
    reset_gpu_peaks()
    text = text_encoder_check(pipe, reference) if pipe.c.text_encoder is not None else None
    out["text_encode_gpu"] = gpu_peaks()
    # (a prompt encoded once, as a user's first prompt is: part of the generation's peaks below)
    pipe.prompts = FixedPrompt(pipe.device)
    t0 = time.perf_counter()
    run(pipe, 66)  # compiles each stage size, captures graphs where the plan has them
    out["warmup_s"] = time.perf_counter() - t0
    latents: list = []
    record_latents(pipe, latents)
    _, frames33 = run(pipe, 33, seed=3)
    del pipe.codec.decode, pipe.codec.decode_parts  # the recording wrappers: the class's methods again
    reset_gpu_peaks()
    t33, _ = run(pipe, 33)
    peaks: list = []
    reset_gpu_peaks()
    t_long, _ = run(pipe, long_frames, per_chunk_peaks=peaks)
    chunks = len(peaks)
    per_chunk = (t_long - t33) / max(chunks - 1, 1)
    out.update({"t33_s": t33, "t_long_s": t_long, "long_frames": long_frames, "chunks": chunks,
                "s_per_chunk": per_chunk, "fps": 33 / per_chunk, "chunk_peaks_gib": peaks,
                "first_vs_last_chunk_peak": {"first": peaks[1] if chunks > 1 else peaks[0], "last": peaks[-1],
                                             "rel_diff": abs(peaks[-1] - peaks[min(1, chunks - 1)])
                                             / peaks[min(1, chunks - 1)]},
                "generation": {**gpu_peaks(), "peak_rss_gib": _proc_status("VmHWM") / GiB}})
    ring = pipe.model.block_stream
    if ring is not None:
        out["ring"] = {"size": ring.size, "slot_bytes": ring.slot_bytes, "max_resident": ring.max_resident,
                       "bytes_per_chunk_1_1_1": 3 * ring.slot_bytes * len(ring.host)}
    if reference is not None:
        ref_lat, ref_frames = reference["latents"], reference["frames"]
        lat_diff = max((a - b).abs().max().item() for a, b in zip(latents, ref_lat))
        mse = ((frames33.float() - ref_frames.float()) ** 2).mean().item()
        out["vs_fp8"] = {"latents_max_abs": lat_diff,
                         "frames_max_abs": (frames33.int() - ref_frames.int()).abs().max().item(),
                         "frames_psnr_db": 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")}
    if budget is not None:
        out["conditioning"] = conditioning_peaks(pipe)
    if text is not None:
        out["text_encoder"] = {k: v for k, v in text.items() if k != "embedding"}
    result = {"latents": latents, "frames": frames33, "text": text}
    del pipe
    gc.collect()
    if CUDA and torch.cuda.memory_allocated() > GiB // 2:  # something still holds the weights: drop compiled code
        out["reset_compiled_code_after"] = torch.cuda.memory_allocated() / GiB
        torch._dynamo.reset()
        gc.collect()
    cap_memory(None)
    print(name, json.dumps(out), flush=True)
    return out, result


PROMPT = "two red circles bouncing on a blue background"


def encode_timed(enc) -> tuple[torch.Tensor, float]:
    """One prompt through the pipeline's own encoder (its cache bypassed), and the seconds it took."""
    if CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    emb = enc._encode(PROMPT)
    if CUDA:
        torch.cuda.synchronize()
    return emb, time.perf_counter() - t0


def text_encoder_check(pipe, reference: dict | None) -> dict:
    """The plan's text encoder (streamed layer by layer from pinned host memory) against the unconstrained
    one (resident on the GPU): seconds per prompt (the second call: the first pins and warms up) and the
    largest difference of the embeddings (0 expected: same kernels, same weights, other residence)."""
    encode_timed(pipe.prompts)
    emb, seconds = encode_timed(pipe.prompts)
    out = {"device": str(emb.device), "s_per_prompt": seconds, "embedding": emb.float().cpu()}
    if reference is not None:
        ref = reference["text"]["embedding"]
        out["max_abs_vs_unconstrained"] = (out["embedding"] - ref).abs().max().item()
    return out


def conditioning_peaks(pipe, video_frames: int = 81) -> dict:
    """Image- and video-to-video under the plan: one chunk each, conditioned on a random image and on an
    81-frame video (the VAE encodes them first); peak GPU memory of each, or the error if it did not fit."""
    g = torch.Generator().manual_seed(5)
    h, w = SIZE["height"], SIZE["width"]
    inputs = {"image": {"image": torch.rand(3, h, w, generator=g) * 2 - 1},
              "video": {"video": torch.rand(3, video_frames, h, w, generator=g) * 2 - 1}}
    out = {}
    for name, kwargs in inputs.items():
        reset_gpu_peaks()
        try:
            for _ in pipe.stream("benchmark", num_frames=33, settings="distilled", steps=list(STEPS), seed=0,
                                 **kwargs, **SIZE):
                pass
            out[name] = gpu_peaks()
        except torch.OutOfMemoryError as e:
            out[name] = {"oom": str(e).splitlines()[0], **gpu_peaks()}
        gc.collect()
        torch.cuda.empty_cache() if CUDA else None
    out["video_frames"] = video_frames
    return out


def text_encoder_on_cpu(folder: Path, gpu_embedding: torch.Tensor) -> dict:
    """The third place the text encoder could run: the host CPU (bf16, all its cores), timed on the same
    512-token prompt, against the GPU's embeddings (a different kernel: small rounding differences)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from helios.engine.text import PromptEncoder

    t0 = time.perf_counter()
    enc = UMT5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    prompts = PromptEncoder(AutoTokenizer.from_pretrained(folder / "tokenizer"), enc, max_length=gpu_embedding.shape[1])
    emb, seconds = encode_timed(prompts)
    diff = (emb.float() - gpu_embedding).abs()
    return {"threads": torch.get_num_threads(), "load_s": load_s, "s_per_prompt": seconds,
            "max_abs_vs_gpu": diff.max().item(), "mean_abs_vs_gpu": diff.mean().item(),
            "rss_gib_after": _proc_status("VmRSS") / GiB}


def bandwidth(nbytes: int = GiB) -> dict:
    """Host-to-device copy rate from pinned and from pageable memory (median of 5)."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    res = {}
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
        res[f"{kind}_gib_s"] = nbytes / sorted(times[1:])[2] / GiB
    del dst
    torch.cuda.empty_cache()
    return res


def attention_backends() -> dict:
    """The attention each compute capability gets (forced on this card), at the 14B's largest forward."""
    from helios.model.attention import _preferred, attention, set_attention_backends
    from helios.model.backends import configure_device

    saved = list(_preferred)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 11040, 40, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    res = {}
    for cap in ((9, 0), (8, 9), (8, 6), (8, 0), (7, 5)):
        chosen = configure_device("cuda", capability=cap)
        out = attention(q, k, v)
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(5):
            attention(q, k, v)
        t1.record()
        t1.synchronize()
        res[chosen["capability"]] = {"backends": chosen["attention"], "fp8_matmul": chosen["fp8_matmul"],
                                     "ms": t0.elapsed_time(t1) / 5,
                                     "rel_error_vs_float32": ((out.float() - exact).norm() / exact.norm()).item()}
    set_attention_backends(saved)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/helios-14b-random")
    ap.add_argument("--plans", default="24gb,12gb")
    ap.add_argument("--long-frames", type=int, default=330, help="frames of the long run (1452: 60 s at 24 fps)")
    ap.add_argument("--out", default="bench-memory.json")
    ap.add_argument("--smoke", action="store_true", help="a tiny model at 64x64, unconstrained only: the script's "
                    "own plumbing, on the CPU")
    ap.add_argument("--ampere", action=argparse.BooleanOptionalAction, default=True,
                    help="also the 12 GB plan as an sm86 card gets it (forced): bf16 blocks streamed")
    args = ap.parse_args()
    if args.smoke:
        SIZE.update(height=64, width=64)
    res: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
                 "date": datetime.date.today().isoformat(), "size": f"{SIZE['width']}x{SIZE['height']}",
                 "steps": list(STEPS),
                 "prompt_embeddings": list(EMB_SHAPE)}

    def save():
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))

    folder = Path(args.folder)
    res["folder"] = write_folder(folder, "cuda" if CUDA else "cpu", smoke=args.smoke)
    print("folder", res["folder"], flush=True)
    res["bandwidth"] = bandwidth() if CUDA else {}
    save()
    res["fp8"], reference = measure("fp8", folder, None, 165 if CUDA else 66, None)  # a short run suffices
    save()
    for plan in [p for p in args.plans.split(",") if p and CUDA]:
        res[plan], _ = measure(plan, folder, plan, args.long_frames, reference)
        ring = res[plan].get("ring")
        if ring:  # the streaming alone at each link's rate, against the measured chunk time
            per_chunk = ring["bytes_per_chunk_1_1_1"]
            pinned = res["bandwidth"]["pinned_gib_s"] * GiB
            res[plan]["streaming"] = {
                "gb_per_chunk": per_chunk / 1e9, "s_at_measured_pinned": per_chunk / pinned,
                "s_at_pcie4": per_chunk / PCIE4_BYTES_PER_S,
                "predicted_fps_pcie4": 33 / max(res[plan]["s_per_chunk"], per_chunk / PCIE4_BYTES_PER_S)}
        save()
    if CUDA and reference.get("text") is not None:
        res["text_encoder_cpu"] = text_encoder_on_cpu(folder, reference["text"]["embedding"])
        save()
    if CUDA and args.ampere:
        from helios.model.backends import force_capability

        force_capability((8, 6))  # an RTX 3090's: no FP8 matmuls, FlashAttention-2, bf16 blocks streamed
        res["sm86-12gb"], _ = measure("sm86-12gb", folder, "12gb", 99, None)
        force_capability(None)
        save()
    res["attention"] = attention_backends() if CUDA else {}
    save()
    print(json.dumps({k: v for k, v in res.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
