"""Weight streaming (helios.model.offload) and loading straight into FP8 compute what the resident model computes.

On the CPU the ring's copies are plain copies, so these pin the plumbing: every block runs from a slot that
holds its own weights, in order, with no more than `size` blocks in the ring at once.
"""

from __future__ import annotations

import pytest
import torch

import helios
from helios.model.config import named_config
from helios.model.fp8 import Fp8Linear, quantize_blocks_
from helios.model.loading import save_transformer
from helios.model.offload import BlockRing, enable_block_streaming, flat_buffer, stream_layers_
from helios.model.transformer import build_transformer
from helpers_reference import generator_for, random_inputs

LAYERS = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(3)
    model = build_transformer(named_config("tiny", text_dim=24, num_layers=LAYERS))
    path = tmp_path_factory.mktemp("tiny") / "transformer"
    save_transformer(model, path, max_shard_bytes=30_000, dtype=torch.bfloat16)  # several shards
    return path


def _forward(model, kw):
    with torch.no_grad():
        return model(**kw).sample


@pytest.mark.parametrize("fp8_attention", [False, True])
def test_fp8_load_equals_bf16_load_then_fuse_and_quantize(folder, request, monkeypatch, fp8_attention):
    # fp8_attention: pretend cuDNN's FP8 attention runs on this device (on the CPU it runs emulated), so that the
    # loader, which quantises on the meta device, must choose it for the device it loads onto as optimize() does
    monkeypatch.setattr("helios.model.fp8.fp8_attention_runs_on",
                        lambda device: fp8_attention and torch.device(device).type == "cpu")
    resident = helios.load_transformer(folder, dtype=torch.bfloat16)
    resident.fuse_projections_()
    assert quantize_blocks_(resident) > 0
    direct = helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True)
    assert isinstance(direct.blocks[0].attn1.to_qkv, Fp8Linear)
    assert [b.attn1.fp8_attention for b in direct.blocks] == [fp8_attention] * LAYERS
    assert [b.attn1.fp8_attention for b in resident.blocks] == [fp8_attention] * LAYERS
    want, got = resident.state_dict(), direct.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k].float(), got[k].float()), k
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    assert torch.equal(_forward(direct, kw), _forward(resident, kw))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_streamed_forward_equals_resident_forward_exactly(folder, request, size):
    resident = helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True)
    streamed = helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True, blocks_on_host=True)
    ring = enable_block_streaming(streamed, size, "cpu")
    gen = generator_for(request.node.name)
    for _ in range(2):  # a second forward starts from the blocks the first one prefetched
        kw = random_inputs(gen, text_dim=24)
        want, got = _forward(resident, kw), _forward(streamed, kw)
        assert (want.float() - got.float()).abs().max().item() == 0.0
    assert ring.max_resident <= size
    assert len(ring.slots) == size
    # Each forward reads every block once for the text K/V and once for the blocks themselves.
    passes = 4
    assert ring.loads in (passes * LAYERS, passes * LAYERS + size)


def test_blocks_carved_from_shared_page_locked_blocks_stream_exactly(folder, request, monkeypatch):
    """As on a CUDA host: each block's flat buffer is a view into a few large page-locked blocks of a
    PinnedArena (ordinary memory here), and the ring streams them exactly."""
    from helios.model.offload import PinnedArena

    init = PinnedArena.__init__
    monkeypatch.setattr(PinnedArena, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "pin": True}))
    monkeypatch.setattr(PinnedArena, "_pinned", lambda self, n: torch.zeros(n, dtype=torch.uint8))
    streamed = helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True, blocks_on_host=True)
    buffers = [flat_buffer(b) for b in streamed.blocks]
    assert all(b is not None for b in buffers)
    assert len({b.untyped_storage().data_ptr() for b in buffers}) < len(buffers)  # blocks share storage
    resident = helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True)
    enable_block_streaming(streamed, 2, "cpu")
    kw = random_inputs(generator_for(request.node.name), text_dim=24)
    assert torch.equal(_forward(streamed, kw), _forward(resident, kw))


def test_ring_holds_each_block_own_weights_in_order(folder):
    model = helios.load_transformer(folder, dtype=torch.bfloat16, blocks_on_host=True)
    ring = BlockRing(model.blocks, 2, "cpu")
    seen = []
    for i, slot in enumerate(ring.blocks()):
        assert ring.max_resident <= 2
        for (name, a), (_, b) in zip(sorted(slot.state_dict().items()), sorted(model.blocks[i].state_dict().items())):
            assert torch.equal(a, b), (i, name)
        seen.append(i)
    assert seen == list(range(LAYERS))


def test_ring_restarts_after_a_pass_stopped_early(folder):
    model = helios.load_transformer(folder, dtype=torch.bfloat16, blocks_on_host=True)
    ring = BlockRing(model.blocks, 2, "cpu")
    it = ring.blocks()
    next(it), next(it), next(it)
    it.close()
    for i, slot in enumerate(ring.blocks()):
        assert torch.equal(slot.scale_shift_table, model.blocks[i].scale_shift_table)


def test_streaming_needs_packed_blocks(folder):
    model = helios.load_transformer(folder, dtype=torch.bfloat16)
    assert flat_buffer(model.blocks[0]) is None
    with pytest.raises(ValueError, match="flat buffer"):
        BlockRing(model.blocks, 2, "cpu")


def test_host_blocks_are_packed_one_buffer_each(folder):
    model = helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True, blocks_on_host=True)
    buffers = [flat_buffer(b) for b in model.blocks]
    assert all(b is not None for b in buffers)
    per_block = sum(t.numel() * t.element_size() for t in model.blocks[0].state_dict().values())
    assert per_block <= buffers[0].numel() <= per_block + 256 * len(model.blocks[0].state_dict())


def test_layer_streamed_text_encoder_gives_the_same_embeddings():
    import transformers

    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                                dropout_rate=0.0)
    torch.manual_seed(0)
    enc = transformers.T5EncoderModel(cfg).eval()
    ids = torch.randint(0, 50, (1, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = enc(ids, mask).last_hidden_state
        stream_layers_(list(enc.encoder.block) + [enc.encoder.final_layer_norm], "cpu")
        got = enc(ids, mask).last_hidden_state
    assert torch.equal(want, got)


def test_pinned_arena_packs_many_buffers_into_few_power_of_two_blocks(monkeypatch):
    """40 streamed FP8 blocks (358 MB each in the 14B model, here scaled down 1000x): with the total given,
    the arena opens 8, 4, 2 and 0.5 'GiB' blocks, 8% over the bytes asked for, where one allocation per
    buffer would take 40 x 512 (the host allocator's power-of-two rounding). The buffers are disjoint."""
    from helios.model.offload import PinnedArena

    monkeypatch.setattr(PinnedArena, "_pinned", lambda self, size: torch.zeros(size, dtype=torch.uint8))
    n, count = 358_000, 40
    arena = PinnedArena(expected_bytes=n * count, pin=True)
    views = [arena.empty((n,), torch.uint8) for _ in range(count)]
    assert arena.reserved_bytes == (8 + 4 + 2 + 0.5) * 2**20
    assert arena.reserved_bytes < 1.1 * n * count < count * 2**19
    for i, v in enumerate(views):
        v.fill_(i % 251)
    assert all(bool((v == i % 251).all()) for i, v in enumerate(views))
    plain = PinnedArena(block_bytes=2**20, pin=True)  # no hint: blocks of block_bytes
    assert plain.next_block_bytes(1000) == 2**20


def test_a_resident_model_streamed_in_place_computes_what_it_computed(folder, request):
    """enable_block_streaming on a model loaded resident packs its blocks on the host first (values kept):
    the same model, before and after, gives the same forward exactly."""
    model = helios.load_transformer(folder, dtype=torch.bfloat16, fp8=True)
    gen = generator_for(request.node.name)
    inputs = [random_inputs(gen, text_dim=24) for _ in range(2)]
    before = [_forward(model, kw) for kw in inputs]
    ring = enable_block_streaming(model, 2, "cpu")
    assert all(flat_buffer(b) is not None for b in model.blocks)
    for kw, want in zip(inputs, before):
        assert torch.equal(_forward(model, kw), want)
    assert ring.max_resident <= 2
