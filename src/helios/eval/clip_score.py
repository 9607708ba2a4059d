"""Optional text-frame similarity with a local transformers CLIP folder. Never downloads anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

EXPECTED = (
    "a local folder holding a transformers CLIP model: config.json with model_type 'clip', the weights "
    "(model.safetensors) and the processor/tokenizer files, e.g. written by CLIPModel.save_pretrained(DIR) "
    "and CLIPProcessor.save_pretrained(DIR)"
)


def check_clip_folder(path: str | os.PathLike) -> Path:
    """Validate a CLIP folder without importing transformers; raises with what was expected."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"CLIP model folder {p} does not exist. Expected {EXPECTED}. Nothing is downloaded.")
    if not p.is_dir():
        raise NotADirectoryError(f"CLIP model path {p} is a file. Expected {EXPECTED}.")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{p} has no config.json, so it is not a transformers model folder. Expected {EXPECTED}.")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg} is not valid JSON ({e}). Expected {EXPECTED}.") from e
    if model_type != "clip":
        raise ValueError(f"{p} holds a {model_type!r} model, not CLIP. Expected {EXPECTED}.")
    return p


class ClipScorer:
    """Cosine similarity between one caption and video frames."""

    def __init__(self, path: str | os.PathLike, caption: str):
        p = check_clip_folder(path)
        if not caption:
            raise ValueError("CLIP similarity needs a caption: pass caption=... or add a captions sidecar file.")
        import torch
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(p, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load CLIP from {p}: {e}. Expected {EXPECTED}.") from e
        self.torch = torch
        max_len = self.model.config.text_config.max_position_embeddings
        self.text = self.processor.tokenizer([caption], padding=True, truncation=True, max_length=max_len,
                                             return_tensors="pt")

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(B,H,W,3) uint8 -> (B,) cosine similarity with the caption."""
        pixels = self.processor.image_processor(images=list(frames), return_tensors="pt")["pixel_values"]
        with self.torch.inference_mode():
            # forward() returns normalised image/text embeddings in both transformers 4.x and 5.x
            out = self.model(**self.text, pixel_values=pixels)
        return (out.image_embeds @ out.text_embeds.T)[:, 0].float().numpy()


class ClipSeries:
    """Sparse per-frame CLIP similarity: every `stride`-th frame and the last one."""

    def __init__(self, scorer: ClipScorer, stride: int):
        self.scorer, self.stride = scorer, max(1, stride)
        self.values: dict[int, float] = {}
        self.n = 0
        self.last: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
        idx = [i for i in range(len(batch)) if (self.n + i) % self.stride == 0]
        if idx:
            for i, s in zip(idx, self.scorer(batch[idx])):
                self.values[self.n + i] = float(s)
        self.last = batch[-1]
        self.n += len(batch)

    def result(self) -> dict[str, np.ndarray]:
        if self.n and (self.n - 1) not in self.values:
            self.values[self.n - 1] = float(self.scorer(self.last[None])[0])
        out = np.full(self.n, np.nan)
        for t, v in self.values.items():
            out[t] = v
        return {"clip_similarity": out}
