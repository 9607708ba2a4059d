"""The generation engine: prompt (+ image or video) -> a stream of decoded chunks.

    pipe = helios.load_pipeline("path/to/Helios-Distilled", dtype=torch.bfloat16, device="cuda")
    for chunk in pipe.stream("a red fox running through snow", num_frames=1452):
        show(chunk.frames)                       # (33, H, W, 3) uint8, as soon as it is decoded
    pipe.write("fox.mp4", "a red fox ...", num_frames=1452)   # chunk by chunk, flat memory

Per chunk: sample 9 latent frames conditioned on the history buffer (sampling.sampler), push them
into the buffer, decode them with the VAE, hand the frames over. Nothing grows with the length of
the video except the output file. On CUDA after `optimize()`, chunk k is decoded on a side stream
while chunk k+1 is denoised (see `HeliosVideoPipeline.stream`, overlap_decode), except under a memory
plan that decodes after each chunk's denoising (helios.engine.memory, `MemoryPlan.overlap_decode`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from helios.engine.components import Components, load_components, model_flags
from helios.engine.conditioning import (Condition, LatentCodec, NoiseRange, image_condition, to_uint8_frames,
                                        video_condition)
from helios.engine.history import HistoryBuffer, HistoryLayout
from helios.engine.preview import DecoderChoiceError, TinyDecoder, preview_decoder_path
from helios.engine.prompts import LivePrompt, PromptSchedule
from helios.engine.text import PromptEncoder
from helios.model.graphs import GraphedForward
from helios.model_folder import CHUNK_FRAMES, TEMPORAL_COMPRESSION, read_model_index, vae_scale_factors
from helios.model.transformer import TextContext
from helios.sampling.sampler import PRESETS, SamplerSettings, denoise_chunk, preset
from helios.sampling.loading import load_scheduler

if TYPE_CHECKING:
    from helios.engine.memory import Budget, MemoryPlan, ModelSizes

log = logging.getLogger("helios")


class InputError(ValueError):
    """A request the engine cannot carry out; the message says what to change."""


@dataclass
class Chunk:
    index: int
    frames: torch.Tensor  # (T, H, W, 3) uint8 on the CPU
    first_frame: int  # position of frames[0] in the output video
    prompt: str
    seconds: float  # wall time from handing over the previous chunk (or starting) to this one
    total_chunks: int
    denoise_seconds: float = float("nan")  # device time of the sampler (CUDA events; wall time on CPU)
    decode_seconds: float = float("nan")  # device time of the VAE decode (of these frames)
    # False for frame 0 of a chunk handed over on its own (stream(first_frame_early=True)); the chunk's
    # other frames follow with the same index and complete=True.
    complete: bool = True
    decoder: str = "full"  # which decoder made the frames: "full" (the VAE) or "tiny" (the preview decoder)
    # stream(keep_latents=True): the chunk's normalised latents (1, C, 9, h, w) on the CPU, for a full
    # decode later (decode_full); set on the chunk's last part only.
    latents: torch.Tensor | None = None


@dataclass(frozen=True)
class FramePlan:
    requested: int
    chunks: int
    frames: int  # what will be produced

    @property
    def note(self) -> str | None:
        if self.frames == self.requested:
            return None
        return (f"{self.requested} frames requested; Helios writes {self.chunks} chunk(s) of {CHUNK_FRAMES} frames and the "
                f"video is trimmed to 4k+1 frames, so {self.frames} frames will be produced")


def plan_frames(num_frames: int, window: int = CHUNK_FRAMES, temporal: int = TEMPORAL_COMPRESSION,
                 max_frames: int | None = None) -> FramePlan:
    """Chunks needed for `num_frames`, and the frame count produced (as the reference rounds it).

    max_frames: a ceiling (the CLI's --max-frames), so that a typo does not start a job of days."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
    if max_frames is not None and num_frames > max_frames:
        raise InputError(f"{num_frames} frames is more than the limit of {max_frames} ({max_frames / 24 / 60:.1f} "
                         "min at 24 fps); ask for fewer frames, or raise the limit with --max-frames")
    chunks = math.ceil(num_frames / window)
    produced = (chunks * window - 1) // temporal * temporal + 1
    return FramePlan(num_frames, chunks, produced)


@dataclass(frozen=True)
class PipelineSpec:
    """The facts about a loaded pipeline that checking a request needs, and those checks.

    Small and picklable: a server whose pipelines live in other processes (an engine group) checks
    jobs in its own process against the spec its engines send back.
    """

    default_size: tuple[int, int]  # (height, width) the model was made for
    default_preset: str
    stages: int  # the scheduler's pyramid stages
    pixels_per_token: int  # frame pixels per latent token along height/width: VAE factor x patch size
    # The model's own steps / guidance for its default preset (model_index.json `helios_default_sampling`),
    # as (key, value) pairs: the small bundled model wants other values than the official preset's.
    default_sampling: tuple[tuple[str, float], ...] = ()
    # model_index.json `helios_vocabulary` / `helios_example_prompt`: the words a small model was
    # trained on (empty: any prompt) and a prompt it knows.
    vocabulary: tuple[str, ...] = ()
    example_prompt: str = ""
    preview: bool = False  # a preview decoder is loaded: stream(decoder="tiny") works

    @classmethod
    def from_flags(cls, flags: dict, default_preset: str, stages: int, pixels_per_token: int,
                   preview: bool = False) -> "PipelineSpec":
        return cls(tuple(flags.get("default_size", (384, 640))), default_preset, stages, pixels_per_token,
                   tuple(sorted(flags.get("default_sampling", {}).items())), tuple(flags.get("vocabulary", ())),
                   flags.get("example_prompt", ""), preview)

    def runnable_presets(self) -> list[str]:
        """The presets this model's scheduler can run (a one-stage model cannot run the pyramid ones)."""
        names = []
        for name in sorted(PRESETS):
            try:
                self.resolve_settings(name)
            except InputError:
                continue
            names.append(name)
        return names

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` the model never saw in training (none when it declares no vocabulary)."""
        if not self.vocabulary:
            return []
        known = set(self.vocabulary)
        return list(dict.fromkeys(w for w in re.findall(r"[a-z0-9']+", prompt.lower()) if w not in known))

    def check_schedule(self, schedule: "PromptSchedule", plan: FramePlan, fps: float = 24) -> None:
        """Every prompt change starts at a chunk the video has (silently ignoring one surprises)."""
        last = plan.chunks - 1
        late = [start for start, _ in schedule.entries if start > last]
        if late:
            first = last * WINDOW_FRAMES
            raise InputError(f"a prompt change starts at chunk {late[0]}, but {plan.frames} frames make "
                             f"{plan.chunks} chunk(s), numbered from 0: the last is chunk {last}, from frame {first} "
                             f"({first / fps:.1f} s at {fps:g} fps); use a chunk up to {last} or ask for more frames "
                             f"(chunk N starts at frame {WINDOW_FRAMES} x N)")

    def check_size(self, height: int, width: int, settings: SamplerSettings) -> None:
        stages = len(settings.pyramid_steps) if settings.pyramid_steps else 1
        # Each pyramid stage halves the latents, and every stage needs whole patches.
        multiple = max(self.pixels_per_token * 2 ** (stages - 1), 16)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % multiple:
                raise InputError(f"{name}={v!r}: frame sizes must be positive multiples of {multiple} for this "
                                 f"model and sampler (its own size: {self.default_size[0]}x{self.default_size[1]})")

    def resolve_settings(self, settings: str | SamplerSettings | None, **overrides) -> SamplerSettings:
        s = preset(settings or self.default_preset) if not isinstance(settings, SamplerSettings) else settings
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if settings is None or settings == self.default_preset:  # the model's own preset: its own defaults
            overrides = {**dict(self.default_sampling), **overrides}
        if "steps" in overrides and s.pyramid_steps is not None:
            n = overrides.pop("steps")
            overrides["pyramid_steps"] = tuple([n] * len(s.pyramid_steps)) if isinstance(n, int) else tuple(n)
        s = s.with_(**overrides) if overrides else s
        if s.pyramid_steps is not None and len(s.pyramid_steps) != self.stages:
            raise InputError(f"the sampler has {len(s.pyramid_steps)} pyramid stages but this model's scheduler "
                             f"has {self.stages}; use preset {'base' if self.stages == 1 else 'mid or distilled'}")
        if s.pyramid_steps is None and self.stages != 1:
            raise InputError(f"preset 'base' samples at one resolution but this model's scheduler has {self.stages} "
                             "pyramid stages; use the mid or distilled preset")
        return s


WINDOW_FRAMES = CHUNK_FRAMES  # frames per chunk (the last chunk may be trimmed)


def default_preset(components: Components) -> str:
    return _default_preset(components.pipeline_class, components.flags)


def _default_preset(pipeline_class: str, flags: dict) -> str:
    if flags.get("is_distilled"):
        return "distilled"
    if pipeline_class == "HeliosPipeline":
        return "base"
    return "mid"


def read_spec(path: str | Path) -> PipelineSpec:
    """A model folder's PipelineSpec from its config files alone, so that a request can be checked
    before any weights are read. Raises ModelFolderError for a folder that is not a Helios model."""
    import json

    from helios.engine.components import ModelFolderError

    folder = Path(path)
    index = read_model_index(folder)
    flags = model_flags(index, folder)
    try:
        stages = int(getattr(load_scheduler(folder / "scheduler").config, "stages", 1))
        patch = json.loads((folder / "transformer" / "config.json").read_text()).get("patch_size", [1, 2, 2])
    except (OSError, ValueError, TypeError) as e:
        raise ModelFolderError(f"could not read the configs of {folder}: {e}") from e
    _, spatial = vae_scale_factors(folder)
    return PipelineSpec.from_flags(flags, _default_preset(index["_class_name"], flags), stages,
                                   spatial * int(patch[1]))


class HeliosVideoPipeline:
    def __init__(self, components: Components, max_sequence_length: int = 512, prompt_encoder=None):
        self.c = components
        self.model = components.transformer
        self.codec = LatentCodec(components.vae)
        # Small bundled models declare a shorter text length in their tokenizer; umT5's is 512 (or unset).
        limit = getattr(components.tokenizer, "model_max_length", None) or max_sequence_length
        self.prompts = prompt_encoder or PromptEncoder(components.tokenizer, components.text_encoder,
                                                       min(max_sequence_length, int(limit)))
        self.scheduler = load_scheduler(components.scheduler_config)
        self.default_preset = default_preset(components)
        self.fp8 = False
        self.optimized = False
        self.overlap_decode = False  # stream's default; optimize() turns it on
        self.decode_beside = True  # under overlap: the decode on a side stream (False: in line, see optimize)
        self.deterministic = False  # optimize(deterministic=True): the decoder's implementations fixed by shape
        self.graphs: GraphedForward | None = None  # optimize(): the forward replayed as CUDA graphs
        self._decode_stream: torch.cuda.Stream | None = None
        self.decode_timings: dict = {}  # optimize(): the decoder convolutions' timings it chose from
        self.memory: MemoryState | None = None  # apply_memory_plan(): the plan and the budget it must fit
        self.preview: TinyDecoder | None = None  # set_preview_decoder(): the tiny decoder for decoder="tiny"

    def set_preview_decoder(self, path: str | Path) -> TinyDecoder:
        """Load a TAEHV-architecture weight file as this pipeline's preview decoder (stream(decoder="tiny")).

        Refused (DecoderChoiceError, naming the file) when it is made for another latent space or layout."""
        # contiguous (NCHW) even when optimized: on an H200, 2026-12-03, it decoded faster than channels-last
        tiny = TinyDecoder.from_file(path, self.c.vae.config).to(self.codec.device, self.codec.dtype)
        self.preview = tiny
        return tiny

    def optimize(self, compile: bool = True, fp8: bool = False, fuse: bool = True,
                 overlap_decode: bool = True, cuda_graphs: bool = True,
                 deterministic: bool = False, decode_beside: bool = True) -> "HeliosVideoPipeline":
        """The fast inference path: fused q/k/v projections, optional FP8 matmuls, compiled blocks,
        and on CUDA each forward replayed as a CUDA graph (one per pyramid stage size; helios.model.graphs),
        the VAE decode's fast path (LatentCodec.fast_decode_: channels-last, tuned convolutions, CUDA
        graphs), and each chunk's VAE decode overlapped with the next chunk's denoising (see `stream`).
        deterministic: the decoder's convolutions by a fixed rule of their shapes instead of timed
        (helios.model.wan_vae.static_impl), so that every run decodes alike.
        decode_beside: under overlap, each decode runs on a side stream beside the next chunk's denoising;
        False queues it in line, between the chunks' denoising on one stream, the host still queuing a chunk
        ahead (see `stream`).

        Compilation and graph capture happen lazily on the first chunk (once per pyramid stage size).
        """
        self.overlap_decode = overlap_decode
        self.decode_beside = decode_beside
        self.deterministic = deterministic
        self.optimized = True
        if self.device.type == "cuda":
            if cuda_graphs:
                self.graphs = GraphedForward(self.model)
            if self.codec.device.type == "cuda":
                h, w = self.default_size
                # Sliced decodes are tuned at the slice's size (a whole chunk's working set may not fit) and
                # run without a graph (each slice continues the previous one's state).
                frames = self.codec.decode_slice or HistoryLayout().chunk_frames
                self.decode_timings = self.codec.fast_decode_(
                    (1, self.codec.channels, frames, h // self.codec.spatial, w // self.codec.spatial),
                    graphs=cuda_graphs and self.codec.decode_slice is None, deterministic=deterministic)
        if fuse:
            self.model.fuse_projections_()
        if fp8:
            from helios.model.fp8 import quantize_blocks_

            quantize_blocks_(self.model)
            self.fp8 = True
        if compile:
            self.model.compile_blocks_()
        return self

    def apply_memory_plan(self, memory: "MemoryState", compile: bool = False) -> None:
        """Put the parts where the plan says (the transformer was loaded for it): VAE slices, the text encoder
        streamed layer by layer, the blocks streamed through a ring (compiled if `compile`). Requests are then
        checked against it. After `optimize()`: the ring's resident blocks are copies of the host blocks as
        they are then (fused, FP8, their kernels chosen), so that they run what the resident model runs."""
        from helios.engine.components import ModelFolderError, stream_text_encoder_
        from helios.model.offload import enable_block_streaming

        self.memory = memory
        plan = memory.plan
        self.codec.decode_slice = plan.decode_slice
        undefer_tap_sums(self.codec)
        if not plan.overlap_decode:
            self.overlap_decode = False
        device = self.device
        if plan.text_encoder == "layers" and self.c.text_encoder is not None:
            try:  # (load_pipeline has done it already, before the transformer was read)
                stream_text_encoder_(self.c.text_encoder, device)
            except ModelFolderError as e:
                raise InputError(str(e)) from e
        if plan.stream_blocks and self.model.block_stream is None:
            ring = enable_block_streaming(self.model, plan.ring_size, device)
            if compile:
                ring.compile_()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was made for: 384x640 for the released models."""
        return tuple(self.c.flags.get("default_size", (384, 640)))

    @property
    def spec(self) -> "PipelineSpec":
        """What checking a request needs from this pipeline, without its weights (see PipelineSpec)."""
        return PipelineSpec.from_flags(self.c.flags, self.default_preset,
                                       int(getattr(self.scheduler.config, "stages", 1)),
                                       self.codec.spatial * self.model.config.patch_size[1],
                                       preview=self.preview is not None)

    # ---- checks -----------------------------------------------------------------------------
    def check_size(self, height: int, width: int, settings: SamplerSettings) -> None:
        self.spec.check_size(height, width, settings)

    def resolve_settings(self, settings: str | SamplerSettings | None, **overrides) -> SamplerSettings:
        return self.spec.resolve_settings(settings, **overrides)

    # ---- the chunk loop ---------------------------------------------------------------------
    @torch.no_grad()
    def stream(
        self,
        prompt: str | PromptSchedule | LivePrompt,
        *,
        negative_prompt: str = "",
        image: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        num_frames: int = 132,
        height: int | None = None,
        width: int | None = None,
        settings: str | SamplerSettings | None = None,
        guidance_scale: float | None = None,
        steps: int | Sequence[int] | None = None,
        amplify_first_chunk: bool | None = None,
        first_frame_early: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        history_sizes: tuple[int, int, int] = (16, 2, 1),
        keep_first_frame: bool = True,
        skip_first_chunk: bool = False,
        condition_noise: bool = True,
        image_noise: tuple[float, float] = (0.111, 0.135),
        video_noise: tuple[float, float] = (0.111, 0.135),
        on_step: Callable[[int, int, int], None] | None = None,
        overlap_decode: bool | None = None,
        decoder: str = "full",
        keep_latents: bool = False,
    ) -> Iterator[Chunk]:
        """Generate a video chunk by chunk, yielding each chunk's frames as soon as they are decoded.

        image: (3, H, W) or (1, 3, H, W) in [-1, 1] for image-to-video; video: (3, T, H, W) or
        (1, 3, T, H, W) in [-1, 1] for video-to-video (see engine.video_io to read files).
        on_step(chunk, stage, step) is called after every solver step is queued.
        amplify_first_chunk: None follows the settings (the distilled preset doubles the first chunk's
        steps, as the official script does); False samples it like every other chunk, so the first
        frame comes about twice as soon, at some cost to the first chunk (`helios generate --fast-start`).
        first_frame_early: hand over the first chunk's frame 0 as soon as the VAE has decoded it (the
        causal decoder makes it first, from latent frame 0 alone), as a Chunk of one frame with
        complete=False, then the chunk's other frames; the frames are the same (`--fast-start`). Under
        overlap that frame goes out before the next chunk is queued, so that its decode does not share the GPU.

        overlap_decode (CUDA only; elsewhere the chunks run one after the other): None follows
        `optimize()` (on), except for a LivePrompt, which stays sequential unless asked; a memory plan
        that decodes after the denoising (`MemoryPlan.overlap_decode` off) keeps it off. With it,
        chunk k's VAE decode and copy to the host are queued on a side stream, chunk k+1's denoising
        is queued on the main stream without the host waiting (no sync until then), and only then
        is chunk k waited for and yielded, so the GPU is not idle while the host takes a chunk and
        the decode shares the GPU with the transformer. The frames, the chunk count and the random
        draws are the same. What moves is the order seen from outside: chunk k+1's prompt is read
        (a LivePrompt steer lands one chunk later) and its on_step calls run (an exception there ends
        the stream without chunk k) before chunk k is yielded; hence the LivePrompt default, which
        keeps the server's steer and stop where they were. Timings under overlap: `seconds` is the
        wall time between hand-overs (the rate chunks arrive); `denoise_seconds` and
        `decode_seconds` are device intervals on the two streams, overlapping in time and stretched
        by sharing the GPU (mostly the denoising: the decode's stream has priority), so together
        they exceed `seconds`. With `optimize(decode_beside=False)` the decode is queued in line instead,
        between chunk k's and chunk k+1's denoising on one stream: the host still queues a chunk ahead (no
        idle GPU), the two never share it, and the intervals do not overlap.

        decoder: "full" decodes with the VAE; "tiny" with the preview decoder (set_preview_decoder /
        load_pipeline(preview_decoder=...)), far cheaper, for live previews; the frame counts are the same.
        keep_latents: each chunk also carries its latents (Chunk.latents) for a full decode afterwards.
        """
        schedule = prompt if isinstance(prompt, LivePrompt) else PromptSchedule.coerce(prompt)
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        s = self.resolve_settings(settings, guidance_scale=guidance_scale, steps=steps,
                                  amplify_first_chunk=amplify_first_chunk)
        self.check_size(height, width, s)
        if self.memory is not None:
            self.memory.check(height, width, s.guidance_scale > 1.0)
        plan = plan_frames(num_frames)
        if isinstance(schedule, PromptSchedule):
            self.spec.check_schedule(schedule, plan)
        if image is not None and video is not None:
            raise InputError("give an image or a video to start from, not both")
        frames_decoder = self._decoder(decoder)
        if plan.note:
            log.info(plan.note)
        device = self.device
        if generator is None:
            if seed is None:
                seed = torch.seed() % 2**63
                if getattr(self.model, "context_parallel", None) is not None:  # every rank must draw the same noise
                    from helios.runtime import broadcast_seed

                    seed = broadcast_seed(seed, self.model.context_parallel.group)
            generator = torch.Generator(device="cpu").manual_seed(seed)
        layout = HistoryLayout(tuple(history_sizes), chunk_frames=9, keep_first_frame=keep_first_frame)
        h, w = height // self.codec.spatial, width // self.codec.spatial
        shape = (1, self.model.config.in_channels, layout.chunk_frames, h, w)
        history = HistoryBuffer(1, shape[1], h, w, layout, device=device)
        start = self._condition(image, video, height, width, layout, generator, condition_noise,
                                NoiseRange(*image_noise), NoiseRange(*video_noise))
        if start.history is not None:
            history.push(start.history)
        if start.anchor is not None:
            history.set_anchor(start.anchor)
        indices = {k: v.to(device) for k, v in layout.indices().items()}
        window = (layout.chunk_frames - 1) * self.codec.temporal + 1
        cuda = device.type == "cuda"
        overlap = cuda and self._overlap(overlap_decode, isinstance(schedule, LivePrompt))
        beside = overlap and self.decode_beside
        if beside and (self._decode_stream is None or self._decode_stream.device != device):
            # One per pipeline: the caching allocator keeps a memory pool per stream. High priority:
            # as SMs free up the decode's blocks go first, so chunk k is ready about as early as
            # without overlap, and the transformer fills the rest.
            self._decode_stream = torch.cuda.Stream(device, priority=-1)
        side = self._decode_stream if beside else None
        # Page-locked buffers the frames are copied into (two under overlap: chunk k+1's copy is
        # queued before chunk k is read out of its buffer).
        pinned = [torch.empty((window, height, width, 3), dtype=torch.uint8, pin_memory=True)
                  for _ in range(2 if overlap else 1)] if cuda else [None]
        produced = 0
        pending: list[_Handoff] = []  # chunks being decoded, oldest first
        resumed = time.perf_counter()
        try:
            # Text K/V are made again only when the prompts (or their blend) change: a model whose blocks are
            # streamed would read every block for them.
            text, last_key, uncond = None, None, None
            for k in range(plan.chunks):
                key = schedule.at(k)
                if key != last_key:
                    text_prompt, embeds = self._prompt_embeds(key)
                    text, last_key = self.model.prepare_text(embeds), key
                if s.guidance_scale > 1.0 and uncond is None:
                    uncond = self.model.prepare_text(self.prompts(negative_prompt, dtype=self.model.dtype).to(device))
                predict = self._predictor(history.model_inputs(self.model.dtype), indices, text, uncond)
                step_cb = (lambda stage, i, k=k: on_step(k, stage, i)) if on_step else None
                marks = _Marks(device)
                latents = denoise_chunk(predict, shape, self.scheduler, s, generator, device, first_chunk=(k == 0),
                                        noise_dtype=self.model.dtype, on_step=step_cb, non_blocking=overlap)
                marks.mark()
                if keep_first_frame and ((k == 0 and history.anchor is None) or (skip_first_chunk and k == 1)):
                    history.set_anchor(latents[:, :, :1])
                history.push(latents)
                keep = min(window, plan.frames - produced)
                fields = {"index": k, "first_frame": produced, "prompt": text_prompt, "total_chunks": plan.chunks,
                          "decoder": decoder}
                pending.append(_Handoff(frames_decoder, latents, keep, side, pinned[k % len(pinned)], marks,
                                        fields, split_first=first_frame_early and k == 0, keep_latents=keep_latents))
                produced += keep
                if overlap and pending[-1].count > 1 and k < plan.chunks - 1:
                    # An early frame 0 goes out before the next chunk is queued, so that its decode has the GPU
                    # to itself (the rest of the chunk's decode, already queued, keeps the GPU busy meanwhile).
                    for chunk in pending[-1].chunks(since=resumed, parts=1):
                        yield chunk
                        resumed = time.perf_counter()
                # Under overlap chunk k-1 goes out only now, once chunk k's work is queued behind its decode.
                while len(pending) > (1 if overlap and k < plan.chunks - 1 else 0):
                    for chunk in pending.pop(0).chunks(since=resumed):
                        yield chunk
                        resumed = time.perf_counter()
        finally:
            for handoff in pending:  # stopped early: queued copies land before their buffers are freed
                handoff.wait()

    def generate(self, prompt: str | PromptSchedule, **kwargs) -> torch.Tensor:
        """The whole video as one (T, H, W, 3) uint8 tensor (for short videos; use stream/write for long ones)."""
        return torch.cat([c.frames for c in self.stream(prompt, **kwargs)], dim=0)

    def write(self, path: str | Path, prompt: str | PromptSchedule, fps: int = 24, **kwargs) -> int:
        """Generate straight into an mp4, chunk by chunk; the file appears at `path` when complete."""
        from helios.engine.video_io import VideoWriter

        frames = 0
        with VideoWriter(path, fps=fps) as out:
            for chunk in self.stream(prompt, **kwargs):
                out.write(chunk.frames)
                frames += chunk.frames.shape[0]
        return frames

    @torch.no_grad()
    def decode_full(self, latents: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """A chunk's latents (Chunk.latents) -> its frames (T, H, W, 3) uint8 on the CPU, by the full VAE."""
        out = to_uint8_frames(self.codec.decode(latents.to(self.codec.device)))[0]
        return (out if frames is None else out[:frames]).cpu()

    # ---- pieces -----------------------------------------------------------------------------
    def _overlap(self, requested: bool | None, live: bool) -> bool:
        """Whether stream() queues a chunk ahead of the one it hands over (on CUDA): as asked, else optimize()'s
        setting (off for a LivePrompt); never beside the denoising under a memory plan that counts the two
        working sets as one (in line, `decode_beside=False`, the plan's one working set holds)."""
        if self.memory is not None and not self.memory.plan.overlap_decode and self.decode_beside:
            return False
        return (self.overlap_decode and not live) if requested is None else requested

    def _decoder(self, choice: str):
        """The object decoding the frames (LatentCodec or TinyDecoder) for stream(decoder=...)."""
        if choice == "full":
            return self.codec
        if choice == "tiny":
            if self.preview is None:
                raise InputError("decoder='tiny' needs a preview decoder: load the pipeline with "
                                 "preview_decoder=PATH (helios generate --decoder tiny[:PATH])")
            return self.preview
        raise InputError(f"decoder must be 'full' or 'tiny', got {choice!r}")

    def _prompt_embeds(self, key: tuple[tuple[str, str | None], float]) -> tuple[str, torch.Tensor]:
        """(prompt shown, embeddings) for a schedule entry `PromptSchedule.at(chunk)`."""
        (a, b), weight = key
        ea = self.prompts(a, dtype=self.model.dtype).to(self.device)
        if b is None or weight == 0.0:
            return a, ea
        eb = self.prompts(b, dtype=self.model.dtype).to(self.device)
        return (b if weight >= 0.5 else a), torch.lerp(ea, eb, weight)

    def _predictor(self, history: dict[str, torch.Tensor], indices: dict[str, torch.Tensor], text: TextContext,
                   uncond: TextContext | None):
        model = self.model
        layouts: dict[tuple[int, ...], object] = {}
        kwargs = {**history, **indices}
        # Context-parallel forwards run collectives between ranks: those stay out of graphs.
        graphs = self.graphs if model.context_parallel is None else None

        def forward(x: torch.Tensor, t: torch.Tensor, ctx: TextContext, slot: int) -> torch.Tensor:
            layout = layouts[tuple(x.shape)]
            if graphs is not None:
                return graphs(x, t, ctx, layout, kwargs, slot=slot)
            return model(x, t, ctx, layout=layout, **kwargs).sample

        def predict(x: torch.Tensor, t: torch.Tensor, with_uncond: bool):
            key = tuple(x.shape)
            if key not in layouts:
                layouts[key] = model.layout_for(key, **kwargs)
            xin = x.to(model.dtype)
            cond = forward(xin, t, text, 0)
            return cond, (forward(xin, t, uncond, 1) if with_uncond else None)

        return predict

    def _condition(self, image, video, height, width, layout, generator, noise_on, image_noise, video_noise
                   ) -> Condition:
        if image is not None:
            image = _as_batch(image, 4, "image", height, width)
            return image_condition(self.codec, image, layout.chunk_frames, generator,
                                   image_noise if noise_on else None, video_noise)
        if video is not None:
            video = _as_batch(video, 5, "video", height, width)
            try:
                return video_condition(self.codec, video, layout.chunk_frames, generator,
                                       video_noise if noise_on else None, image_noise)
            except ValueError as e:
                raise InputError(str(e)) from e
        return Condition()


class _Marks:
    """Interval timing without host synchronisation: CUDA events on the GPU, the wall clock elsewhere.

    On CUDA the events go on the device's current stream, so the intervals are those of the work
    queued there (the side stream's, for a decode under overlap).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.points = [self._now()]

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record(torch.cuda.current_stream(self.device))
            return e
        return time.perf_counter()

    def mark(self) -> None:
        self.points.append(self._now())

    def interval(self, i: int) -> float:
        """Seconds from mark i to mark i + 1 (on CUDA both must have been reached)."""
        a, b = self.points[i], self.points[i + 1]
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


class _Handoff:
    """One chunk's frames on their way to the host: VAE decode, uint8 and (CUDA) copy, queued when made.

    side: the CUDA stream to queue them on (overlap). It first waits for everything queued so far on
    the current stream (this chunk's denoising and history push); `latents`, made on the current
    stream and read on the side one, is held until the copy is known to be done, so its memory cannot
    be handed out again meanwhile. None: queued in line on the current stream.
    pinned: the page-locked buffer the frames land in on CUDA (None elsewhere: they are on the host).
    split_first: frame 0 is decoded and copied first and handed over on its own (a part of its own
    that can be waited for before the rest of the decode).
    codec: what decodes (LatentCodec, or the preview decoder: both have decode and decode_parts).
    keep_latents: the last part carries the latents, copied to the host (for a full decode later).
    """

    def __init__(self, codec: LatentCodec | TinyDecoder, latents: torch.Tensor, keep: int,
                 side: torch.cuda.Stream | None, pinned: torch.Tensor | None, denoise: _Marks, fields: dict,
                 split_first: bool = False, keep_latents: bool = False) -> None:
        self.latents, self.denoise, self.fields = latents, denoise, fields
        self.keep_latents = keep_latents
        device = latents.device
        split = split_first and keep > 1
        self.count = 2 if split else 1
        # Lazily, both: the decode must run after the first decode mark (and, on CUDA, on the side stream).
        decoded = codec.decode_parts(latents) if split else (codec.decode(latents) for _ in range(1))
        # parts: (first frame index in the chunk, frames, copy-done event or None), each timed by the decode
        # marks around it. On CUDA they are queued now (the host does not wait); on the host each part is
        # decoded only as it is handed over, so that frame 0 can go out before the rest is decoded.
        self.parts: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []
        self._lazy: Iterator | None = None
        self.handed = 0  # parts handed over so far
        if pinned is None:
            self.decode = _Marks(device)
            self._lazy = self._parts(decoded, keep, None, device)
            return
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            self.decode = _Marks(device)
            self.parts = list(self._parts(decoded, keep, pinned, device))

    def _parts(self, decoded: Iterator[torch.Tensor], keep: int, pinned: torch.Tensor | None,
               device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.cuda.Event | None]]:
        start = 0
        for part in decoded:
            frames = to_uint8_frames(part)[0, :keep - start]
            self.decode.mark()
            copied = None
            if pinned is not None:
                frames = pinned[start:start + frames.shape[0]].copy_(frames, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(torch.cuda.current_stream(device))
            yield start, frames, copied
            start += frames.shape[0]

    def wait(self) -> None:
        """Block until the queued frames are on the host (the one wait for the device per chunk)."""
        for _, _, copied in self.parts:
            if copied is not None:
                copied.synchronize()

    def chunks(self, since: float, parts: int | None = None) -> Iterator[Chunk]:
        """The chunk's frames, each part as soon as it is on the host; `since` for the first part's seconds.
        parts: hand over at most this many (a later call goes on from the next)."""
        source = self._lazy if self._lazy is not None else iter(self.parts[self.handed:])
        for start, frames, copied in itertools.islice(source, parts):
            n = self.handed
            self.handed += 1
            if copied is not None:
                copied.synchronize()  # its decode mark, queued before the copy, is done too
                frames = torch.empty(frames.shape, dtype=frames.dtype).copy_(frames)  # the buffer is reused
            fields = {**self.fields, "first_frame": self.fields["first_frame"] + start}
            if self.keep_latents and n == self.count - 1:
                fields["latents"] = self.latents.detach().to("cpu", torch.float32)
            yield Chunk(frames=frames, seconds=time.perf_counter() - since,
                        denoise_seconds=self.denoise.interval(0), decode_seconds=self.decode.interval(n),
                        complete=n == self.count - 1, **fields)
            since = time.perf_counter()


def _as_batch(x: torch.Tensor, ndim: int, name: str, height: int, width: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a tensor in [-1, 1]; read files with helios.engine.video_io")
    if x.dim() == ndim - 1:
        x = x[None]
    if x.dim() != ndim or x.shape[1] != 3:
        want = "(3, H, W)" if name == "image" else "(3, T, H, W)"
        raise InputError(f"{name} must have shape {want} with 3 colour channels, got {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (height, width):
        raise InputError(f"{name} is {x.shape[-1]}x{x.shape[-2]} but the video is {width}x{height}: resize it "
                         "first (helios.engine.video_io reads files at a given size)")
    return x.float()


@dataclass(frozen=True)
class MemoryState:
    """A pipeline's memory plan and the budget every request must fit."""

    plan: "MemoryPlan"
    budget: "Budget"
    sizes: "ModelSizes"
    report: str = ""  # the plan and its estimate, as printed

    def check(self, height: int, width: int, guidance: bool) -> None:
        from helios.engine.memory import estimate, fitting_options

        need = estimate(self.plan, self.sizes, height, width, guidance)
        if need.total > self.budget.usable:
            raise InputError(f"{width}x{height}{' with guidance' if guidance else ''} needs about "
                             f"{need.total / 2**30:.1f} GiB under the {self.plan.name} memory plan, more than the "
                             f"{self.budget.usable / 2**30:.1f} GiB --memory {self.budget.name} allows. "
                             + fitting_options(self.budget, self.sizes, height, width, guidance, self.plan.fp8))


def model_defaults(path: str | Path) -> tuple[tuple[int, int], str]:
    """((height, width), preset name) a model folder generates with by default, from model_index.json."""

    index = read_model_index(Path(path))
    preset_name = ("distilled" if index.get("is_distilled") else
                   "base" if index.get("_class_name") == "HeliosPipeline" else "mid")
    return tuple(index.get("helios_default_size", (384, 640))), preset_name


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  vae_dtype: torch.dtype | None = None, optimize: bool | None = None,
                  fp8: bool = False, memory_budget: str | None = None, height: int | None = None,
                  width: int | None = None, preset: str | None = None, guidance_scale: float | None = None,
                  preview_decoder: str | Path | None = None, deterministic: bool = False) -> HeliosVideoPipeline:
    """Load a model folder in the official layout (model_index.json, transformer/, vae/, ...).

    preview_decoder: a TAEHV-architecture weight file for stream(decoder="tiny") (taew2_1.pth for Wan2.1
    latents, or one made by `helios train-decoder`), or "tiny" for the model folder's own
    (preview_decoder/taehv.safetensors). Checked before the model's weights are read.

    optimize: the fast path (fused projections, compiled blocks, CUDA graphs, decode overlapped with
    denoising); default on for CUDA, off elsewhere.
    fp8: FP8 matmuls in the transformer blocks (CUDA, sm89 or newer; bf16 elsewhere, with a warning).
    memory_budget: "24gb", "12gb", any "<N>gb" or "auto" (CUDA): a plan that fits is chosen from the
    folder's configs before anything is loaded (helios.engine.memory; logged, and kept in
    `pipe.memory.report`); height/width/preset/guidance_scale: what it must fit (default: the model's own).
    A budget no plan fits raises MemoryBudgetError with the figure needed and what would fit.
    deterministic: kernels chosen without timing (helios.runtime.use_deterministic_kernels; process-wide, set
    here before anything is compiled) and the VAE decoder's implementations fixed by shape (wan_vae.static_impl),
    so that runs and memory plans repeat each other's frames far more often (`helios generate --deterministic`).
    Not a guarantee on a GPU: a compiled forward was measured to change between processes (docs/memory.md).
    """
    preview_path = None
    if preview_decoder is not None:
        try:
            preview_path = preview_decoder_path(path, None if str(preview_decoder) == "tiny" else preview_decoder)
            if not preview_path.is_file():
                raise DecoderChoiceError(f"preview decoder {preview_path}: no such file")
        except DecoderChoiceError as e:
            raise InputError(str(e)) from e
    from helios.model.backends import configure_device

    if deterministic:
        from helios.runtime import use_deterministic_kernels

        use_deterministic_kernels()
    device = torch.device(device)
    kernels = configure_device(device) if device.type == "cuda" else {}
    if fp8 and kernels and not kernels["fp8_matmul"]:
        log.warning("FP8 matmuls need sm89 or newer; this %s runs the transformer in bf16", kernels["capability"])
        fp8 = False
    memory = None
    if memory_budget is not None:
        memory = plan_memory(path, memory_budget, device, height, width, preset, guidance_scale, fp8)
        fp8 = memory.plan.fp8
        if torch.device(device).type == "cuda":  # before the weights arrive: they take the first segments
            from helios.runtime import use_expandable_segments

            use_expandable_segments()
    plan = memory.plan if memory else None
    pipe = HeliosVideoPipeline(load_components(
        path, dtype=dtype, device=device, vae_dtype=vae_dtype, fp8=fp8,
        blocks_on_host=bool(plan and plan.stream_blocks),
        text_device="cpu" if plan and plan.text_encoder == "layers" else None,
        stream_text_to=device if plan and plan.text_encoder == "layers" else None))
    if preview_path is not None:
        try:
            pipe.set_preview_decoder(preview_path)
        except DecoderChoiceError as e:
            raise InputError(str(e)) from e
    if optimize is None:
        optimize = device.type == "cuda"
    if plan is not None:  # before optimize(): the decode is tuned at the slice's size, as it will run
        pipe.codec.decode_slice = plan.decode_slice
        undefer_tap_sums(pipe.codec)
    if optimize or fp8:
        pipe.optimize(compile=optimize, fp8=fp8, cuda_graphs=optimize and (plan is None or plan.cuda_graphs),
                      overlap_decode=plan is None or plan.overlap_decode, deterministic=deterministic)
    pipe.deterministic = deterministic
    if memory is not None:
        pipe.apply_memory_plan(memory, compile=optimize)
    return pipe


def undefer_tap_sums(codec: LatentCodec) -> None:
    """Under a memory budget the per-tap convolution sums its partial outputs at once. Deferred into the next
    fused norm, all of them live until it reads them: a whole chunk's decode peaked at 21.7 GB instead of
    15.6 (H200, benchmarks/NOTES.md), more than the plans' decode estimate allows."""
    if codec.decoder is not None:
        codec.decoder.defer_tap_sums = False


def plan_memory(path: str | Path, memory_budget: str, device: torch.device, height: int | None = None,
                width: int | None = None, preset_name: str | None = None, guidance_scale: float | None = None,
                fp8: bool = False) -> MemoryState:
    """Choose the memory plan for a folder and a request (defaults: the model's size and preset), and log it."""
    from helios.engine.memory import ModelSizes, plan_for

    (h0, w0), p0 = model_defaults(path)
    height, width = height or h0, width or w0
    name = preset_name or p0
    guidance = (guidance_scale if guidance_scale is not None else preset(name).guidance_scale) > 1.0
    sizes = ModelSizes.from_folder(path)
    plan, est, budget = plan_for(memory_budget, path, height, width, guidance, device, fp8_requested=fp8,
                                 sizes=sizes)
    report = (f"memory plan for --memory {budget.name} ({budget.usable / 2**30:.1f} GiB usable) at "
              f"{width}x{height}, preset {name}: {plan.describe()}; {est.summary()}")
    log.info(report)
    return MemoryState(plan, budget, sizes, report)
