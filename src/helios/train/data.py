"""Training data: the two sources and the resumable batch order.

* ``data.source: cache``  -> :class:`helios.train.video_data.LatentCacheDataset` (latents + prompt
  embeddings written once by ``build_latent_cache``; the official stages 1-2 path);
* ``data.source: synthetic`` -> :class:`SyntheticLatentDataset`: bouncing-shape videos rendered on the
  fly, VAE-encoded per 33-frame section (as the cache does) with the model folder's VAE, prompts
  embedded with its text encoder (cached per caption). For tests and small models.

Both give items ``{"anchor" (C,1,h,w), "history" (C,19,h,w), "target" (C,9,h,w),
"prompt_embeds" (L,D), ...}``. :class:`BatchStream` hands them out in a deterministic order that is
resumable from a saved position and independent of the number of processes (for a fixed global batch).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from helios.model_folder import CHUNK_FRAMES
from helios.runtime import seeded_generator

from .config import ConfigError
from .history import HistoryLayout, choose_section, history_from_sections
from .synthetic import SyntheticConfig, SyntheticVideoDataset
from .video_data import LatentCacheDataset, collate_samples

__all__ = ["DataError", "ModelParts", "SyntheticLatentDataset", "build_dataset", "BatchStream"]


class DataError(ValueError):
    """Training data that cannot be used (missing, unreadable, empty, wrong shape)."""


class ModelParts:
    """The VAE, text encoder, tokenizer and scheduler config of a model folder (no transformer).

    ``encode_video`` / ``encode_text`` are the encode functions ``build_latent_cache`` takes."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", vae_dtype: torch.dtype = torch.float32,
                 text_dtype: torch.dtype = torch.float32, text_max_length: int = 512):
        from helios.engine.components import load_parts
        from helios.engine.conditioning import LatentCodec
        from helios.engine.text import PromptEncoder

        from .modeling import check_components_folder

        self.folder = Path(folder)
        self.index = check_components_folder(self.folder)
        self.vae, self.text_encoder, self.tokenizer, self.scheduler_config = load_parts(
            self.folder, device, vae_dtype, text_dtype)
        self.to(device)
        self.codec = LatentCodec(self.vae)
        self.prompts = PromptEncoder(self.tokenizer, self.text_encoder, text_max_length, cache_size=1)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def to(self, device: torch.device | str) -> "ModelParts":
        self.device = torch.device(device)
        self.vae.to(self.device)
        self.text_encoder.to(self.device)
        return self

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, T, H, W)`` in [-1, 1] -> normalised latents ``(B, C, t, h, w)`` float32 on the CPU
        (a posterior sample, as the official cache; pass a seeded generator for reproducibility)."""
        return self.codec.encode(video, generator).float().cpu()

    @torch.no_grad()
    def encode_text(self, caption: str) -> torch.Tensor:
        """``(L, D)`` float32 on the CPU, zeros past the prompt's tokens; the last 256 captions are cached."""
        if caption not in self._text_cache:
            self._text_cache[caption] = self.prompts(caption)[0].float().cpu()
            if len(self._text_cache) > 256:
                self._text_cache.popitem(last=False)
        self._text_cache.move_to_end(caption)
        return self._text_cache[caption]


class SyntheticLatentDataset(Dataset):
    """Synthetic videos encoded on the fly: clip -> 33-frame sections -> VAE -> training sample."""

    def __init__(self, scfg: dict[str, Any], parts: ModelParts, layout: HistoryLayout, seed: int,
                 section_frames: int = CHUNK_FRAMES):
        keys = {f for f in SyntheticConfig.__dataclass_fields__}
        self.videos = SyntheticVideoDataset(SyntheticConfig.from_dict({k: v for k, v in scfg.items() if k in keys}),
                                            num_videos=int(scfg["num_videos"]), clip_frames=int(scfg["clip_frames"]),
                                            clip_seed=seed)
        self.parts, self.layout, self.seed, self.section_frames = parts, layout, seed, section_frames
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.videos.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.videos[index]
        video, n = item["video"], self.section_frames
        g = seeded_generator(self.seed, 2, self.epoch, index)  # the VAE posterior sample
        sections = torch.stack([self.parts.encode_video(video[None, :, s : s + n], g)[0]
                                for s in range(0, video.shape[1], n)])
        s = choose_section(sections.shape[0], self.seed, self.epoch, index)
        anchor, history, target = history_from_sections(sections, s, self.layout)
        return {"anchor": anchor, "history": history, "target": target,
                "prompt_embeds": self.parts.encode_text(item["caption"]), "caption": item["caption"],
                "section_index": s}


class _CheckedCache(Dataset):
    """LatentCacheDataset with file-naming errors, float32 prompt embeddings and a frame-count filter."""

    def __init__(self, cache_dir: str, layout: HistoryLayout, seed: int, min_frames: int, preload: bool = False):
        self.inner = LatentCacheDataset(cache_dir, layout=layout, seed=seed)
        if not self.inner.files:
            raise DataError(f"data.cache_dir {cache_dir} holds no cache entries (*.safetensors); build it with "
                            "helios.train.video_data.build_latent_cache")
        if min_frames > 0:
            from safetensors import safe_open

            keep = []
            for f in self.inner.files:
                try:
                    with safe_open(f, framework="pt") as h:
                        frames = int((h.metadata() or {}).get("num_frames", 0) or 0)
                except Exception as e:
                    raise DataError(f"cache entry {f} is unreadable: {type(e).__name__}: {e}") from e
                if frames == 0 or frames >= min_frames:  # entries without the count are kept
                    keep.append(f)
            if not keep:
                raise DataError(f"all {len(self.inner.files)} entries of {cache_dir} are shorter than "
                                f"data.min_video_frames={min_frames} frames")
            self.inner.files = keep
        if preload:
            try:
                self.inner.preload()
            except ValueError as e:
                raise DataError(f"data.preload: {e}") from e

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            item = self.inner[index]
        except Exception as e:
            raise DataError(f"cache entry {self.inner.files[index]} is unreadable: {type(e).__name__}: {e}") from e
        item["prompt_embeds"] = item["prompt_embeds"].float()
        item.pop("metadata", None)
        return item


def build_dataset(cfg: dict[str, Any], layout: HistoryLayout, parts: ModelParts | None) -> Dataset:
    """The dataset of ``data.source`` (a stage that trains on something else builds its own: Stage.dataset)."""
    d = cfg["data"]
    if d["source"] == "cache":
        return _CheckedCache(d["cache_dir"], layout, int(cfg["seed"]), int(d.get("min_video_frames") or 0),
                             bool(d.get("preload")))
    if parts is None:
        raise ConfigError("config key 'data.source' = 'synthetic' needs model.components_from (VAE, text encoder)")
    return SyntheticLatentDataset(cfg["synthetic"], parts, layout, int(cfg["seed"]), int(d["section_frames"]))


def check_sample(item: dict[str, Any], in_channels: int, text_dim: int, layout: HistoryLayout,
                 size: tuple[int, int], spatial: int = 8) -> None:
    """Fail early, naming what is wrong, when the data does not fit the model and the config."""
    t = item["target"]
    h, w = size[0] // spatial, size[1] // spatial
    if t.shape[0] != in_channels:
        raise DataError(f"latents have {t.shape[0]} channels, the transformer takes {in_channels}")
    if t.shape[1] != layout.chunk_frames:
        raise DataError(f"latent sections have {t.shape[1]} frames, data.latent_window is {layout.chunk_frames}")
    if tuple(t.shape[-2:]) != (h, w):
        raise DataError(f"latents are {t.shape[-2]}x{t.shape[-1]}, data.height x data.width = {size[0]}x{size[1]} "
                        f"gives {h}x{w}")
    if item["prompt_embeds"].shape[-1] != text_dim:
        raise DataError(f"prompt embeddings have width {item['prompt_embeds'].shape[-1]}, the transformer's "
                        f"text_dim is {text_dim}")


class BatchStream:
    """Deterministic, resumable batches for one process.

    Epoch ``e`` visits the dataset in the order ``randperm(N)`` seeded by ``(seed, e)``; global
    batch ``k`` is ``order[k G : (k+1) G]`` with ``G = per_gpu * world`` and rank ``r`` takes its
    ``r``-th slice. One process with ``per_gpu = G`` therefore sees the same global batches as
    ``G`` processes with ``per_gpu = 1``. The position ``(epoch, batch)`` names the next global batch.
    """

    def __init__(self, dataset: Dataset, per_gpu: int, rank: int, world: int, seed: int, num_workers: int = 0,
                 position: dict[str, int] | None = None):
        self.dataset, self.per_gpu, self.rank, self.world = dataset, per_gpu, rank, world
        self.seed, self.num_workers = seed, num_workers
        self.global_batch = per_gpu * world
        self.batches_per_epoch = len(dataset) // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"the dataset has {len(dataset)} samples, fewer than one global batch "
                            f"(batch.per_gpu {per_gpu} x {world} processes)")
        position = position or {}
        self.epoch, self.batch = int(position.get("epoch", 0)), int(position.get("batch", 0))
        self._it: Iterator | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "global_batch": self.global_batch}

    def _loader(self) -> Iterator:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        order = torch.randperm(len(self.dataset), generator=seeded_generator(self.seed, 1, self.epoch)).tolist()
        G, off = self.global_batch, self.rank * self.per_gpu
        batches = [order[k * G + off : k * G + off + self.per_gpu] for k in range(self.batch, self.batches_per_epoch)]
        return iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                               collate_fn=collate_samples))

    def next(self) -> dict[str, Any]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._it = self._loader()
        out = next(self._it)
        out["sample_ids"] = [self.rank * self.per_gpu + i for i in range(self.per_gpu)]
        self.batch += 1
        return out
