"""Magnitude pruning (Han et al. 2015): score |W_ij|, one comparison group per matrix (SPEC 5.1).

Data-free: no calibration forward is run. Exactly floor(numel * s) weights are pruned (ties by index), not
the reference's "<= the threshold at floor(numel * s)" (SPEC 12.10).
"""

from __future__ import annotations

from typing import Any

from owlctl.core.methods import MethodOptions, PruningMethod, register


def prune(weight: Any, *, sparsity: float | None, n_keep: int | None, m: int | None, stats: dict,
          options: MethodOptions) -> tuple[Any, Any]:
    from owlctl.core.masks import matrix_mask, nm_mask

    scores = weight.detach().float().abs()
    mask = nm_mask(scores, n_keep, m) if sparsity is None else matrix_mask(scores, sparsity)
    return weight.detach().masked_fill(mask, 0), mask


def expected(shape: tuple[int, int], sparsity: float, options: MethodOptions) -> int:
    from owlctl.core.masks import prune_count

    return prune_count(shape[0] * shape[1], sparsity)


METHOD = register(PruningMethod("magnitude", frozenset(), prune, expected))
