"""The search space: one integer level offset per block on a grid around the target, with a fixed mean.

Unstructured: block l gets sparsity s_l = S + k_l * step, k_l in [k_lo, k_hi] (the grid is clipped to
[0, max_sparsity]); mixed N:M: block l keeps N + k_l weights per group of M, k_l in [k_lo, k_hi] (clipped
to [1, M]). The mean is held by the offsets: sum_l w_l k_l = 0 over each group of blocks of equal weight w
(``--balance blocks``: all blocks one group; ``--balance params``: one group per block size, so the
parameter-weighted mean is exact too; for the usual model, every block the same size, both are the same). A mutation moves one block a step up and another of its group a
step down, so every candidate has exactly the requested mean. Seeds (uniform, OWL allocations) are snapped
onto the grid with largest-remainder rounding, which keeps each group's sum.

Pure Python: no torch, no model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Space:
    """Offsets k in [k_lo, k_hi] per block; ``groups[l]`` is block l's group (blocks of one group trade steps)."""

    num_blocks: int
    k_lo: int
    k_hi: int
    groups: tuple[int, ...]
    step: float  # unstructured: sparsity per step; N:M: 1 (weights kept per group)
    base: float  # unstructured: the target S; N:M: the base N
    nm: tuple[int, int] | None = None  # (N, M) for mixed N:M

    @property
    def levels(self) -> list[int]:
        return list(range(self.k_lo, self.k_hi + 1))

    def value(self, k: int) -> float:
        """The block's sparsity (unstructured) or N kept (N:M) at offset k."""
        if self.nm is not None:
            return float(self.nm[0] + k)
        return round(self.base + k * self.step, 10)

    def sparsity(self, k: int) -> float:
        if self.nm is not None:
            return 1.0 - (self.nm[0] + k) / self.nm[1]
        return self.value(k)


def unstructured_space(target: float, step: float, spread: float, max_sparsity: float,
                       numels: Sequence[int], balance: str) -> Space:
    """Levels S + k*step for |k*step| <= spread, within [0, max_sparsity]."""
    k = math.floor(spread / step + 1e-9)
    k_lo = -min(k, math.floor(target / step + 1e-9))
    k_hi = min(k, math.floor((max_sparsity - target) / step + 1e-9))
    return Space(len(numels), k_lo, k_hi, _groups(numels, balance), step, target)


def nm_space(n_keep: int, m: int, spread: int, numels: Sequence[int], balance: str) -> Space:
    """Levels N + k for |k| <= spread, keeping 1..M weights per group."""
    return Space(len(numels), -min(spread, n_keep - 1), min(spread, m - n_keep), _groups(numels, balance), 1.0,
                 float(n_keep), (n_keep, m))


def _groups(numels: Sequence[int], balance: str) -> tuple[int, ...]:
    if balance == "blocks":
        return (0,) * len(numels)
    ids = {n: i for i, n in enumerate(dict.fromkeys(numels))}
    return tuple(ids[n] for n in numels)


def snap(space: Space, offsets: Sequence[float]) -> tuple[int, ...]:
    """Real offsets (in steps) -> grid offsets within [k_lo, k_hi] that sum to 0 in every group (largest
    remainder: floor everything, then +1 to the largest fractional parts, ties by index; a group of
    unequal-size blocks with ``--balance params`` thus keeps the mean S on its own)."""
    x = [min(space.k_hi, max(space.k_lo, float(v))) for v in offsets]
    out = [math.floor(v + 1e-9) for v in x]
    for g in sorted(set(space.groups)):
        idx = [i for i in range(space.num_blocks) if space.groups[i] == g]
        want = 0  # every group keeps the mean exactly (OWL's own mean is exact too)
        have = sum(out[i] for i in idx)
        up = sorted(idx, key=lambda i: (-(x[i] - out[i]), i))
        down = list(reversed(up))
        while have < want and _nudge(space, out, up, +1):
            have += 1
        while have > want and _nudge(space, out, down, -1):
            have -= 1
    return tuple(out)


def _nudge(space: Space, out: list[int], order: list[int], d: int) -> bool:
    """Move the first block of ``order`` that has room by d; True when one moved. ``order`` is rotated so
    repeated calls visit the next block first."""
    for j, i in enumerate(order):
        if space.k_lo <= out[i] + d <= space.k_hi:
            out[i] += d
            order[:] = order[j + 1:] + order[:j + 1]
            return True
    return False


def unstructured_offsets(space: Space, sparsities: Sequence[float]) -> tuple[int, ...]:
    return snap(space, [(s - space.base) / space.step for s in sparsities])


def mixed_offsets(space: Space, ratios: Sequence[float], lam: float) -> tuple[int, ...]:
    """OWL's mixed N:M steps before rounding, z_l - mean z with z = D min-max scaled to [0, lambda]
    (docs/algorithm.md), snapped so the mean N is exact."""
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return (0,) * space.num_blocks
    z = [(r - lo) / (hi - lo) * lam for r in ratios]
    mean = math.fsum(z) / len(z)
    return snap(space, [v - mean for v in z])


def mutate(space: Space, parent: Sequence[int], rng: random.Random, max_swaps: int) -> tuple[int, ...]:
    """``parent`` with 1..max_swaps level switches: one block a step up, another of its group a step down.
    Returns the parent itself when no switch is possible (a single block, or a grid of one level)."""
    child = list(parent)
    for _ in range(rng.randint(1, max_swaps)):
        ups = [i for i in range(space.num_blocks) if child[i] < space.k_hi]
        if not ups:
            break
        i = rng.choice(ups)
        downs = [j for j in range(space.num_blocks)
                 if j != i and space.groups[j] == space.groups[i] and child[j] > space.k_lo]
        if not downs:
            continue
        j = rng.choice(downs)
        child[i] += 1
        child[j] -= 1
    return tuple(child)


def key(offsets: Sequence[int]) -> str:
    """A candidate's name in the evaluation log: its offsets, comma-separated."""
    return ",".join(str(int(k)) for k in offsets)
