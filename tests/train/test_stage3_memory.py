"""Stage 3's one-GPU memory options (distill.memory) give the same update as the plain path.

On the CPU the host copies are ordinary tensors, so these tests check the logic that the GPU runs:
the chunked AdamW step (AdamW's own step on parameter chunks with their moments swapped in), the
chunked EMA, and the frozen bases taking turns (freed storage brought back before its model runs,
autograd's saved weights included, with gradient checkpointing recomputing in the backward). Each is
exact, so every comparison is ``torch.equal``. The chunked round trips also run through a link that
defers every copy as an asynchronous device does (:class:`DeferredLink`): an update that ran before
its chunk's upload, or a download still in flight when the step returns, would change the numbers.
The pinned arena's carving runs on ordinary blocks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helios.engine.history import HistoryLayout, split_history
from helios.sampling.dmd import DMDScheduler
from helios.train.stage3 import DistillBatch, DistillConfig, GANConfig, ScoreCritic, build_generator, scaled_head_blocks
from helios.train.stage3.memory import (BaseResidency, HostAdamW, HostEMA, MemoryConfig, PinnedArena,
                                        chunks_by_bytes, round_trip, update_ema)
from helios.train.timesteps import TimestepConfig
from helpers.distill_loop import StandaloneDistiller, tiny_teacher
from helpers.train_runs import checkpoint_tensors, stage3_user

B, C, T, H, W = 1, 16, 9, 16, 16


@pytest.fixture(autouse=True)
def _no_mkldnn():
    before = torch.backends.mkldnn.enabled  # oneDNN is ~30x slower than BLAS at these tiny sizes
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = before


def test_chunks_by_bytes_covers_every_item_once():
    assert chunks_by_bytes([4, 4, 4, 10, 1], 8) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert chunks_by_bytes([], 8) == []
    r = chunks_by_bytes([3] * 7, 9)
    assert [i for x in r for i in x] == list(range(7)) and all(len(x) <= 3 for x in r)


class DeferredLink:
    """round_trip's link as an asynchronous device runs it: an upload's tensors hold NaN until the
    update may begin (they get the host values of the moment of the upload), and a download reaches the
    host only at ``finish``. Counts the chunks uploaded and not yet downloaded."""

    def __init__(self, device: torch.device | None = None):
        self.pending: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.live = self.most_live = self.finished = 0

    def upload(self, host):
        self.live += 1
        self.most_live = max(self.most_live, self.live)
        dev = [torch.full_like(t, float("nan")) for t in host]
        return dev, (dev, [t.clone() for t in host])

    def begin(self, ready):
        for d, v in zip(*ready):
            d.copy_(v)

    def download(self, host, dev):
        self.live -= 1
        self.pending.append((host, [d.clone() for d in dev]))

    def finish(self):
        for host, values in self.pending:
            for h, v in zip(host, values):
                h.copy_(v)
        self.pending.clear()
        self.finished += 1


def test_round_trip_waits_for_each_upload_and_every_download():
    g = torch.Generator().manual_seed(0)
    host = [[torch.randn(n, generator=g), torch.randn(n, generator=g)] for n in (5, 3, 8, 2, 6, 4)]
    want = [[2 * t + 1 for t in ts] for ts in host]
    link, seen = DeferredLink(), []

    def update(r, dev):
        seen.append(list(r))
        for ts in dev:
            assert not any(t.isnan().any() for t in ts)  # the upload had completed
            for t in ts:
                t.mul_(2).add_(1)

    round_trip(host, torch.device("cpu"), 7 * 8, update, link)
    assert [i for r in seen for i in r] == list(range(6)) and len(seen) > 2
    assert link.most_live == 2 and link.live == 0 and link.finished == 1  # one chunk ahead, never more
    assert all(torch.equal(a, b) for ts, ws in zip(host, want) for a, b in zip(ts, ws))


def test_round_trip_lands_the_finished_chunks_when_the_update_fails():
    host = [[torch.zeros(4)] for _ in range(4)]
    link = DeferredLink()

    def update(r, dev):
        if 2 in r:
            raise RuntimeError("out of memory")
        for (t,) in dev:
            t.fill_(1.0)

    with pytest.raises(RuntimeError, match="out of memory"):
        round_trip(host, torch.device("cpu"), 16, update, link)
    assert link.finished == 1 and [float(ts[0].sum()) for ts in host] == [4.0, 4.0, 0.0, 0.0]


def test_pinned_arena_carves_aligned_disjoint_tensors():
    """The carving of the page-locked blocks (on ordinary blocks here): aligned, disjoint, every dtype,
    one block's tail wasted at most, a tensor larger than a block on its own."""

    class Arena(PinnedArena):
        def _pinned(self, nbytes):
            return torch.zeros(nbytes, dtype=torch.uint8)

    arena = Arena(block_bytes=4096, pin=True)
    shapes = [((3, 5), torch.float32), ((7,), torch.bfloat16), ((), torch.float64), ((0, 4), torch.float32),
              ((33, 33), torch.float32), ((2, 2), torch.int64), ((1000,), torch.float32), ((100,), torch.float16)]
    out = [arena.empty(shape, dtype) for shape, dtype in shapes]
    for (shape, dtype), t in zip(shapes, out):
        assert t.shape == torch.Size(shape) and t.dtype == dtype and t.device.type == "cpu"
        assert t.is_contiguous() and t.storage_offset() * t.element_size() % PinnedArena.ALIGN == 0
    for k, t in enumerate(out):
        t.fill_(k + 1)
    assert all(bool((t == k + 1).all()) for k, t in enumerate(out))  # no two overlap
    # the lone tensor larger than a block is counted at the power of two the host allocator takes for it
    assert out[4].untyped_storage().nbytes() > 4096 and arena.reserved_bytes == 3 * 4096 + 8192
    c = arena.copy(torch.arange(6.0))
    assert torch.equal(c, torch.arange(6.0)) and torch.equal(arena.zeros_like(c), torch.zeros(6))


def test_host_memory_stays_on_the_cpu_inside_a_device_context():
    """Building models under ``torch.device(...)`` (directly on the GPU) leaves the host copies and
    AdamW's step counters on the CPU."""
    p = torch.nn.Parameter(torch.ones(3))
    with torch.device("meta"):
        assert PinnedArena(pin=False).empty((2,), torch.float32).device.type == "cpu"
        st = HostAdamW([p], pin=False).zero_state(p)
        ema = HostEMA([("p", p)], pin=False)
    assert all(t.device.type == "cpu" for t in st.values()) and ema["p"].device.type == "cpu"


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(7, 5), (3,), (11, 2), (4, 4), (9,)]]


@pytest.mark.parametrize("link", [None, DeferredLink], ids=["in_place", "deferred_copies"])
def test_host_adamw_equals_adamw_parameters_and_states(link):
    """Two groups (own lr), chunks of about one parameter, a parameter without a gradient on some steps:
    parameters and every state tensor equal torch.optim.AdamW's."""
    kw = dict(lr=1e-2, betas=(0.0, 0.999), eps=1e-8, weight_decay=1e-3)
    plain_p, host_p = _params(0), _params(0)

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3}]

    plain = torch.optim.AdamW(groups(plain_p), **kw)
    host = HostAdamW(groups(host_p), chunk_bytes=64, link=link, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in plain_p]
        for i, (a, b, gr) in enumerate(zip(plain_p, host_p, grads)):
            skip = i == 2 and step % 2 == 0  # this one trains only on odd steps
            a.grad, b.grad = (None, None) if skip else (gr.clone(), gr.clone())
        plain.step()
        host.step()
    for a, b in zip(plain_p, host_p):
        assert torch.equal(a, b)
        sa, sb = plain.state[a], host.state[b]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(plain_p[0], _params(0)[0])  # it did train


def test_host_adamw_state_dict_round_trip():
    kw = dict(lr=1e-2, betas=(0.0, 0.999))
    ps = _params(3)
    opt = HostAdamW([{"params": ps}], chunk_bytes=64, **kw)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    again = HostAdamW([{"params": _params(3)}], chunk_bytes=64, **kw)
    again.load_state_dict(opt.state_dict())
    for a, b in zip(ps, again.param_groups[0]["params"]):
        assert all(torch.equal(opt.state[a][k], again.state[b][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("link", [None, DeferredLink], ids=["in_place", "deferred_copies"])
def test_host_ema_equals_the_resident_ema(link):
    ps = _params(4)
    named = [(f"p{i}", p) for i, p in enumerate(ps)]
    plain = {n: p.detach().clone() for n, p in named}
    host = HostEMA(named, chunk_bytes=40, link=link)
    g = torch.Generator().manual_seed(5)
    for decay in (0.0, 0.5, 0.9, 0.99):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=g))
        update_ema(plain, named, decay)
        update_ema(host, named, decay)
    assert plain.keys() == host.keys() and all(torch.equal(plain[k], host[k]) for k in plain)


def test_memory_config_refuses_unknown_places():
    assert MemoryConfig.from_recipe({"distill": {"memory": {"ema": "host"}}}).any_host
    assert not MemoryConfig.from_recipe({}).any_host
    with pytest.raises(ValueError, match="optimizer_states"):
        MemoryConfig.from_recipe({"distill": {"memory": {"optimizer_states": "disk"}}})


# ---- the frozen bases taking turns, inside the stage-3 update ---------------------------------------


def _batch() -> DistillBatch:
    g = torch.Generator().manual_seed(1)
    text = torch.randn(B, 8, 32, generator=g)
    layout = HistoryLayout()
    hist = {**split_history(torch.randn(B, C, 19, H, W, generator=g), layout,
                            torch.randn(B, C, 1, H, W, generator=g)), **layout.indices(B)}
    return DistillBatch(text, torch.zeros(1, 8, 32), hist, hist, torch.randn(B, C, T, H, W, generator=g))


def _distiller(teacher, offload: bool) -> tuple[StandaloneDistiller, BaseResidency | None]:
    torch.manual_seed(2)
    gan = GANConfig(head_blocks=scaled_head_blocks(2), head_dim=64, start_step=0)
    gen, params = build_generator(teacher, lora_rank=4)  # LoRA: G has a frozen base of its own
    critic = ScoreCritic(copy.deepcopy(teacher), rank=4, gan=gan)
    for m in (gen, critic.transformer):
        m.enable_gradient_checkpointing(True)  # the recomputation in backward reads the bases again
    residency = BaseResidency({"generator": gen, "critic": critic.transformer}) if offload else None
    cfg = DistillConfig(gan=gan, generator_lr=1e-3, critic_lr=1e-3, ema_start_step=2,
                        critic_updates_per_generator_update=2)
    d = StandaloneDistiller(gen, critic, cfg, DMDScheduler(use_dynamic_shifting=True),
                            TimestepConfig(use_dynamic_shifting=True), generator_params=params, residency=residency)
    return d, residency


def test_bases_taking_turns_give_the_same_parameters_as_both_resident():
    teacher = tiny_teacher()
    batch = _batch()
    runs = {}
    for offload in (False, True):
        d, residency = _distiller(teacher, offload)
        seen = []
        if residency is not None:  # record what is on the device while each model runs
            gen_base = next(p for p in d.generator.parameters() if not p.requires_grad)
            critic_base = next(p for p in d.critic.transformer.parameters() if not p.requires_grad)

            def spy(model, gen_base=gen_base, critic_base=critic_base, real=residency.use):
                real(model)
                seen.append((model, gen_base.untyped_storage().nbytes() > 0,
                             critic_base.untyped_storage().nbytes() > 0))
            residency.use = spy
        for step in range(4):  # generator on steps 0 and 2, GAN + R1 throughout
            d.train_step(batch, batch, torch.Generator().manual_seed(100 + step))
        runs[offload] = d
        if residency is not None:
            assert {(m, g, c) for m, g, c in seen} == {("generator", True, False), ("critic", False, True)}
            assert residency.current == "generator"  # left resident for the next rollout / export
    plain, turns = runs[False], runs[True]
    for a, b in [(plain.generator_params, turns.generator_params), (plain.critic_params, turns.critic_params)]:
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(plain.ema.shadow[k], turns.ema.shadow[k]) for k in plain.ema.shadow)
    # the frozen bases came back byte for byte
    turns.residency.use("critic")
    for x, y in zip(plain.critic.transformer.parameters(), turns.critic.transformer.parameters()):
        assert torch.equal(x, y)


def test_an_offloaded_base_fails_loudly():
    """A frozen weight read while its model is out raises (a zero-size storage), never computes garbage."""
    d, residency = _distiller(tiny_teacher(), True)
    residency.use("critic")
    b = _batch()
    with pytest.raises(RuntimeError):
        d.generator(b.real, torch.full((B,), 500.0), b.text, **b.rollout_history)
    residency.use("generator")
    with torch.no_grad():
        assert torch.isfinite(d.generator(b.real, torch.full((B,), 500.0), b.text, **b.rollout_history).sample).all()


# ---- `helios train` with every option on -----------------------------------------------------------


def test_helios_train_stage3_memory_options_change_nothing(tmp_path, tiny_model, latent_cache):
    """Six iterations of the tiny stage-3 recipe (generator on 0 and 5, GAN from 2, EMA) with
    distill.memory all on host: the checkpoint (trainable parameters, AdamW states, EMA) equals the
    plain run's."""
    from helios.train.config import load_config
    from helios.train.trainer import train

    def run(out: str, **over):
        cfg = load_config(stage3_user(tmp_path, tiny_model, latent_cache, out),
                          ["export.enabled=false", *[f"{k}={v}" for k, v in over.items()]])
        assert all(cfg["distill"]["memory"][k.rsplit(".", 1)[1]] == v for k, v in over.items())
        return train(cfg)

    plain = run("plain")
    host = run("host", **{"distill.memory.idle_base": "host", "distill.memory.optimizer_states": "host",
                          "distill.memory.ema": "host", "distill.memory.chunk_mib": 1})
    assert plain.losses == host.losses
    a, b = checkpoint_tensors(plain.output_dir, tmp_path, 6), checkpoint_tensors(host.output_dir, tmp_path, 6)
    assert a.keys() == b.keys() and any(".ema." in k for k in a) and any("exp_avg" in k for k in a)
    for k in a:
        assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k


# ---- on a GPU: pinned memory, the copy streams and their events (skipped without CUDA) ---------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _busy() -> None:
    """Keep the compute stream busy for a while, so that copies that do not wait for it run ahead."""
    torch.cuda._sleep(20_000_000)


@cuda_only
def test_host_adamw_on_cuda_equals_adamw_bitwise():
    """Moments in pinned memory through the upload / download streams, many small chunks, the compute
    stream busy before each step: parameters and states equal torch.optim.AdamW's on the same GPU, and
    the host states are complete when ``step`` returns."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = [(257, 129), (3,), (4096,), (1000, 33), (7, 7, 7), (65536,)] * 6
    plain_p = [torch.nn.Parameter(torch.randn(s, device=dev, generator=g)) for s in shapes]
    host_p = [torch.nn.Parameter(p.detach().clone()) for p in plain_p]
    kw = dict(lr=1e-2, betas=(0.0, 0.999), eps=1e-8, weight_decay=1e-3)
    plain = torch.optim.AdamW([{"params": plain_p[:20]}, {"params": plain_p[20:], "lr": 3e-3}], **kw)
    host = HostAdamW([{"params": host_p[:20]}, {"params": host_p[20:], "lr": 3e-3}], chunk_bytes=300_000, **kw)
    for _ in range(4):
        for a, b in zip(plain_p, host_p):
            a.grad = torch.randn(a.shape, device=dev, generator=g)
            b.grad = a.grad.clone()
        plain.step()
        _busy()
        host.step()
        moments = [host.state[p][k].clone() for p in host_p for k in HostAdamW.MOMENTS]  # no sync before
        want = [plain.state[p][k].cpu() for p in plain_p for k in HostAdamW.MOMENTS]
        assert all(torch.equal(a, b) for a, b in zip(moments, want))
    assert all(torch.equal(a, b) for a, b in zip(plain_p, host_p))
    assert all(host.state[p][k].device.type == "cpu" and host.state[p][k].is_pinned()
               for p in host_p for k in HostAdamW.MOMENTS)


@cuda_only
def test_host_ema_on_cuda_equals_the_resident_ema_bitwise():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    named = [(f"p{i}", torch.randn(s, device=dev, generator=g)) for i, s in enumerate([(300, 70), (5,), (20000,)] * 5)]
    plain = {n: p.clone() for n, p in named}
    host = HostEMA(named, chunk_bytes=100_000)
    for decay in (0.0, 0.5, 0.99):
        for _, p in named:
            p.add_(torch.randn(p.shape, device=dev, generator=g))
        update_ema(plain, named, decay)
        _busy()
        update_ema(host, named, decay)
        assert all(torch.equal(plain[n].cpu(), host[n]) for n in plain)


@cuda_only
def test_bases_taking_turns_on_cuda_give_the_same_gradients():
    """Two models' frozen bf16 weights take turns on the GPU between a forward (saved weights,
    checkpointed recompute) and its backward; the trainable parameters' gradients equal those of the
    run with both resident."""
    from torch.utils.checkpoint import checkpoint

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
        m.to(torch.bfloat16).requires_grad_(False)
        m.head = torch.nn.Linear(256, 1, device="cuda", dtype=torch.bfloat16)  # trainable, stays
        return m

    def run(offload: bool) -> list[torch.Tensor]:
        a, b = model(0), model(1)
        residency = BaseResidency({"a": a, "b": b}, enabled=offload)
        residency.use("a")
        x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(2))
        ya = a.head(checkpoint(a[:2], x, use_reentrant=False) @ a[2].weight.T).sum()  # a's weight saved
        residency.use("b")
        _busy()
        with torch.no_grad():
            yb = b[:3](x).float().sum()
        residency.use("a")
        (ya + yb).backward()
        return [a.head.weight.grad.clone(), yb.detach().clone()]

    assert all(torch.equal(x, y) for x, y in zip(run(False), run(True)))
