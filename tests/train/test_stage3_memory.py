"""Stage 3's one-GPU memory options (distill.memory) give the same update as the plain path.

On the CPU the host copies are ordinary tensors, so these tests check the logic that the GPU runs:
the chunked AdamW step (AdamW's own step on parameter chunks with their moments swapped in), the
chunked EMA, and the frozen bases taking turns (freed storage brought back before its model runs,
autograd's saved weights included, with gradient checkpointing recomputing in the backward). Each is
exact, so every comparison is ``torch.equal``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helios.engine.history import HistoryLayout, split_history
from helios.sampling.dmd import DMDScheduler
from helios.train.stage3 import DistillBatch, DistillConfig, GANConfig, ScoreCritic, build_generator, scaled_head_blocks
from helios.train.stage3.memory import (BaseResidency, HostAdamW, HostEMA, MemoryConfig, chunks_by_bytes,
                                        update_ema)
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


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(7, 5), (3,), (11, 2), (4, 4), (9,)]]


def test_host_adamw_equals_adamw_parameters_and_states():
    """Two groups (own lr), chunks of about one parameter, a parameter without a gradient on some steps:
    parameters and every state tensor equal torch.optim.AdamW's."""
    kw = dict(lr=1e-2, betas=(0.0, 0.999), eps=1e-8, weight_decay=1e-3)
    plain_p, host_p = _params(0), _params(0)

    def groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3}]

    plain = torch.optim.AdamW(groups(plain_p), **kw)
    host = HostAdamW(groups(host_p), chunk_bytes=64, **kw)
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


def test_host_ema_equals_the_resident_ema():
    ps = _params(4)
    named = [(f"p{i}", p) for i, p in enumerate(ps)]
    plain = {n: p.detach().clone() for n, p in named}
    host = HostEMA(named, chunk_bytes=40)
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
