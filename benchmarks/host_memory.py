"""Host memory of the benchmark process, read from /proc (Linux): the kernel's fields and a sampled peak.

Shared by bench_memory.py (the inference memory plans) and measure_distill_memory.py (stage 3).
"""

from __future__ import annotations

import threading
from pathlib import Path

GiB = 2**30


def proc_kib(path: str, keys: tuple[str, ...] | None = None) -> dict[str, int]:
    """The "Key: N kB" lines of a /proc file, in bytes: those named in `keys`, or all of them."""
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if (keys is None or key in keys) and value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def proc_status() -> dict[str, int]:
    """The memory fields (Vm*, Rss*) of /proc/self/status, in bytes."""
    return {k: v for k, v in proc_kib("/proc/self/status").items() if k.startswith(("Vm", "Rss"))}


class RssMeter:
    """The process's resident memory sampled every `period` s on a thread: the peak since `reset()` with its
    anonymous / file-backed / shared split at that moment (file and shared pages: memory-mapped shards), and
    the largest sample since the start (for kernels that keep VmHWM from the process start)."""

    def __init__(self, period: float = 0.1):
        self.period = period
        self.peak: dict[str, int] = {}
        self.lifetime = 0  # the largest VmRSS sampled since the start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def sample(self) -> None:
        now = proc_status()
        self.lifetime = max(self.lifetime, now.get("VmRSS", 0))
        if now.get("VmRSS", 0) > self.peak.get("VmRSS", -1):
            self.peak = now

    def reset(self, clear_hwm: bool = False) -> bool:
        """Start the sampled peak again (and, with clear_hwm, the kernel's VmHWM: "5" to
        /proc/self/clear_refs, Linux >= 4.0). Returns whether VmHWM was reset."""
        cleared = False
        if clear_hwm:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                cleared = True
            except OSError:
                pass
        self.peak = {}
        self.sample()
        return cleared

    def peak_rss(self) -> int:
        """The largest RSS sampled since `reset()`, in bytes (0: /proc unreadable)."""
        self.sample()
        return self.peak.get("VmRSS", 0)

    def report(self) -> dict[str, float]:
        self.sample()
        keys = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
        return {f"sampled_peak_{k}_gib": self.peak.get(k, 0) / GiB for k in keys}

    def stop(self) -> None:
        self._stop.set()
