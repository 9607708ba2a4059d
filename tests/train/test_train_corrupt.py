"""Easy Anti-Drifting corruption and task dropout: statistics, identities, untouched clean frames."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from helios.train.corrupt import (
    OP_CLEAN,
    OP_DOWNSAMPLE,
    OP_NOISE,
    OP_SATURATION,
    HistoryCorruptionConfig,
    ModelInputCorruptionConfig,
    TaskDropoutConfig,
    apply_task_dropout,
    corrupt_history,
    corrupt_model_input,
    degrade_history,
    frame_aware_corrupt,
    history_segments,
    saturate_history,
)
from helios.train.history import HistoryLayout, history_from_sections, model_history_inputs

L = HistoryLayout()  # official 16/2/1 + window 9


def history(B=1, C=4, h=4, w=4, seed=0, value=None):
    g = torch.Generator().manual_seed(seed)
    if value is not None:
        full = torch.full((B, C, 20, h, w), float(value))
    else:
        full = torch.randn(B, C, 20, h, w, generator=g)
    kw = model_history_inputs(full[:, :, 1:], full[:, :, :1], L)
    return kw["latents_history_short"], kw["latents_history_mid"], kw["latents_history_long"]


def frames_of(short, mid, long):
    """[anchor, long..., mid..., last] along dim 2."""
    return torch.cat([short[:, :, :1], long, mid, short[:, :, 1:]], 2)


def test_layout_indices_and_segments():
    ind = L.indices(2)
    assert ind["indices_latents_history_short"].tolist()[0] == [0, 19]
    assert ind["indices_latents_history_long"].tolist()[0] == list(range(1, 17))
    assert ind["indices_latents_history_mid"].tolist()[0] == [17, 18]
    assert ind["indices_hidden_states"].tolist()[0] == list(range(20, 29))
    segs = [(s["start"], s["end"], s["ratio"]) for s in history_segments(L)]
    assert segs == [(0, 1, "long"), (1, 10, "long"), (10, 12, "long"), (12, 19, "mid")]
    sections = torch.arange(3 * 2 * 9, dtype=torch.float32).reshape(3, 2, 9, 1, 1) + 1
    anchor, hist, target = history_from_sections(sections, 2, L)
    assert torch.equal(target, sections[2])
    assert torch.equal(hist[:, -9:], sections[1]) and torch.equal(hist[:, 1:10], sections[0])
    assert not hist[:, 0].any() and torch.equal(anchor, sections[0, :, :1])
    anchor0, hist0, _ = history_from_sections(sections, 0, L)
    assert not anchor0.any() and not hist0.any()


def test_switched_off_is_identity():
    s, m, l_ = history()
    g = torch.Generator().manual_seed(1)
    off = [
        HistoryCorruptionConfig(enabled=False, saturation_enabled=True),
        HistoryCorruptionConfig(mode="random", noise_enabled=False, downsample_enabled=False),
        HistoryCorruptionConfig(mode="noise", noise_enabled=False),
        HistoryCorruptionConfig(style="per_frame", noise_enabled=False, downsample_enabled=False, saturation_enabled=False,
                                p_saturation=0.3),
    ]
    for cfg in off:
        for _ in range(20):
            s2, m2, l2, _ = degrade_history(s, m, l_, cfg, g, L)
            assert torch.equal(s2, s) and torch.equal(m2, m) and torch.equal(l2, l_)
    a, lo, mi, la, tasks = apply_task_dropout(s[:, :, :1], l_, m, s[:, :, 1:], TaskDropoutConfig(enabled=False), g)
    assert tasks == ["full"] and torch.equal(lo, l_)
    x = torch.randn(1, 4, 9, 4, 4)
    assert torch.equal(corrupt_model_input(x, ModelInputCorruptionConfig(), g)[0], x)


def test_official_decision_probabilities_and_clean_untouched():
    s, m, l_ = history(C=2, h=2, w=2)
    cfg = HistoryCorruptionConfig(mode="random")  # correct.yaml: clean 0.1, then noise 0.9 / downsample 0.1
    g = torch.Generator().manual_seed(2)
    n = 2000
    counts = Counter()
    for _ in range(n):
        s2, m2, l2, log = corrupt_history(s, m, l_, cfg, g, L)
        counts[log.decision] += 1
        if log.decision == "clean":
            assert torch.equal(s2, s) and torch.equal(m2, m) and torch.equal(l2, l_)
        elif log.decision == "noise":  # (a 2x2 latent is too small for a 0.9-1.0 resize to change it)
            assert not torch.equal(frames_of(s2, m2, l2), frames_of(s, m, l_))
    for k, p in {"clean": 0.1, "noise": 0.81, "downsample": 0.09}.items():
        assert abs(counts[k] / n - p) < 0.03, (k, counts)


def test_noise_levels_frame_independent_and_zero_windows_skipped():
    s, m, l_ = history(B=2, C=16, h=16, w=16, value=1.0)
    g = torch.Generator().manual_seed(3)
    sig = []
    for fi in (True, False):
        cfg = HistoryCorruptionConfig(mode="noise", clean_prob=0.0, frame_independent=fi)
        s2, m2, l2, _ = corrupt_history(s, m, l_, cfg, g, L)
        f = frames_of(s2, m2, l2)  # x' = sigma * eps + (1 - sigma): per frame mean ~ 1 - sigma
        est = 1 - f.mean(dim=(1, 3, 4))  # (B, 20)
        sig.append(est)
        assert est.min() > -0.03 and est.max() < 1 / 3 + 0.03
        win1 = est[:, 2:11]  # window0 (anchor is frame 0, tail frame 1): one sigma unless frame independent
        if fi:
            assert win1.std(dim=1).min() > 0.01
        else:
            assert win1.std(dim=1).max() < 0.01
    # many draws: sigma ~ U[0, 1/3) -> mean 1/6
    allsig = []
    cfg = HistoryCorruptionConfig(mode="noise", clean_prob=0.0)
    for _ in range(30):
        s2, m2, l2, _ = corrupt_history(s, m, l_, cfg, g, L)
        allsig.append(1 - frames_of(s2, m2, l2).mean(dim=(1, 3, 4)))
    assert abs(torch.cat(allsig).mean().item() - 1 / 6) < 0.02
    # the V2V dropout zeroed the 10 oldest frames: those windows are skipped and stay exactly zero
    l0 = l_.clone()
    l0[:, :, :10] = 0
    s2, m2, l2, log = corrupt_history(s, m, l0, cfg, g, L)
    assert not l2[:, :, :10].any() and not torch.equal(l2[:, :, 10:], l0[:, :, 10:])
    applied = {x["name"]: x["applied"] for x in log.segments}
    assert applied == {"tail": False, "window0": False, "window1a": True, "window1b": True, "anchor": True}


def test_downsample_and_saturation():
    s, m, l_ = history(C=16, h=16, w=16)
    g = torch.Generator().manual_seed(4)
    cfg = HistoryCorruptionConfig(mode="downsample", clean_prob=0.0, downsample_min=0.5, downsample_max=0.5)
    s2, m2, l2, log = corrupt_history(s, m, l_, cfg, g, L)
    assert log.decision == "downsample"
    a, b = frames_of(s, m, l_), frames_of(s2, m2, l2)
    assert (a - b).abs().mean() > 0.1 and (a.mean() - b.mean()).abs() < 0.05  # blurred, same brightness
    # saturation: per segment factor in range, channel mean preserved, anchor untouched, clean ~ 10 %
    cfg = HistoryCorruptionConfig(saturation_enabled=True)
    clean = total = 0
    for _ in range(200):
        s3, m3, l3, log = saturate_history(s, m, l_, cfg, g, L)
        assert torch.equal(s3[:, :, :1], s[:, :, :1])
        f3, f0 = frames_of(s3, m3, l3), frames_of(s, m, l_)
        assert torch.allclose(f3.mean(1), f0.mean(1), atol=1e-5, rtol=0)
        for seg in log.segments:
            total += 1
            if not seg["applied"]:
                clean += 1
                assert torch.equal(f3[:, :, 1 + seg["start"] : 1 + seg["end"]], f0[:, :, 1 + seg["start"] : 1 + seg["end"]])
            else:
                assert 0.3 <= seg["factor"] <= 1.7 and abs(seg["factor"] - 1) >= 1e-3
    assert abs(clean / total - 0.1) < 0.03
    # stage-3 style degrade: corruption then saturation; without saturation for the score models
    cfg = HistoryCorruptionConfig(mode="noise", saturation_enabled=True)
    assert len(degrade_history(s, m, l_, cfg, g, L)[3]) == 2
    assert len(degrade_history(s, m, l_, cfg, g, L, with_saturation=False)[3]) == 1


def test_per_frame_probabilities():
    s, m, l_ = history(B=64, C=2, h=4, w=4)
    g = torch.Generator().manual_seed(5)
    cfg = HistoryCorruptionConfig(style="per_frame", saturation_enabled=True, p_saturation=0.4, p_noise=0.4,
                                  p_downsample=0.0, p_clean=0.2)
    ops = []
    for _ in range(10):
        s2, m2, l2, log = frame_aware_corrupt(s, m, l_, cfg, g, L)
        ops.append(log.frame_ops[:, 1:])  # the anchor never gets saturation
        f0, f2 = frames_of(s, m, l_), frames_of(s2, m2, l2)
        clean = (log.frame_ops == OP_CLEAN)
        assert torch.equal(f2.permute(0, 2, 1, 3, 4)[clean], f0.permute(0, 2, 1, 3, 4)[clean])
        assert not torch.equal(f2.permute(0, 2, 1, 3, 4)[~clean], f0.permute(0, 2, 1, 3, 4)[~clean])
    ops = torch.cat(ops).flatten()
    freq = {k: (ops == k).float().mean().item() for k in (OP_CLEAN, OP_NOISE, OP_DOWNSAMPLE, OP_SATURATION)}
    assert abs(freq[OP_SATURATION] - 0.4) < 0.03 and abs(freq[OP_NOISE] - 0.4) < 0.03
    assert abs(freq[OP_CLEAN] - 0.2) < 0.03 and freq[OP_DOWNSAMPLE] == 0
    # switching saturation off moves its mass to "clean"
    ops = frame_aware_corrupt(s, m, l_, replace(cfg, saturation_enabled=False), g, L)[3].frame_ops.flatten()
    assert (ops == OP_SATURATION).sum() == 0 and abs((ops == OP_CLEAN).float().mean().item() - 0.6) < 0.05
    # dropped (all-zero) frames stay zero
    l0 = l_.clone()
    l0[:, :, :5] = 0
    s2, m2, l2, _ = frame_aware_corrupt(s, m, l0, cfg, g, L)
    assert not l2[:, :, :5].any()


def test_task_dropout_statistics_and_patterns():
    s, m, l_ = history(value=1.0)
    anchor, last = s[:, :, :1], s[:, :, 1:]
    cfg = TaskDropoutConfig(t2v_ratio=0.4, v2v_ratio=0.4, i2v_ratio=0.1)
    g = torch.Generator().manual_seed(6)
    n = 3000
    counts, drops = Counter(), Counter()
    for _ in range(n):
        a, lo, mi, la, tasks = apply_task_dropout(anchor, l_, m, last, cfg, g)
        t = tasks[0]
        hist = torch.cat([lo, mi, la], 2)[0, 0, :, 0, 0]  # 19 frames, oldest first
        if t == "t2v":
            assert not a.any() and not hist.any()
        elif t == "i2v":
            assert a.all() and hist[-1] == 1 and not hist[:-1].any()
        elif t.startswith("v2v"):
            k = int(t[len("v2v_drop"):])
            drops[k] += 1
            assert a.all() and not hist[:k].any() and hist[k:].all()
        else:
            assert t == "full" and hist.all() and a.all()
        counts["v2v" if t.startswith("v2v") else t] += 1
    expect = {"t2v": 0.4, "i2v": 0.06, "v2v": 0.6 * 0.9 * 0.4, "full": 0.6 * 0.9 * 0.6}
    for k, p in expect.items():
        assert abs(counts[k] / n - p) < 0.03, (k, counts)
    assert set(drops) == {1, 10, 19} and min(drops.values()) > 0.25 * sum(drops.values())
    # the inputs are never modified in place
    assert l_.all() and m.all() and s.all()
    # per-sample decisions differ across the batch
    sb, mb, lb = history(B=16, value=1.0)
    tasks = apply_task_dropout(sb[:, :, :1], lb, mb, sb[:, :, 1:], TaskDropoutConfig(per_sample=True), g)[4]
    assert len(set(tasks)) > 1


def test_deterministic_with_generator():
    s, m, l_ = history(B=2)
    cfg = HistoryCorruptionConfig(mode="random", saturation_enabled=True)
    out = [degrade_history(s, m, l_, cfg, torch.Generator().manual_seed(9), L)[:3] for _ in range(2)]
    for x, y in zip(*out):
        assert torch.equal(x, y)
