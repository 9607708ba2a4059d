"""The small Helios we ship: parts sized for a laptop CPU, in the official model-folder layout.

    text_encoder/ + tokenizer/   a word-level tokenizer over the synthetic captions' vocabulary and a
                                 2-layer T5 encoder pretrained here to read captions (every token's output
                                 predicts the background colour and the count of each coloured shape),
                                 then frozen: the transformer reads it as Helios reads a frozen umT5
    vae/                         a small Wan-architecture VAE (AutoencoderKLWan), trained here on the
                                 synthetic videos (reconstruction + a light KL term)
    transformer/                 a small Helios transformer, trained by `helios train` (stages 1-3)
    scheduler/                   the Helios scheduler config of the preset the folder is for

`python -m helios.train.tiny vae OUT_DIR` trains the VAE and writes a starting model folder whose
transformer is freshly initialised; the transformer stages then run from that folder.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from helios import model_folder as helios_model_folder
from helios.scenes import CLASSIC_SHAPES, COLORS, COUNT_WORDS, SHAPES
from helios.model.config import named_config
from helios.model.loading import save_transformer
from helios.model.transformer import build_transformer
from helios.model_folder import CHUNK_FRAMES

if TYPE_CHECKING:
    from helios.train.synthetic import SyntheticConfig

FRAME_SIZE = (64, 64)  # height, width of the shipped model's videos (small enough to train on a CPU)
TEXT_DIM = 64
MAX_TOKENS = 32
TEXT_PRETRAIN_STEPS = 600  # caption pretraining of the text encoder (~20 s on a CPU)
# The VAE trains on whole chunks (CHUNK_FRAMES, 9 latent frames): trained on 17-frame clips
# (5 latent frames), it reconstructed frames 17-32 of every chunk with ~8x the error of frames 0-16
# (mean absolute error 0.28-0.66 against 0.05-0.08 per latent frame), and the transformers trained on
# those latents faded each chunk (docs/tiny-model.md).
# Object radius / half side as a fraction of the frame (the synthetic default is 0.07-0.14): 6-12 pixels,
# 1.5-3 latent pixels at the 4x VAE. Run 7's mid model, trained on the default sizes (1-2 latent pixels),
# learnt the captions' backgrounds but drew their objects in 3.5% of frames.
OBJECT_SIZE = (0.10, 0.18)
# Weight of object pixels in the VAE's reconstruction loss (background pixels weigh 1). Objects cover a
# few percent of a frame, and with a plain loss run 9's VAE kept frame 0's objects but faded, darkened or
# recoloured them over the rest of each chunk (docs/tiny-model.md, "Run 9"): the transformers learnt
# exactly those latents. Run 10 continued that VAE with weight 4 (426 steps x 48 on the GPU): the object-pixel
# error went from 0.21-0.51 per latent frame to 0.06-0.12, flat over the chunk, and the whole-frame error
# fell too (0.08-0.12 -> 0.05-0.09).
OBJECT_WEIGHT = 4.0
# How a base (stage-1) bundle samples by default, written into its model_index.json
# (`helios_default_sampling`): the official base preset's CFG 5 oversaturates the small model. Run 10's base
# model, 20 steps, over 8 held-out captions x 2 seeds: background right in 36% of frames at CFG 5, 66% at
# CFG 3, 81% at CFG 2 (object colours present 74%, 74%, 70%). Run 11's: 100 / 95 / 83% at CFG 1.25 / 1.5 / 2,
# object colours 73 / 76 / 77%: 1.5 keeps nearly all of CFG 2's objects and gets the backgrounds right.
BASE_SAMPLING = {"steps": 20, "guidance_scale": 1.5}
# The same for a mid (stage-2) bundle, whose steps stay the mid preset's: run 11's mid model, 8 held-out
# captions x 2 seeds, background right in 47 / 74 / 86 / 93% of frames at CFG 3 / 2 / 1.5 / 1 (run 10's: 14%
# at CFG 5). 1.5 rather than 1: it is the stage-3 teacher's guidance (configs/tiny/stage3*.yaml), and counts
# are right in 27% of frames against 24%.
MID_SAMPLING = {"guidance_scale": 1.5}


def scene_config(seed: int = 0, num_frames: int = 24 * 60, grammar: str = "classic") -> "SyntheticConfig":
    """The synthetic scenes of the small model: its frame size and object sizes (and caption grammar)."""
    from helios.train.synthetic import SyntheticConfig

    return SyntheticConfig(height=FRAME_SIZE[0], width=FRAME_SIZE[1], num_frames=num_frames,
                           size_range=OBJECT_SIZE, seed=seed, grammar=grammar)


README_PROMPT = "two red circles bouncing on a blue background"


def held_out_captions(n: int, seed: int = 2000, grammar: str = "classic") -> list[str]:
    """The README's prompt, then the captions of synthetic scenes of a seed no training set uses: what
    the prompt-adherence benchmark and the bundled model's test generate from."""
    from helios.train.synthetic import SyntheticConfig, SyntheticVideo

    cfg = SyntheticConfig(seed=seed, grammar=grammar)
    return [README_PROMPT, *(SyntheticVideo.from_index(i, cfg).caption for i in range(n - 1))]


# Tokens of the wide caption grammar (helios.scenes) that the first vocabulary lacked, in the order they
# were added: appended after it, so every older token keeps its id and the bundled model's tokenizer reads
# the classic captions exactly as before. A new word goes at the end of this list, never in the middle.
ADDED_TOKENS = ("triangle", "triangles", "floating", "drifting", "over", ",")


def vocabulary() -> list[str]:
    """Every word a synthetic caption uses (both grammars), plus the specials a T5 tokenizer needs."""
    words = set(COLORS) | set(CLASSIC_SHAPES) | {s + "s" for s in CLASSIC_SHAPES} | set(COUNT_WORDS)
    words |= {"bouncing", "on", "background", "and", "moving", "with"}
    return ["<pad>", "</s>", "<unk>", *sorted(words), *ADDED_TOKENS]


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=MAX_TOKENS)


def build_text_encoder(seed: int = 0, pretrain_steps: int = TEXT_PRETRAIN_STEPS, grammar: str = "classic"):
    """The tiny T5 encoder, pretrained on synthetic captions (`pretrain_text_encoder`) unless
    `pretrain_steps` is 0. A random encoder was not enough: with it the GPU-trained transformers ignored
    their prompts (docs/tiny-model.md), as a Wan model would with an untrained umT5."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocabulary()), d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)
    encoder = T5EncoderModel(cfg)
    if pretrain_steps > 0:
        pretrain_text_encoder(encoder, build_tokenizer(), steps=pretrain_steps, seed=seed, grammar=grammar)
    return encoder.eval()


def caption_targets(caption: str) -> tuple[int, list[int]]:
    """What a caption says, as class indices: its background colour, and how many objects of each
    (colour, shape) pair it names (0 for pairs it does not name), in `COLORS` x `SHAPES` order."""
    from helios.scenes import parse_caption

    scene = parse_caption(caption)
    colors = list(COLORS)
    counts = [0] * (len(colors) * len(SHAPES))
    for obj in scene.objects:
        counts[colors.index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)] += obj.count or 2
    return colors.index(scene.background), counts


def pretrain_text_encoder(encoder, tokenizer, steps: int = TEXT_PRETRAIN_STEPS, batch: int = 64, lr: float = 2e-3,
                          seed: int = 0, captions: int = 4096, grammar: str = "classic") -> list[float]:
    """Teach the tiny T5 to read the synthetic captions: linear heads on every token's output must
    name the caption's background colour and the count of every (colour, shape) pair. Every token then
    carries the whole scene, so any attention pattern of the transformer's cross-attention can read it.
    Captions come from synthetic videos of another seed than the training data's. A few seconds on a CPU."""
    from helios.train.synthetic import SyntheticConfig, SyntheticVideo

    cfg = SyntheticConfig(seed=10_000 + seed, grammar=grammar)
    texts = [SyntheticVideo.from_index(i, cfg).caption for i in range(captions)]
    bg, counts = zip(*(caption_targets(t) for t in texts))
    bg, counts = torch.tensor(bg), torch.tensor(counts)
    max_count = int(counts.max()) + 1
    tok = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    heads = torch.nn.ModuleDict({"background": torch.nn.Linear(TEXT_DIM, len(COLORS)),
                                 "counts": torch.nn.Linear(TEXT_DIM, counts.shape[1] * max_count)})
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    encoder.train()
    for step in range(steps):
        idx = torch.randint(0, len(texts), (batch,), generator=g)
        mask = tok.attention_mask[idx].bool()
        h = encoder(input_ids=tok.input_ids[idx], attention_mask=tok.attention_mask[idx]).last_hidden_state[mask]
        per_token = mask.sum(1)  # the targets of each caption, repeated for each of its tokens
        want_bg = bg[idx].repeat_interleave(per_token)
        want_counts = counts[idx].repeat_interleave(per_token, dim=0)
        loss = F.cross_entropy(heads["background"](h), want_bg) + F.cross_entropy(
            heads["counts"](h).unflatten(-1, (-1, max_count)).flatten(0, 1), want_counts.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        losses.append(loss.item())
    encoder.eval()
    return losses


def build_vae():
    """A Wan-architecture VAE that compresses 4x in time and 4x in space (not the official 8x): at 64x64
    an 8x latent is 8x8, which the pyramid's lowest stage would shrink to one token per frame."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[True, True], scale_factor_spatial=4)


def transformer_config():
    return named_config("small", text_dim=TEXT_DIM, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024,
                        num_layers=6, rope_dim=(24, 20, 20))


def clip_and_object_mask(video, start: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip (3, T, H, W) in [-1, 1] and where its objects are, (T, H, W) in {0, 1}."""
    mask = video.object_masks(np.arange(start, start + frames)).any(axis=1)
    return video.clip(start, frames), torch.from_numpy(mask.astype(np.float32))


class _SyntheticClips(torch.utils.data.IterableDataset):
    """Endless random clips of random synthetic videos with their object masks; rendering is CPU work, so
    it runs in loader workers."""

    def __init__(self, frames: int, seed: int):
        self.frames, self.seed = frames, seed

    def __iter__(self):
        from helios.train.synthetic import SyntheticVideo

        info = torch.utils.data.get_worker_info()
        rng = torch.Generator().manual_seed(self.seed * 1000 + (info.id if info else 0))
        cfg = scene_config(self.seed)
        while True:
            idx = int(torch.randint(0, 100_000, (1,), generator=rng))
            start = int(torch.randint(0, cfg.num_frames - self.frames, (1,), generator=rng))
            yield clip_and_object_mask(SyntheticVideo.from_index(idx, cfg), start, self.frames)


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                        object_weight: float = OBJECT_WEIGHT) -> torch.Tensor:
    """L1 + MSE of (B, C, T, H, W) clips with object pixels (mask (B, T, H, W)) weighing 1 + object_weight;
    normalised by the mean weight, so that its scale does not move with the objects' area."""
    w = (1.0 + object_weight * mask).unsqueeze(1)
    err = rec - x
    return ((err.abs() + err.pow(2)) * w).mean() / w.mean()


def vae_learning_rate(lr: float, step: int, done: float, warmup_steps: int) -> float:
    """The VAE's rate at `step`: a linear warm-up over `warmup_steps`, then a cosine decay to 5% of `lr`
    as `done` (the fraction of the budget spent) goes from 0 to 1."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return warm * lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    """What decodes a latent: the post-quantisation convolution and the decoder."""
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())


def train_vae(vae, steps: int, batch: int = 4, frames: int = CHUNK_FRAMES, lr: float = 3e-4, device: str = "cpu",
              latent_l2: float = 1e-6, log_every: int = 50, seed: int = 0,
              max_seconds: float | None = None, object_weight: float = OBJECT_WEIGHT,
              warmup_steps: int = 20, decoder_only: bool = False) -> list[float]:
    """Fit the VAE to synthetic clips (1 + 4k frames, a whole chunk by default): L1 + MSE reconstruction of the posterior mean's
    decoding, object pixels weighing 1 + object_weight, and a tiny L2 on the latents. A deterministic autoencoder: with a KL-regularised posterior
    sample, a young VAE's posterior noise (std ~1) swamped the means (std ~0.7) and the decoder learnt
    blur; `make_posterior_sharp` then pins the posterior's std near zero for the training cache. The
    learning rate warms up over `warmup_steps`: a trained VAE continued at full rate with a fresh
    optimizer jumped from loss 0.18 to 1.09 in two steps (CPU, from run 9's VAE). `decoder_only` freezes
    the encoder, so that the latents (and every model trained on them) stay valid."""
    import os

    workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    loader = iter(torch.utils.data.DataLoader(_SyntheticClips(frames, seed), batch_size=batch, num_workers=workers,
                                              pin_memory=torch.device(device).type == "cuda"))
    vae.to(device).train()
    params = decoder_parameters(vae) if decoder_only else list(vae.parameters())
    if decoder_only:
        vae.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    t0 = time.time()
    for step in range(steps):
        x, mask = (t.to(device, non_blocking=True) for t in next(loader))
        # Cosine decay over whichever budget (steps or seconds) runs out first.
        done = max(step / steps, (time.time() - t0) / max_seconds if max_seconds else 0.0)
        for group in opt.param_groups:
            group["lr"] = vae_learning_rate(lr, step, done, warmup_steps)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=torch.device(device).type == "cuda"):
            with torch.set_grad_enabled(not decoder_only):
                z = vae.encode(x).latent_dist.mean
            rec = vae.decode(z).sample.float()
        loss = reconstruction_loss(rec, x, mask, object_weight) + latent_l2 * z.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if max_seconds is not None and time.time() - t0 > max_seconds:
            print(f"vae: time budget of {max_seconds:.0f}s reached at step {step}", flush=True)
            break
    vae.eval().requires_grad_(True)
    make_posterior_sharp(vae)
    return losses


@torch.no_grad()
def make_posterior_sharp(vae, log_std: float = -6.0) -> None:
    """Set the encoder's log-variance outputs to a constant (std = e^log_std): posterior samples, which
    the training cache draws as the official one does, then equal the means the decoder was trained on."""
    conv = vae.quant_conv
    z = conv.weight.shape[0] // 2  # outputs are [mean | logvar]
    conv.weight[z:] = 0.0
    conv.bias[z:] = 2.0 * log_std


@torch.no_grad()
def latent_statistics(vae, device: str = "cpu", clips: int = 16, seed: int = 1) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the VAE's latents on synthetic clips: the normalisation the pipeline applies."""
    from helios.train.synthetic import SyntheticVideo

    cfg = scene_config(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    # Posterior samples, not means: the training cache holds samples, and while the VAE is young its
    # posterior noise can be larger than the spread of the means.
    zs = [vae.encode(SyntheticVideo.from_index(i, cfg).clip(0, CHUNK_FRAMES)[None].to(device)).latent_dist.sample(g)
          for i in range(clips)]
    z = torch.cat(zs, dim=2).float()
    return z.mean(dim=(0, 2, 3, 4)).tolist(), z.std(dim=(0, 2, 3, 4)).clamp(min=1e-3).tolist()


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode -> decode of clips (B, 3, T, H, W) through the posterior mean, in [-1, 1]."""
    return vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)


@torch.no_grad()
def reconstruction_errors_per_latent_frame(vae, device: str = "cpu", clips: int = 4,
                                           seed: int = 2) -> dict[str, list[float]]:
    """Mean absolute RGB error of encode -> decode on chunk-long synthetic clips, per latent frame
    (its 4 RGB frames; 1 for the first), from one reconstruction: over whole frames ("frame") and over
    the objects' pixels only ("objects": the background dominates the first, and a VAE can lose every
    object and still score well there). Flat across the chunk for a usable VAE."""
    from helios.train.synthetic import SyntheticVideo

    cfg = scene_config(seed)
    pairs = [clip_and_object_mask(SyntheticVideo.from_index(i, cfg), 0, CHUNK_FRAMES) for i in range(clips)]
    x = torch.stack([p[0] for p in pairs]).to(device)
    err = (reconstruct(vae, x) - x).abs().mean(dim=1)
    groups = [slice(0, 1), *(slice(1 + 4 * k, 5 + 4 * k) for k in range((x.shape[2] - 1) // 4))]
    weights = {"frame": torch.ones_like(err), "objects": torch.stack([p[1] for p in pairs]).to(device)}
    return {region: [((err[:, g] * w[:, g]).sum() / w[:, g].sum().clamp(min=1)).item() for g in groups]
            for region, w in weights.items()}


def reconstruction_error_per_latent_frame(vae, device: str = "cpu", clips: int = 4, seed: int = 2,
                                          region: str = "frame") -> list[float]:
    """One region ("frame" or "objects") of `reconstruction_errors_per_latent_frame`."""
    if region not in ("frame", "objects"):
        raise ValueError(f"region must be 'frame' or 'objects', not {region!r}")
    return reconstruction_errors_per_latent_frame(vae, device, clips, seed)[region]


def _prompt_help(grammar: str = "classic") -> dict:
    """model_index.json keys that tell a user which prompts the model knows (its training captions' words)."""
    from helios.scenes import EXAMPLE_CAPTION, caption_vocabulary

    return {"helios_vocabulary": caption_vocabulary(grammar), "helios_example_prompt": EXAMPLE_CAPTION}


def scheduler_for(kind: str):
    """The diffusers scheduler of a preset: one-stage HeliosScheduler (base), three-stage (mid), DMD (distilled)."""
    from diffusers import HeliosDMDScheduler, HeliosScheduler

    if kind == "base":
        return HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True)
    if kind == "mid":
        return HeliosScheduler(use_dynamic_shifting=True)
    return HeliosDMDScheduler(use_dynamic_shifting=True, time_shift_type="linear")


def _kind_flags(kind: str) -> dict[str, Any]:
    return {"_class_name": "HeliosPipeline" if kind == "base" else "HeliosPyramidPipeline",
            "is_cfg_zero_star": kind == "mid", "is_distilled": kind == "distilled"}


def write_model_folder(folder: Path, vae, transformer, kind: str = "mid",
                       text_pretrain_steps: int = TEXT_PRETRAIN_STEPS, grammar: str = "classic") -> Path:
    """Assemble a model folder in the official layout (kind: 'base', 'mid' or 'distilled')."""
    sched = scheduler_for(kind)
    index = {"_class_name": _kind_flags(kind)["_class_name"], "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", type(sched).__name__], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers", "HeliosTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"],
             "helios_default_size": list(FRAME_SIZE), **_prompt_help(grammar)}
    if kind != "base":
        index.update(_kind_flags(kind))
    parts = {"tokenizer": lambda p: build_tokenizer().save_pretrained(p),
             "text_encoder": lambda p: build_text_encoder(pretrain_steps=text_pretrain_steps,
                                                          grammar=grammar).save_pretrained(
                 p, safe_serialization=True),
             "vae": lambda p: vae.save_pretrained(p, safe_serialization=True),
             "transformer": lambda p: save_transformer(transformer, p, dtype=torch.bfloat16),  # halves the size
             "scheduler": sched.save_pretrained}
    return helios_model_folder.write_model_folder(folder, index, parts)


class _RenderedVideos(torch.utils.data.Dataset):
    """Synthetic videos ``indices[i]`` rendered whole (CPU work, so it runs in loader workers)."""

    def __init__(self, indices: list[int], cfg, frames: int):
        self.indices, self.cfg, self.frames = indices, cfg, frames

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        from helios.train.synthetic import SyntheticVideo

        v = SyntheticVideo.from_index(self.indices[i], self.cfg)
        return self.indices[i], v.clip(0, self.frames), v.caption


def build_cache(model_folder: Path, out: Path, videos: int, device: str, clip_frames: int = 4 * CHUNK_FRAMES,
                batch: int = 32, section_frames: int = CHUNK_FRAMES, grammar: str = "classic") -> None:
    """Render synthetic videos in memory and VAE-encode them on ``device`` per 33-frame section, a batch
    of videos per call, into a training latent cache (the entries ``build_latent_cache`` writes from mp4
    files). Resumable: entries already there are kept. Thousands of videos take a minute on a GPU."""
    import os

    from helios.runtime import seeded_generator
    from helios.train.data import ModelParts
    from helios.train.synthetic import SyntheticVideo
    from helios.train.video_data import entry_key, is_valid_entry, write_cache_entry

    cfg = scene_config(num_frames=clip_frames, grammar=grammar)
    out.mkdir(parents=True, exist_ok=True)
    sections = clip_frames // section_frames

    def path_of(index: int, caption: str) -> str:
        key = entry_key(f"synthetic_{index:05d}", caption, clip_frames, FRAME_SIZE, section_frames)
        return str(out / f"{key}.safetensors")

    todo = [i for i in range(videos) if not is_valid_entry(path_of(i, SyntheticVideo.from_index(i, cfg).caption))]
    parts = ModelParts(model_folder, device=device, text_max_length=MAX_TOKENS)
    workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(_RenderedVideos(todo, cfg, clip_frames), batch_size=batch,
                                         num_workers=workers, collate_fn=lambda b: list(zip(*b)))
    t0 = time.time()
    done = 0
    for indices, clips, captions in loader:
        x = torch.stack(clips)  # (B, 3, T, H, W) -> every section its own encode, as the official cache
        x = x.unflatten(2, (sections, section_frames)).transpose(1, 2).flatten(0, 1)
        z = parts.encode_video(x, seeded_generator(0, indices[0])).unflatten(0, (len(indices), sections))
        for index, latents, caption in zip(indices, z, captions):
            write_cache_entry(path_of(index, caption), latents.contiguous(), parts.encode_text(caption).to(torch.bfloat16),
                              caption=caption, source=f"synthetic:{index}", num_frames=clip_frames, size=FRAME_SIZE,
                              section_frames=section_frames, fps=str(cfg.fps))
        done += len(indices)
        print(f"cache: {done}/{len(todo)} videos ({done / max(time.time() - t0, 1e-9):.0f} videos/s)", flush=True)
    print(f"latent cache: {len(todo)} built, {videos - len(todo)} already cached, 0 skipped")


def bundle(src: Path, dst: Path, kind: str, max_mb: float = 30.0, grammar: str = "classic") -> Path:
    """Copy a trained model folder as the shippable bundle: transformer in bf16, flags for `kind` (and, for a
    base or mid bundle, its own sampling defaults, BASE_SAMPLING or MID_SAMPLING)."""
    from helios.model.loading import load_transformer

    index = helios_model_folder.read_model_index(src)
    index.update(_kind_flags(kind))
    index.pop("helios_default_sampling", None)
    index.update(_prompt_help(grammar))
    own = {"base": BASE_SAMPLING, "mid": MID_SAMPLING}.get(kind)  # a distilled bundle samples without CFG
    if own:
        index["helios_default_sampling"] = own
    parts: dict[str, Any] = {p: src / p for p in helios_model_folder.COMPONENT_PARTS}
    parts["transformer"] = lambda p: save_transformer(load_transformer(src / "transformer"), p, dtype=torch.bfloat16)
    parts["scheduler"] = scheduler_for(kind).save_pretrained

    def within_bound(folder: Path) -> None:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
        if size > max_mb:
            raise SystemExit(f"the bundle is {size:.1f} MB, over the {max_mb} MB bound")

    helios_model_folder.write_model_folder(dst, index, parts, check=within_bound)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 1e6
    print(f"bundled {src} -> {dst} ({size:.1f} MB, {kind})")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the small bundled Helios: VAE, latent cache, bundle.")
    ap.add_argument("command", choices=["vae", "cache", "bundle"])
    ap.add_argument("src", type=Path, help="vae: output model folder; cache/bundle: the model folder to read")
    ap.add_argument("dst", type=Path, nargs="?", help="cache: cache folder; bundle: output folder")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--videos", type=int, default=384)
    ap.add_argument("--kind", default="mid", choices=["base", "mid", "distilled"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--init-vae", type=Path, default=None, help="continue training this vae/ folder")
    ap.add_argument("--frames", type=int, default=CHUNK_FRAMES, help="vae: frames per training clip (1 + 4k)")
    ap.add_argument("--object-weight", type=float, default=OBJECT_WEIGHT,
                    help="vae: extra weight of object pixels in the reconstruction loss (background: 1)")
    ap.add_argument("--decoder-only", action="store_true",
                    help="vae: train only the decoder of --init-vae; its latents, and models trained on them, stay valid")
    ap.add_argument("--text-pretrain-steps", type=int, default=TEXT_PRETRAIN_STEPS,
                    help="vae: steps of the text encoder's caption pretraining (0: a random frozen encoder)")
    ap.add_argument("--grammar", default="classic", choices=["classic", "wide"],
                    help="caption grammar of the training captions (helios.scenes): what the text encoder is "
                         "pretrained on (vae) and the vocabulary the folder declares (vae, bundle)")
    args = ap.parse_args()
    if args.command == "cache":
        build_cache(args.src, args.dst, args.videos, args.device, grammar=args.grammar)
        return
    if args.command == "bundle":
        bundle(args.src, args.dst, args.kind, grammar=args.grammar)
        return
    if args.decoder_only and args.init_vae is None:
        ap.error("--decoder-only trains the decoder of a trained VAE: give it with --init-vae")
    torch.manual_seed(0)
    if args.init_vae is not None:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(args.init_vae)
    else:
        vae = build_vae()
    losses = train_vae(vae, args.steps, batch=args.batch, frames=args.frames, device=args.device,
                       max_seconds=args.max_seconds, object_weight=args.object_weight,
                       decoder_only=args.decoder_only)
    errors = reconstruction_errors_per_latent_frame(vae, device=args.device)
    per_frame, on_objects = errors["frame"], errors["objects"]
    print("vae reconstruction error per latent frame: " + " ".join(f"{e:.3f}" for e in per_frame), flush=True)
    print("  on the objects' pixels:                  " + " ".join(f"{e:.3f}" for e in on_objects), flush=True)
    if not args.decoder_only:  # the same encoder keeps the normalisation its models were trained with
        mean, std = latent_statistics(vae, device=args.device)
        vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.to("cpu")
    torch.manual_seed(0)  # the same fresh transformer whatever the VAE training drew: runs can share an init
    transformer = build_transformer(transformer_config())
    write_model_folder(args.src, vae, transformer, kind=args.kind, text_pretrain_steps=args.text_pretrain_steps,
                       grammar=args.grammar)
    (args.src / "vae_train_log.json").write_text(json.dumps({"losses": losses, "steps": len(losses),
                                                             "batch": args.batch, "frames": args.frames,
                                                             "object_weight": args.object_weight,
                                                             "decoder_only": args.decoder_only,
                                                             "error_per_latent_frame": per_frame,
                                                             "object_error_per_latent_frame": on_objects}))
    print(f"wrote {args.src}")


if __name__ == "__main__":
    main()
