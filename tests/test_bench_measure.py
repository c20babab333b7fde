"""``stepdistill.bench.measure``: the timing and peak-memory helpers of both benchmarks (CPU)."""

from __future__ import annotations

import time

import pytest
import torch

from stepdistill.bench.measure import median_ms, peak_mib, peak_rss_mib, reset_peak, time_calls

CPU = torch.device("cpu")


def test_time_calls_times_runs_after_warmup_and_cleans_up_after_each():
    log = []
    times = time_calls(lambda: log.append("call"), runs=3, warmup=2, device=CPU, cleanup=lambda: log.append("clean"))
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert log == ["call", "clean"] * 5


def test_median_ms_is_in_milliseconds():
    assert median_ms(lambda: time.sleep(0.02), runs=3, warmup=0) >= 20


@pytest.mark.parametrize("runs, warmup", [(0, 1), (2, -1)])
def test_bad_repeats_are_refused(runs, warmup):
    calls = []
    with pytest.raises(ValueError, match=f"runs={runs} must be >= 1 and warmup={warmup} >= 0"):
        time_calls(lambda: calls.append(1), runs=runs, warmup=warmup)
    assert calls == []


def test_cpu_peak_follows_an_allocation():
    kind = reset_peak(CPU)
    if "VmHWM" not in kind:
        pytest.skip(f"no resettable peak RSS here ({kind})")
    before = peak_mib(CPU)
    block = torch.ones(32 * 2**20 // 4)  # 32 MiB, written, so resident
    assert peak_mib(CPU) >= before + 30
    del block
    assert peak_rss_mib() >= peak_mib(CPU) - 1  # the peak since start holds the peak since the reset
