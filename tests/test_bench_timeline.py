"""benchmarks/probe_transformer.timeline: how a profiled run's GPU time splits into busy, idle and concurrent
time across streams (bench_e2e.py --profile reports it per chunk)."""

from __future__ import annotations

import pytest

from helpers.benchmarks import load_benchmark


def test_timeline_splits_busy_idle_and_concurrent_time_across_streams():
    timeline = load_benchmark("probe_transformer").timeline
    spans = [  # (start us, end us, stream, kernel)
        (0, 400, 7, "sm90_gemm_a"),
        (100, 300, 9, "memcpy_b"),      # inside stream 7's kernel: 200 us concurrent
        (400, 500, 7, "cudnn_sdpa_c"),  # back to back: no gap
        (560, 600, 7, "sm90_gemm_a"),   # a 60 us gap (over 50)
        (620, 1000, 9, "memcpy_b"),     # a 20 us gap
        (900, 1100, 7, "sm90_gemm_d"),  # overlaps the last: 100 us concurrent
    ]
    t = timeline(list(reversed(spans)), chunks=2)  # order does not matter
    assert t["kernels"] == 6
    assert t["window_ms"] == pytest.approx(1.1)
    assert t["busy_ms"] == pytest.approx(1.02)
    assert t["idle_ms"] == pytest.approx(0.08)
    assert t["gaps_over_50us"] == 1 and t["idle_in_gaps_over_50us_ms"] == pytest.approx(0.06)
    assert t["largest_gaps_ms"] == pytest.approx([0.06, 0.02])
    assert t["concurrent_ms"] == pytest.approx(0.3)
    assert t["per_stream"]["7"]["ms"] == pytest.approx(0.74)
    cat = load_benchmark("probe_transformer").kernel_category
    assert t["per_stream"]["9"]["by_category_ms"] == {cat("memcpy_b"): pytest.approx(0.58)}
    top = t["per_stream"]["7"]["top"]
    assert [(k["name"], k["calls"]) for k in top] == [("sm90_gemm_a", 2), ("sm90_gemm_d", 1), ("cudnn_sdpa_c", 1)]
    assert top[0]["ms"] == pytest.approx(0.44)
    assert t["per_chunk_ms"]["busy_ms"] == pytest.approx(0.51)
    assert timeline([]) == {"kernels": 0}
