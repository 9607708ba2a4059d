"""A tiny video autoencoder in the TAEHV architecture, for cheap previews of Wan latents.

TAEHV ("Tiny AutoEncoder for Hunyuan Video", madebyollin; `taew2_1` is its Wan2.1 variant, and
LightX2V's `lighttaew2_1` a retraining of the same network) decodes with 2-D convolutions only.
Its one link across time is the MemBlock: a residual block whose first convolution also sees the
block's input at the previous frame (zeros before the first). Time is grown by TGrow, a 1x1
convolution whose output channels are split into `stride` consecutive frames; space by nearest
upsampling. The decoder is, by index in one `nn.Sequential` (the checkpoints' key names):

    0 Clamp (3 tanh(x / 3))   1 conv 3x3 latent->w0   2 ReLU
    per stage s = 0, 1, 2:    `blocks` MemBlock(w_s)  Upsample(2 or 1)  TGrow(w_s, 2 or 1)  conv 3x3 w_s->w_{s+1}, no bias
    ReLU   conv 3x3 w3->3*patch^2

with widths (256, 128, 64, 64), 3 MemBlocks per stage, time grown in stages 1 and 2 (4x, as the Wan
VAE) and space in all three (8x). A chunk of T latents gives 4T frames, of which the first 3 are
dropped, so 1 + 4(T - 1) frames as the Wan VAE. Latents go in raw (not normalised) as (N, T, C, H, W);
frames come out as (N, T, 3, H, W) in [0, 1]. The encoder (cheap, used for tests and round trips):

    0 conv 3*patch^2->64  1 ReLU   per stage: TPool(64, 2 or 1)  conv 3x3 stride 2, no bias  3 MemBlock(64)
    17 conv 64->latent

Written from the published description and the checkpoints' key names and shapes; other widths, block
counts and upscale patterns (a decoder distilled for a VAE with another spatial factor, say) are the
same network with other numbers, and our own files carry those numbers in their metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from helios.model.wan_vae import phase_weights, shuffle_phases

CONFIG_METADATA_KEY = "helios_taehv"  # safetensors metadata: the TAEHVConfig of a file we wrote
_PREFIXES = ("module.", "model.", "taehv.", "vae.")  # wrappers some re-savings put around the keys


class TAEHVLoadError(ValueError):
    """A weight file that is not a TAEHV-architecture decoder for the latents asked for."""


@dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16
    image_channels: int = 3
    patch_size: int = 1  # frames are pixel-(un)shuffled by this around the network
    widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    blocks: int = 3  # MemBlocks per decoder stage
    space_upscale: tuple[bool, bool, bool] = (True, True, True)
    time_upscale: tuple[bool, bool, bool] = (False, True, True)
    encoder: bool = True
    encoder_width: int = 64
    time_downscale: tuple[bool, bool, bool] = (True, True, False)

    @property
    def spatial_factor(self) -> int:
        return 2 ** sum(self.space_upscale) * self.patch_size

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.time_upscale)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TAEHVConfig":
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---- building blocks ----------------------------------------------------------------------------
def conv3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(convs(cat(x_t, x_{t-1})) + skip(x_t)): the decoder's one step of temporal memory."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv3(n_in * 2, n_out), nn.ReLU(), conv3(n_out, n_out), nn.ReLU(),
                                  conv3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """(N*T, C, H, W) -> (N*T*stride, C, H, W): each frame becomes `stride` frames, in channel-group order."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1:]
        return self.conv(x).reshape(-1, c, h, w)


class TPool(nn.Module):
    """(N*T, C, H, W) -> (N*T/stride, C, H, W): `stride` consecutive frames stacked on channels, mixed by a 1x1 conv."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1:]
        return self.conv(x.reshape(-1, self.stride * c, h, w))


def build_decoder(cfg: TAEHVConfig) -> nn.Sequential:
    w = cfg.widths
    layers: list[nn.Module] = [Clamp(), conv3(cfg.latent_channels, w[0]), nn.ReLU()]
    for s in range(3):
        layers += [MemBlock(w[s], w[s]) for _ in range(cfg.blocks)]
        layers += [nn.Upsample(scale_factor=2 if cfg.space_upscale[s] else 1),
                   TGrow(w[s], 2 if cfg.time_upscale[s] else 1), conv3(w[s], w[s + 1], bias=False)]
    layers += [nn.ReLU(), conv3(w[3], cfg.image_channels * cfg.patch_size ** 2)]
    return nn.Sequential(*layers)


def build_encoder(cfg: TAEHVConfig) -> nn.Sequential:
    n = cfg.encoder_width
    layers: list[nn.Module] = [conv3(cfg.image_channels * cfg.patch_size ** 2, n), nn.ReLU()]
    for s in range(3):
        layers += [TPool(n, 2 if cfg.time_downscale[s] else 1), conv3(n, n, stride=2, bias=False)]
        layers += [MemBlock(n, n) for _ in range(3)]
    layers.append(conv3(n, cfg.latent_channels))
    return nn.Sequential(*layers)


def run_sequence(seq: nn.Sequential, x: torch.Tensor, memory: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Apply the blocks to all frames at once: x (N, T, C, H, W) -> (N, T', C', H', W').

    memory: each MemBlock's input at the last frame of the previous call (read, then replaced), so that
    calls on consecutive pieces of a stream equal one call on the whole; None: the stream starts here.
    """
    n = x.shape[0]
    x = x.flatten(0, 1)
    for i, block in enumerate(seq):
        if isinstance(block, MemBlock):
            x = _memblock_step(block, i, x, n, memory)
        else:
            x = block(x)
    return x.unflatten(0, (n, -1))


def _nchw_or_nhwc(x: torch.Tensor) -> torch.memory_format:
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def _phase_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The 2x2 four-phase form of a 3x3 conv's weight, cached while the weight is unchanged and frozen."""
    w = conv.weight
    if torch.is_grad_enabled() and w.requires_grad:
        return phase_weights(w)  # training: keep the graph back to the 3x3 weight
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    cached = getattr(conv, "_helios_phase", None)
    if cached is None or cached[0] != key:
        cached = (key, phase_weights(w.detach()))
        conv._helios_phase = cached
    return cached[1]


def _grow_upsample_conv(x: torch.Tensor, n: int, up: nn.Upsample, grow: TGrow, conv: nn.Conv2d,
                        drop: int, relu: bool = False) -> torch.Tensor:
    """Upsample -> TGrow -> conv3 (-> ReLU if `relu`) as TGrow at low resolution (a 1x1 conv commutes with
    nearest upsampling) and, for 2x, one four-phase 2x2 conv of the low-resolution frames (no upsampled copy),
    whose interleaving pass also applies the ReLU; the first `drop` frames per sample after TGrow are not
    computed further."""
    x = grow(x)
    if drop:
        x = x.unflatten(0, (n, -1))[:, drop:].flatten(0, 1)
    if up.scale_factor in (1, 1.0):
        return F.relu(conv(x)) if relu else conv(x)
    y = F.conv2d(x, _phase_weight(conv), None, padding=1)
    return shuffle_phases(y, conv.bias, _nchw_or_nhwc(x), relu=relu)


def run_decoder(seq: nn.Sequential, x: torch.Tensor, memory: dict[int, torch.Tensor] | None = None,
                drop: int = 0) -> torch.Tensor:
    """run_sequence for a build_decoder stack, with less work and the same frames, minus the first `drop`.

    The dropped frames come from the last TGrow, after every MemBlock, so they feed nothing that is kept.
    """
    grows = [i for i, b in enumerate(seq) if isinstance(b, TGrow)]
    n, i = x.shape[0], 0
    x = x.flatten(0, 1)
    while i < len(seq):
        block = seq[i]
        if isinstance(block, nn.Upsample) and i + 1 in grows:
            last = i + 1 == grows[-1]
            relu = i + 3 < len(seq) and isinstance(seq[i + 3], nn.ReLU)  # the decoder's last one: folded in
            x = _grow_upsample_conv(x, n, block, seq[i + 1], seq[i + 2], drop if last else 0, relu)
            i += 4 if relu else 3
            continue
        if isinstance(block, MemBlock):
            x = _memblock_step(block, i, x, n, memory)
        else:
            x = block(x)
        i += 1
    return x.unflatten(0, (n, -1))


def _memblock_step(block: MemBlock, i: int, x: torch.Tensor, n: int,
                   memory: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """One MemBlock over flattened frames, its previous-frame input from `memory` (updated) or zeros."""
    frames = x.unflatten(0, (n, -1))
    before = memory.get(i) if memory is not None else None
    if before is None:
        before = torch.zeros_like(frames[:, :1])
    past = torch.cat([before, frames[:, :-1]], 1).flatten(0, 1)
    if memory is not None:
        memory[i] = frames[:, -1:].detach().clone()
    return block(x, past)


@dataclass
class DecodeStream:
    """State of a decode that goes on over several calls (MemBlock memories, startup frames dropped or not)."""

    memory: dict[int, torch.Tensor] = field(default_factory=dict)
    started: bool = False


class TAEHV(nn.Module):
    def __init__(self, cfg: TAEHVConfig = TAEHVConfig()):
        super().__init__()
        self.cfg = cfg
        self.decoder = build_decoder(cfg)
        self.encoder = build_encoder(cfg) if cfg.encoder else None

    @property
    def frames_to_trim(self) -> int:
        """Startup frames the decoder makes before the first one that lines up with the Wan VAE's."""
        return self.cfg.temporal_factor - 1

    def decode_video(self, latents: torch.Tensor, stream: DecodeStream | None = None, clamp: bool = True
                     ) -> torch.Tensor:
        """Raw latents (N, T, C, h, w) -> frames (N, T', 3, H, W) in [0, 1] (clamp=False: unclamped, for training).

        stream: go on from the previous call's state (and update it); the startup frames are dropped once, on
        the stream's first call. Without it the call is a whole stream: 1 + 4(T - 1) frames for the Wan layout.
        """
        if latents.dim() != 5 or latents.shape[2] != self.cfg.latent_channels:
            raise ValueError(f"expected latents (N, T, {self.cfg.latent_channels}, h, w), got {tuple(latents.shape)}")
        drop = self.frames_to_trim if stream is None or not stream.started else 0
        x = run_decoder(self.decoder, latents, stream.memory if stream is not None else None, drop)
        if self.cfg.patch_size > 1:
            x = F.pixel_shuffle(x.flatten(0, 1), self.cfg.patch_size).unflatten(0, x.shape[:2])
        if stream is not None:
            stream.started = True
        return x.clamp(0, 1) if clamp else x

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (N, T, 3, H, W) in [0, 1] -> raw latents (N, T / t_down, C, h, w), padding T with the last frame."""
        if self.encoder is None:
            raise ValueError("this TAEHV has no encoder (a decoder-only weight file)")
        down = 2 ** sum(self.cfg.time_downscale)
        if frames.shape[1] % down:
            pad = down - frames.shape[1] % down
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
        if self.cfg.patch_size > 1:
            frames = F.pixel_unshuffle(frames.flatten(0, 1), self.cfg.patch_size).unflatten(0, frames.shape[:2])
        return run_sequence(self.encoder, frames)


# ---- weight files -------------------------------------------------------------------------------
def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a .pth / .pt or .safetensors file, with wrapper prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise TAEHVLoadError(f"{path}: no such file (expected a TAEHV weight file, .pth or .safetensors)")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                metadata = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise TAEHVLoadError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TAEHVLoadError(f"{path}: not a readable PyTorch weight file ({e})") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise TAEHVLoadError(f"{path}: expected a state dict of tensors, found {type(sd).__name__}")
    return _strip_prefixes(sd), metadata


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _shape(sd: dict[str, torch.Tensor], key: str, path: Path, what: str) -> torch.Size:
    if key not in sd:
        found = ", ".join(sorted(sd)[:4]) or "no tensors"
        raise TAEHVLoadError(f"{path}: key {key!r} ({what}) is missing, so this is not a TAEHV-architecture "
                             f"decoder (its keys begin: {found})")
    return sd[key].shape


def infer_config(sd: dict[str, torch.Tensor], path: str | Path, temporal_factor: int = 4,
                 space_upscale: tuple[bool, bool, bool] = (True, True, True)) -> TAEHVConfig:
    """The architecture numbers a published (metadata-free) TAEHV state dict implies.

    Spatial upsampling has no weights, so it is taken as given (TAEHV's 8x by default). TGrow strides
    come from their weights; a file that grows time more than `temporal_factor` has its leading TGrows
    turned off (the published decoders keep stage 0's TGrow at stride 1 while some files store it at 2).
    """
    path = Path(path)
    w0, latent = _shape(sd, "decoder.1.weight", path, "the first decoder convolution")[:2]
    blocks = 0
    while f"decoder.{3 + blocks}.conv.0.weight" in sd:
        blocks += 1
    if blocks == 0:
        _shape(sd, "decoder.3.conv.0.weight", path, "the first MemBlock")
    widths, strides = [w0], []
    for s in range(3):
        start = 3 + s * (blocks + 3)
        grow = _shape(sd, f"decoder.{start + blocks + 1}.conv.weight", path, f"stage {s}'s TGrow")
        strides.append(grow[0] // widths[s])
        widths.append(_shape(sd, f"decoder.{start + blocks + 2}.weight", path, f"stage {s}'s output convolution")[0])
    out = _shape(sd, f"decoder.{3 + 3 * (blocks + 3) + 1}.weight", path, "the last decoder convolution")[0]
    patch = int(round(math.sqrt(out / 3)))
    time_up = [st == 2 for st in strides]
    while 2 ** sum(time_up) > temporal_factor and any(time_up):
        time_up[time_up.index(True)] = False
    encoder = "encoder.0.weight" in sd
    enc_width, down = 64, (True, True, False)
    if encoder:
        enc_width = sd["encoder.0.weight"].shape[0]
        down = tuple(_shape(sd, f"encoder.{2 + 5 * s}.conv.weight", path, f"encoder stage {s}'s TPool")[1]
                     == 2 * enc_width for s in range(3))
    return TAEHVConfig(latent_channels=int(latent), patch_size=patch, widths=tuple(int(w) for w in widths),
                       blocks=blocks, space_upscale=tuple(space_upscale), time_upscale=tuple(time_up),
                       encoder=encoder, encoder_width=int(enc_width), time_downscale=down)


def _fit_tgrow(model: TAEHV, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TGrow stored with more output frames than the model uses keeps its last frames' channels."""
    sd = dict(sd)
    for i, block in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(block, TGrow) and key in sd:
            want = block.conv.weight.shape[0]
            if sd[key].shape[0] > want and sd[key].shape[0] % want == 0:
                sd[key] = sd[key][-want:]
    return sd


def load_state(model: TAEHV, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """Copy `sd` into `model`, refusing (with the key named) anything missing, extra or of another shape."""
    own = model.state_dict()
    sd = _fit_tgrow(model, sd)
    if model.encoder is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
    for key, tensor in own.items():
        if key not in sd:
            raise TAEHVLoadError(f"{path}: key {key!r} is missing (expected shape {tuple(tensor.shape)}); the file is "
                                 "not a TAEHV decoder of this layout")
        if sd[key].shape != tensor.shape:
            raise TAEHVLoadError(f"{path}: key {key!r} has shape {tuple(sd[key].shape)}, expected "
                                 f"{tuple(tensor.shape)} for {model.cfg}")
    extra = sorted(set(sd) - set(own))
    if extra:
        raise TAEHVLoadError(f"{path}: unexpected key(s) {', '.join(extra[:5])}: not a TAEHV-architecture file")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def load_taehv(path: str | Path, latent_channels: int | None = None, spatial_factor: int | None = None,
               temporal_factor: int = 4) -> TAEHV:
    """A TAEHV from a weight file: the published `taew2_1` / `lighttaew2_1` (.pth or .safetensors) or one of ours.

    latent_channels / spatial_factor: what the caller's latent space needs; a file made for another is
    refused, with the file and both numbers named. A metadata-free file is taken as TAEHV's 8x spatial layout.
    """
    path = Path(path)
    sd, metadata = read_weights(path)
    if CONFIG_METADATA_KEY in metadata:
        cfg = TAEHVConfig.from_json(metadata[CONFIG_METADATA_KEY])
    else:
        cfg = infer_config(sd, path, temporal_factor=temporal_factor)
    if latent_channels is not None and cfg.latent_channels != latent_channels:
        raise TAEHVLoadError(f"{path}: this decoder is for a {cfg.latent_channels}-channel latent space, but the "
                             f"model's VAE has {latent_channels} latent channels (for Wan2.1 latents use taew2_1 "
                             "or lighttaew2_1)")
    if spatial_factor is not None and cfg.spatial_factor != spatial_factor:
        raise TAEHVLoadError(f"{path}: this decoder upsamples {cfg.spatial_factor}x in space, but the model's VAE "
                             f"is {spatial_factor}x")
    if cfg.temporal_factor != temporal_factor:
        raise TAEHVLoadError(f"{path}: this decoder grows time {cfg.temporal_factor}x, but the model's VAE is "
                             f"{temporal_factor}x")
    model = TAEHV(cfg)
    load_state(model, sd, path)
    return model.eval().requires_grad_(False)
