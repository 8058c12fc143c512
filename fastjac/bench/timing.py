"""The one timer of fastjac's benchmarks: rivals timed side by side, and the device's measured floor.

Rivals are timed interleaved (each repeat times every rival once, in turn), so load from other
processes on a shared machine hits them alike. :func:`interleaved` returns every sample;
:func:`summary` reduces them (the median is what ``fastjac bench`` reports; the minimum, the least
disturbed sample, is what the studies on a shared CPU quote). A rival whose samples have used up
``budget_s`` stops after ``min_repeats`` (the per-sample reverse-mode baseline takes seconds per call).

Functions passed in must leave the device idle when they return: wrap GPU work in
:func:`synchronised`. Used by ``fastjac bench``, the asv suite and every script in ``benchmarks/``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def synchronised(device, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation on CUDA (nothing extra on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return lambda: (fn(), None)[1]

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


def _timed(fn: Callable[[], None], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _calls_per_sample(fn, min_sample_s: float) -> int:
    warm = _timed(fn, 1)                        # warm-up (allocations, autotuning, caches)
    if min_sample_s <= 0 or warm > 1.0:         # one call a sample; a slow rival is not run again
        return 1
    return max(1, math.ceil(min_sample_s / max(_timed(fn, 1), 1e-9)))


def interleaved(fns: dict[str, Callable[[], None]], *, repeats: int, min_repeats: int = 3,
                budget_s: float = 30.0, min_sample_s: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` samples each (fewer past ``budget_s``).

    Every function runs once to warm up; each sample averages enough calls to last
    ``min_sample_s`` (0: one call per sample). Functions must synchronise their device themselves.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    numbers = {name: _calls_per_sample(fn, min_sample_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            spent = sum(samples[name]) * numbers[name]
            if r >= min_repeats and spent > budget_s:
                continue
            samples[name].append(_timed(fn, numbers[name]))
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def summary(samples: list[float]) -> dict:
    """``{"median_s", "min_s", "repeats"}`` of one rival's samples."""
    return {"median_s": statistics.median(samples), "min_s": min(samples), "repeats": len(samples)}


@dataclass(frozen=True)
class Peaks:
    bandwidth: float   # bytes/s, measured device-to-device copy
    flops: float       # flop/s, measured float32 matmul (at the current matmul precision)


def measure_peaks(device: torch.device, *, copy_bytes: int = 1 << 28, matmul_n: int = 8192,
                  repeats: int = 10) -> Peaks:
    """The card's copy bandwidth and matmul peak, measured (medians of ``repeats``, CUDA events)."""
    src = torch.empty(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = event_median(lambda: dst.copy_(src), repeats)
    a = torch.randn(matmul_n, matmul_n, device=device)
    b = torch.randn(matmul_n, matmul_n, device=device)
    mm = event_median(lambda: torch.mm(a, b), repeats)
    return Peaks(bandwidth=2 * copy_bytes / copy, flops=2 * matmul_n ** 3 / mm)


def event_median(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, timed with CUDA events (one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
