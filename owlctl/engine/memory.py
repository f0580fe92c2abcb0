"""This process's memory as the kernel counts it: resident set size now and its peak, and a reset of the
peak so the next measurement is its own (Linux /proc; getrusage elsewhere).

The DeepSparse worker (deploy/eol/deepsparse_worker.py) keeps a copy of ``rss_mb``: it runs in DeepSparse's
own venv, where owlctl is not importable.
"""

from __future__ import annotations

import gc
import sys


def rss_mb(field: str = "VmRSS") -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) in MiB from /proc/self/status; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    peak = rss_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def settle_memory() -> None:
    """Free what can be freed and reset the kernel's peak-RSS counter, so the next peak is its own."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup can still grow by (v2 memory.max - memory.current, or v1
    memory.limit_in_bytes - memory.usage_in_bytes); None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        _h, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = f"/sys/fs/cgroup{path}"
            limit, used = _read_int(f"{base}/memory.max"), _read_int(f"{base}/memory.current")
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            limit, used = _read_int(f"{base}/memory.limit_in_bytes"), _read_int(f"{base}/memory.usage_in_bytes")
        else:
            continue
        if limit is not None and used is not None and limit < 1 << 60:
            room = max(limit - used, 0)
            best = room if best is None else min(best, room)
    return best


def available_bytes() -> int | None:
    """Memory this process can still use: the kernel's MemAvailable, lowered by a memory cgroup's limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail
