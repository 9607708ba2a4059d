"""Prompt encoding with the umT5 encoder: padded to a fixed length, zeros past each prompt's tokens."""

from __future__ import annotations

import html
import re
from collections import OrderedDict

import torch


def clean_prompt(text: str) -> str:
    try:  # ftfy repairs mojibake when installed; the reference pipelines use it the same way
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptEncoder:
    """Encodes prompts and remembers the last few, so switching back and forth costs nothing."""

    def __init__(self, tokenizer, text_encoder, max_length: int = 512, cache_size: int = 8):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    @torch.no_grad()
    def __call__(self, prompt: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(1, max_length, text_dim) embeddings of one prompt."""
        key = prompt
        if key not in self._cache:
            self._cache[key] = self._encode(prompt)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        out = self._cache[key]
        return out.to(dtype) if dtype is not None else out

    def _encode(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([clean_prompt(prompt)], padding="max_length", max_length=self.max_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        # Positions past the prompt carry zeros, as the released models were trained with.
        return hidden * mask[..., None].to(hidden.device, hidden.dtype)  # (a streamed encoder ends on the GPU)
