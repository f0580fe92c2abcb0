"""Several processes, one run: `torchrun --nproc-per-node N -m owlctl prune ...` (or `accelerate launch`).

The launcher sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); with them, prune, nm,
profile and eval's perplexity join one torch.distributed process group (gloo on CPU, NCCL on CUDA with
device cuda:LOCAL_RANK) and split their work:

- calibration (and evaluation) batches: batch b (the sequences b*B .. (b+1)*B-1 of the one-process run,
  B = --batch-size) is run by rank b % N, so every batch is the same tensor as in one process;
- per-Linear statistics are reduced so that the result does not depend on N: Wanda's activation norms (and
  profile's statistics) are gathered per batch and summed in batch order in float32, exactly as one process
  sums them (bit-identical); SparseGPT's Hessians are summed in float64 from per-batch float32 products
  (equal for every N up to float64 rounding, then rounded to float32);
- SparseGPT solves matrix k of a block on rank k % N and broadcasts the pruned weights and mask;
- perplexity: each window's loss is computed by the rank that owns its batch and gathered in window order.

Rank 0 alone writes outputs and prints results, progress and messages. This module only reads the
launcher's environment (stdlib only, so the CLI can ask without importing torch); world.py does the rest.
"""

from __future__ import annotations

import os

TIMEOUT_ENV = "OWLCTL_DIST_TIMEOUT"  # seconds a collective may wait for the other processes
DEFAULT_TIMEOUT_S = 1800.0


def launched() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when a launcher (torchrun, accelerate launch) started this process."""
    env = os.environ
    if not all(k in env for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")):
        return None
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        return None
    return rank, size, local


def secondary() -> bool:
    """True in a launched process other than rank 0: it prints nothing but its own mid-run failure."""
    got = launched()
    return got is not None and got[0] != 0


def timeout_s() -> float:
    """The collective timeout (``$OWLCTL_DIST_TIMEOUT`` seconds, default 30 minutes)."""
    from owlctl.errors import InputError

    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}",
                         hint=f"e.g. {TIMEOUT_ENV}=1800")
    return value


_CURRENT: list = []


def current():
    """The process group this process works in (a world.World), or None in a single process."""
    return _CURRENT[-1] if _CURRENT else None


def session(command: str, cfg: object):
    """The process group for one command (world.session), or a do-nothing context yielding None in a single
    process (nothing of torch.distributed is imported then)."""
    if launched() is None or current() is not None:
        from contextlib import nullcontext

        return nullcontext(current())
    from owlctl.engine.distributed.world import session as _session

    return _session(command, cfg)


def reporting(world: object) -> bool:
    """Whether this process reports (progress, results, outputs): a single process, or rank 0."""
    return world is None or getattr(world, "main", True)
