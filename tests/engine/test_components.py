"""Loading a model folder's parts (helios.engine.components): the order that keeps host memory to one copy."""

from __future__ import annotations

import pytest
import torch

from helios.cli import default_model
from helios.engine import components
from helios.engine.components import ModelFolderError, load_components, stream_text_encoder_


def test_a_streamed_text_encoder_is_pinned_before_the_transformer_is_read(monkeypatch):
    # Under a memory plan the encoder's loaded copy must be gone before the transformer's pinned blocks arrive.
    seen = []
    real = components.load_transformer

    def load_transformer(*args, **kwargs):
        seen.append("transformer")
        return real(*args, **kwargs)

    real_stream = components.stream_text_encoder_
    monkeypatch.setattr(components, "load_transformer", load_transformer)
    monkeypatch.setattr(components, "stream_text_encoder_", lambda enc, dev: (seen.append("text"), real_stream(enc, dev)))
    streamed = load_components(default_model(), text_device="cpu", stream_text_to="cpu")
    assert seen == ["text", "transformer"]
    plain = load_components(default_model())
    ids = torch.randint(0, plain.text_encoder.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain.text_encoder(ids, torch.ones_like(ids)).last_hidden_state
        got = streamed.text_encoder(ids, torch.ones_like(ids)).last_hidden_state
    assert torch.equal(want, got)
    hooks = len(streamed.text_encoder.encoder.block[0]._forward_pre_hooks)
    real_stream(streamed.text_encoder, torch.device("cpu"))  # a second call changes nothing
    assert len(streamed.text_encoder.encoder.block[0]._forward_pre_hooks) == hooks == 1


def test_a_text_encoder_without_blocks_to_stream_is_refused_with_what_to_do():
    with pytest.raises(ModelFolderError, match="has no encoder.block layers to stream; use a larger --memory"):
        stream_text_encoder_(torch.nn.Linear(2, 2), torch.device("cpu"))
