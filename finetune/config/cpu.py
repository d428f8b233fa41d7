"""How many torch threads a run uses on CPU: as many as there are cores nobody else is using right now.

torch starts one thread per core and every parallel region waits for the slowest. On a machine shared with
another busy process, the thread that shares a core with it gets half of it in time slices, and every op
waits for it: measured on 2 cores with one busy process, the default run took 3-4x its idle time with 2
threads, against 1.4x with 1. `cpu_threads: auto` (the default) counts the idle cores over a short sample
of /proc/stat when the run starts; a number fixes it; null keeps torch's default.
"""
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("finetune")


def cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all cores since boot, or None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])  # guest time is counted inside user time already


def idle_cores(cores: int, sample_s: float = 0.3) -> float | None:
    """Cores idle over a `sample_s` window (this process is near idle while it waits), or None off Linux."""
    before = cpu_times()
    time.sleep(sample_s)
    after = cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return None
    total_cores = os.cpu_count() or cores
    return (after[0] - before[0]) / (after[1] - before[1]) * total_cores


def choose_threads(setting) -> int | None:
    """The torch thread count for `cpu_threads` (auto | N | null): None leaves torch's default."""
    if setting is None:
        return None
    if str(setting) != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = idle_cores(cores)
    threads = cores if free is None else max(1, min(cores, round(free)))
    log.info("cpu_threads=auto: %d thread(s) (%s of %d cores idle)", threads,
             "?" if free is None else f"{free:.1f}", cores)
    return threads
