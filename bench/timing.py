"""Timing utilities: one clock per device, interleaved round-robin repetitions, paired ratios, peak memory.

Every ratio the benchmarks report compares variants timed in the same process, interleaved inside each repetition
(the starting variant rotates), so drifting load hits them alike. GPU: CUDA events around each call after a
synchronize. CPU: time.perf_counter.
"""
from __future__ import annotations

import gc
import math
import resource
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch


class Clock:
    """Milliseconds one call takes on ``device`` (CUDA events on a GPU, perf_counter on a CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@dataclass
class Stat:
    samples: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        pos = q * (len(s) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    def as_dict(self) -> Dict[str, Any]:
        return {"median_ms": self.median, "p25_ms": self.quantile(0.25), "p75_ms": self.quantile(0.75),
                "min_ms": min(self.samples), "n": len(self.samples), "samples_ms": [round(v, 4) for v in self.samples]}


def interleaved(variants: Dict[str, Callable[[], Any]], *, warmup: int, iters: int, clock: Clock,
                label: str = "", deadline: Optional[float] = None, min_iters: int = 3) -> Dict[str, Stat]:
    """Each repetition runs every variant once, starting one further along each time (round-robin).

    ``deadline`` (a time.perf_counter() value): stop after the repetition that passes it, once ``min_iters``
    timed repetitions exist; the stats then hold fewer than ``iters`` samples (their ``n`` says how many).
    """
    names = list(variants)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    done = 0
    for rep in range(warmup + iters):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            ms = clock(variants[name])
            if rep >= warmup:
                samples[name].append(ms)
        done = max(0, rep + 1 - warmup)
        if deadline is not None and time.perf_counter() > deadline and done >= min_iters:
            break
    if label:
        cut = f" (cut at {done} by the time budget)" if done < iters else ""
        print(f"    [{label}: {len(names)} variants x {warmup}+{iters} reps in {time.perf_counter() - t0:.1f} s{cut}]",
              flush=True)
    return {n: Stat(samples[n]) for n in names}


def paired_ratio(a: Stat, b: Stat) -> float:
    """Median over repetitions of a_i / b_i (the two were timed back to back in repetition i)."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


def paired_ratios(a: Stat, b: Stat, keep: Optional[List[bool]] = None) -> Stat:
    """The per-repetition ratios a_i / b_i themselves (median = ``paired_ratio``, quantiles = their spread);
    ``keep``: only the repetitions marked True."""
    pairs = zip(a.samples, b.samples, keep if keep is not None else [True] * len(a.samples))
    return Stat([x / y for x, y, k in pairs if k])


_PEAK_SEEN = {"bytes": 0}  # the highest torch.cuda.max_memory_allocated seen across the resets below


def peak_seen_mib(*, reset: bool = False) -> Optional[float]:
    """Highest allocated CUDA memory since the last ``reset=True`` call, across peak_extra_mib's own resets."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    seen = max(_PEAK_SEEN["bytes"], torch.cuda.max_memory_allocated())
    if reset:
        _PEAK_SEEN["bytes"] = 0
        torch.cuda.reset_peak_memory_stats()
    return seen / 2 ** 20


def peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak memory one call allocates above what was resident before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    _PEAK_SEEN["bytes"] = max(_PEAK_SEEN["bytes"], torch.cuda.max_memory_allocated())
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def host_syncs(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Synchronising CUDA calls one call of ``fn`` makes (torch.cuda.set_sync_debug_mode; None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
