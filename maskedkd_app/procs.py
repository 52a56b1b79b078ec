"""Training runs as single-threaded child processes, as many at a time as there are idle cores (demo, reproduction).

On a small CPU, two runs side by side finish sooner than one run on two threads (small matrices scale poorly),
and one thread per process means nothing spins at an OpenMP barrier waiting for a thread another process holds
(measured: 138 s alone, over 900 s beside one other 2-thread torch process on 2 cores).
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


def _cpu_times() -> Optional[tuple]:
    """(busy, total) jiffies summed over all cores from /proc/stat, or None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def busy_cores(sample_seconds: float = 1.0) -> float:
    """Cores kept busy by other processes right now, from /proc/stat sampled over ``sample_seconds``.

    The 1-minute load average lags by about a minute: right after a test run or a pip install it still reports
    the cores busy, and the demo ran its arms one at a time (measured: 488 s instead of about half). Where
    /proc/stat is missing, the load average is the fallback.
    """
    first = _cpu_times()
    if first is not None:
        time.sleep(sample_seconds)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            return (os.cpu_count() or 1) * (second[0] - first[0]) / (second[1] - first[1])
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def idle_cores() -> int:
    """Cores this process may use that are not busy right now, at least one.

    The runs are single-threaded processes, so a half-busy core is shared rather than stalled on: round.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, cores - int(busy_cores() + 0.5)))


class RunsFailed(RuntimeError):
    """At least one child run exited non-zero; the others were let finish."""


def run_processes(commands: Sequence[Tuple[str, List[str], Path]], *, workers: int, cwd: Path,
                  deadline: Optional[float] = None, label: str = "run") -> Tuple[Dict[str, float], List[str]]:
    """Run ``(key, argv, log_path)`` commands ``workers`` at a time, one thread each, in the order given.

    Returns ``(seconds per finished key, keys not started because ``deadline`` passed)``. A failed run starts no
    new ones but lets the running ones finish (no run loses work), then raises ``RunsFailed`` naming each failure
    and its log.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running, seconds, failed, skipped = list(commands), {}, {}, [], []
    while pending or running:
        while pending and len(running) < workers and not failed:
            key, argv, log_path = pending.pop(0)
            if deadline is not None and time.time() > deadline:
                skipped.append(key)
                continue
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "w")
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(cwd))
            running[key] = (proc, time.time(), log, log_path)
            print(f"[{label}] started {key} (log: {log_path})", flush=True)
        time.sleep(0.5)
        for key, (proc, started, log, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            if proc.returncode != 0:
                failed.append(f"{key} (exit {proc.returncode}; log {log_path})")
                print(f"[{label}] FAILED {key}", flush=True)
            else:
                seconds[key] = time.time() - started
                print(f"[{label}] finished {key} in {seconds[key]:.0f} s", flush=True)
    if failed:
        raise RunsFailed(f"{label} failed: " + "; ".join(failed) + " (finished runs are kept)")
    return seconds, skipped
