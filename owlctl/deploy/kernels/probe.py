"""A STREAM-like read-bandwidth probe: the bytes/s the memory system delivers to ``threads`` threads.

Decode through the sparse kernels is memory bound, so the probe is the ceiling their effective GB/s
(bytes of the stored matrices / seconds) is compared against. The buffer (default 1 GiB) must be several
times the last-level cache, or the number is the cache's. Each thread streams its slice with the widest
vector loads the CPU has; the best of ``reps`` passes after one warm-up pass is reported (noise on a
shared machine only ever slows a pass down), with every pass's seconds.
"""

from __future__ import annotations

import ctypes

from owlctl.deploy.kernels import build


def read_bandwidth(nbytes: int = 1 << 30, threads: int = 1, reps: int = 5, isa: str = "auto") -> dict:
    """{"bytes", "threads", "isa", "best_bytes_per_s", "seconds": [per pass]}; raises on a kernel error."""
    from owlctl.errors import InputError

    lib = build.library()
    code = -1 if isa == "auto" else build.ISAS.get(isa)
    if code is None:
        raise InputError(f"unknown ISA {isa!r}", hint="use auto, avx512, avx2 or portable")
    secs = (ctypes.c_double * reps)()
    rate = lib.owl_read_bandwidth(int(nbytes), int(threads), int(reps), code, secs)
    if rate < 0:
        raise InputError(f"the bandwidth probe failed (code {rate:.0f})",
                         hint="check nbytes >= 4096, threads >= 1 and that the ISA is supported")
    used = {v: k for k, v in build.ISAS.items()}[int(lib.owl_isa_best()) if code < 0 else code]
    return {"bytes": int(nbytes), "threads": int(threads), "isa": used, "best_bytes_per_s": rate,
            "seconds": list(secs)}
