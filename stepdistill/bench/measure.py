"""Wall time and peak memory, as both benchmarks measure them (``bench.runner`` and ``bench.train_step``).

Times are ``time.perf_counter`` seconds around a call, with ``torch.cuda.synchronize()`` before and after
it on CUDA, so queued kernels count. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on CPU
the peak resident set size of the whole process (``VmHWM``, or ``ru_maxrss`` where /proc is missing).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device | None = None) -> None:
    """Wait for ``device``'s queued CUDA work; ``None``: the current CUDA device, when there is one."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds of one call of ``fn``, synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 0, device: torch.device | None = None,
               cleanup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of ``runs`` calls after ``warmup`` untimed ones; ``cleanup`` runs after every call,
    outside the timing."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        fn()
        if cleanup is not None:
            cleanup()
    times = []
    for _ in range(runs):
        times.append(timed_call(fn, device))
        if cleanup is not None:
            cleanup()
    return times


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 2, device: torch.device | None = None,
              cleanup: Callable[[], object] | None = None) -> float:
    """Median milliseconds of ``time_calls``."""
    return statistics.median(time_calls(fn, runs, warmup, device, cleanup)) * 1e3


def reset_peak(device: torch.device) -> str:
    """Reset the peak-memory counter of ``device``; returns what ``peak_mib`` will measure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "CUDA max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return "CPU peak RSS of the process (VmHWM)"
    except OSError:
        return "CPU peak RSS of the process since start (ru_maxrss)"


def peak_mib(device: torch.device) -> float:
    """Peak MiB since ``reset_peak``: allocated on CUDA, the process's resident set on CPU (NaN: unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = peak_rss_mib()
    return float("nan") if rss is None else rss


def peak_rss_mib() -> float | None:
    """Peak resident set size of the process since it started (``ru_maxrss``), or None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)
