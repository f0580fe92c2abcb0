"""SparseGPT (Frantar & Alistarh 2023): OBS with lazy batch updates (SPEC 5.3); the solver is
owlctl.core.sparsegpt. Each column block of ``blocksize`` columns is its own comparison group."""

from __future__ import annotations

from typing import Any

from owlctl.core.methods import MethodOptions, PruningMethod, register


def prune(weight: Any, *, sparsity: float | None, n_keep: int | None, m: int | None, stats: dict,
          options: MethodOptions) -> tuple[Any, Any]:
    from owlctl.core.sparsegpt import sparsegpt_prune

    new, mask = sparsegpt_prune(weight, stats["hessian"], sparsity=sparsity, n_keep=n_keep, m=m,
                                blocksize=options.blocksize, percdamp=options.percdamp,
                                overwrite_hessian=stats.get("overwrite_hessian", False))  # W on an fp32 copy
    return new.to(weight.dtype), mask


def expected(shape: tuple[int, int], sparsity: float, options: MethodOptions) -> int:
    from owlctl.core.masks import prune_count

    rows, cols = shape
    b = options.blocksize
    return sum(prune_count(rows * min(b, cols - i), sparsity) for i in range(0, cols, b))


METHOD = register(PruningMethod("sparsegpt", frozenset({"hessian"}), prune, expected))
