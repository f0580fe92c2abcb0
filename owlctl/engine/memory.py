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
