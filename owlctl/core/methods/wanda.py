"""Wanda (Sun et al. 2023, arXiv 2306.11695): score A_ij = |W_ij| * ||X_j||_2, each row its own comparison
group (SPEC 5.2); no weight update.

The statistic act_sq_norm (C_in,) is the mean over calibration samples of the squared L2 norm of input
channel j over each sample's tokens (SPEC 1.3), so sqrt(act_sq_norm_j) = ||X_j||_2 / sqrt(K): a constant
factor per matrix that changes no ranking. Scores are float32 whatever the weight dtype.
Options: wanda_group "matrix" (one group per matrix), wanda_variant (the cumulative-mass variant, its own
grouping: per row, one alpha per matrix).
"""

from __future__ import annotations

from typing import Any

from owlctl.core.methods import MethodOptions, PruningMethod, register


def scores(weight: Any, act_sq_norm: Any) -> Any:
    """A_ij = |W_ij| * sqrt(act_sq_norm_j), fp32. weight (C_out, C_in), act_sq_norm (C_in,)."""
    import torch
    from torch import Tensor

    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (C_out, C_in), got {getattr(weight, 'shape', weight)!r}")
    if not isinstance(act_sq_norm, Tensor) or tuple(act_sq_norm.shape) != (weight.shape[1],):
        raise ValueError(
            f"act_sq_norm must have shape (C_in,) = ({weight.shape[1]},) for weight {tuple(weight.shape)}, "
            f"got {tuple(getattr(act_sq_norm, 'shape', ()))}"
        )
    norm = act_sq_norm.to(device=weight.device, dtype=torch.float32).sqrt()
    s = weight.detach().to(torch.float32, copy=True)  # one fp32 matrix, updated in place (no temporaries)
    return s.abs_().mul_(norm.unsqueeze(0))


def prune(weight: Any, *, sparsity: float | None, n_keep: int | None, m: int | None, stats: dict,
          options: MethodOptions) -> tuple[Any, Any]:
    from owlctl.core.masks import matrix_mask, nm_mask, rowwise_mask, wanda_variant_mask

    s = scores(weight, stats["act_sq_norm"])
    if sparsity is None:
        mask = nm_mask(s, n_keep, m)
    elif options.wanda_variant:
        mask = wanda_variant_mask(s, sparsity)
    elif options.wanda_group == "matrix":
        mask = matrix_mask(s, sparsity)
    else:
        mask = rowwise_mask(s, sparsity)
    return weight.detach().masked_fill(mask, 0), mask


def expected(shape: tuple[int, int], sparsity: float, options: MethodOptions) -> int:
    from owlctl.core.masks import prune_count

    rows, cols = shape
    if options.wanda_variant:
        return -1  # data-dependent: rows get different sparsities
    if options.wanda_group == "row":
        return rows * prune_count(cols, sparsity)
    return prune_count(rows * cols, sparsity)


METHOD = register(PruningMethod("wanda", frozenset({"act_norm"}), prune, expected))
