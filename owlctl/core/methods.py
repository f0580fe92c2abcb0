"""One entry point per weight matrix: magnitude, Wanda or SparseGPT, unstructured or N:M.

    magnitude  (Han et al. 2015):              score |W_ij|,               comparison group = whole matrix
    wanda      (Sun et al. 2023, 2306.11695):  score |W_ij| * ||X_j||_2,   comparison group = each row
    sparsegpt  (Frantar & Alistarh 2023):      OBS saliency W_ij^2 / U_jj^2 (H^-1 = U^T U), plus weight updates

W has shape (C_out, C_in). The Wanda statistic act_sq_norm (C_in,) is the mean over calibration samples of
the squared L2 norm of input channel j over each sample's tokens (SPEC 1.3), so sqrt(act_sq_norm_j) =
||X_j||_2 / sqrt(K): a constant factor per matrix that does not change any ranking. Scores are fp32 whatever
the weight dtype; the returned weight keeps the input dtype with pruned entries exactly zero.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from owlctl.core.masks import matrix_mask, nm_mask, prune_count, rowwise_mask, wanda_variant_mask
from owlctl.core.sparsegpt import sparsegpt_prune

__all__ = ["MethodOptions", "METHODS", "NEEDS", "wanda_scores", "prune_weight"]

METHODS = ("magnitude", "wanda", "sparsegpt")
# Calibration statistics each method needs: "act_norm" -> act_sq_norm (C_in,), "hessian" -> (C_in, C_in).
NEEDS = {"magnitude": frozenset(), "wanda": frozenset({"act_norm"}), "sparsegpt": frozenset({"hessian"})}
_WANDA_GROUPS = ("row", "matrix")


@dataclass(frozen=True)
class MethodOptions:
    """Per-method knobs; the defaults reproduce the reference (SPEC 14).

    wanda_group: "row" (reference: every row pruned to the same count) or "matrix" (one group per matrix).
    wanda_variant: SPEC 5.2 cumulative-mass variant (unstructured only; rows get different sparsities).
    blocksize: SparseGPT lazy-update block width in columns (also where N:M groups restart).
    percdamp: SparseGPT damping, as a fraction of mean(diag H).
    """

    wanda_group: str = "row"
    wanda_variant: bool = False
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.wanda_group not in _WANDA_GROUPS:
            raise ValueError(f"wanda_group must be one of {_WANDA_GROUPS}, got {self.wanda_group!r}")
        if operator.index(self.blocksize) < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp}")


def wanda_scores(weight: Tensor, act_sq_norm: Tensor) -> Tensor:
    """A_ij = |W_ij| * sqrt(act_sq_norm_j), fp32. act_sq_norm: (C_in,) = mean over calibration samples of the squared L2 norm of input channel j over the sample's tokens (SPEC 1.3)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (C_out, C_in), got {getattr(weight, 'shape', weight)!r}")
    if not isinstance(act_sq_norm, Tensor) or tuple(act_sq_norm.shape) != (weight.shape[1],):
        raise ValueError(
            f"act_sq_norm must have shape (C_in,) = ({weight.shape[1]},) for weight {tuple(weight.shape)}, "
            f"got {tuple(getattr(act_sq_norm, 'shape', ()))}"
        )
    norm = act_sq_norm.to(device=weight.device, dtype=torch.float32).sqrt()
    return weight.detach().to(torch.float32).abs() * norm.unsqueeze(0)


def _check_stat(name: str, stat, shape: tuple[int, ...], method: str, weight: Tensor) -> None:
    if stat is None:
        raise ValueError(f"method {method!r} needs the calibration statistic {name} {shape}; none was given")
    if not isinstance(stat, Tensor) or tuple(stat.shape) != shape:
        raise ValueError(
            f"{name} must have shape {shape} for weight {tuple(weight.shape)}, got {tuple(getattr(stat, 'shape', ()))}"
        )


def _check_pattern(sparsity, n_keep, m) -> bool:
    """Validate "exactly one of sparsity or (n_keep, m)"; return True when the pattern prunes nothing."""
    nm_given = n_keep is not None or m is not None
    if sparsity is not None and nm_given:
        raise ValueError("give either sparsity= (unstructured) or n_keep=/m= (N:M), not both")
    if sparsity is None and not nm_given:
        raise ValueError("give sparsity= (unstructured, fraction pruned) or n_keep= and m= (N:M)")
    if sparsity is not None:
        prune_count(0, sparsity)  # validates the range [0, 1)
        return float(sparsity) == 0.0
    if n_keep is None or m is None:
        raise ValueError(f"N:M needs both n_keep and m, got n_keep={n_keep!r}, m={m!r}")
    n_keep, m = operator.index(n_keep), operator.index(m)
    if m < 1 or not 0 <= n_keep <= m:
        raise ValueError(f"N:M needs m >= 1 and 0 <= n_keep <= m (n_keep = weights kept), got {n_keep}:{m}")
    return n_keep == m


def prune_weight(
    method: str,
    weight: Tensor,
    *,
    sparsity: float | None = None,
    n_keep: int | None = None,
    m: int | None = None,
    act_sq_norm: Tensor | None = None,
    hessian: Tensor | None = None,
    options: MethodOptions = MethodOptions(),
) -> tuple[Tensor, Tensor]:
    """Returns (new_weight in weight's dtype, mask True=pruned). magnitude: scores |W|, matrix_mask (or nm_mask). wanda: wanda_scores then rowwise_mask / matrix_mask (wanda_group) / wanda_variant_mask / nm_mask; no weight update. sparsegpt: sparsegpt_prune on fp32 copy, cast back. sparsity==0 (and no N:M) returns weight unchanged and an all-False mask. Validates: unknown method (ValueError listing METHODS), missing statistic for the method, exactly one of sparsity or (n_keep, m).

    weight: (C_out, C_in); sparsity: fraction pruned in [0, 1); n_keep/m: N:M with n_keep weights KEPT per
    group of m input columns; act_sq_norm: (C_in,) for wanda; hessian: (C_in, C_in) for sparsegpt.
    When nothing is to be pruned (sparsity 0, or n_keep == m) the input tensor itself is returned (not a
    copy) with an all-False mask; SparseGPT's dead-input zeroing is skipped in that case.
    The input weight is never modified in place.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (C_out, C_in), got {getattr(weight, 'shape', weight)!r}")
    cols = weight.shape[1]
    if "act_norm" in NEEDS[method]:
        _check_stat("act_sq_norm", act_sq_norm, (cols,), method, weight)
    if "hessian" in NEEDS[method]:
        _check_stat("hessian", hessian, (cols, cols), method, weight)
    nothing = _check_pattern(sparsity, n_keep, m)
    nm = sparsity is None
    if nm and cols % m != 0:
        raise ValueError(f"N:M with m={m} needs the input width to be a multiple of m, got width {cols}")
    if method == "wanda" and options.wanda_variant and nm:
        raise ValueError("the Wanda cumulative-mass variant applies to unstructured sparsity only, not N:M")
    if nothing:
        return weight, torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)

    if method == "sparsegpt":
        new, mask = sparsegpt_prune(
            weight, hessian, sparsity=sparsity, n_keep=n_keep, m=m,
            blocksize=options.blocksize, percdamp=options.percdamp,
        )  # converts to an fp32 copy itself
        return new.to(weight.dtype), mask

    scores = wanda_scores(weight, act_sq_norm) if method == "wanda" else weight.detach().float().abs()
    if nm:
        mask = nm_mask(scores, n_keep, m)
    elif method == "magnitude":
        mask = matrix_mask(scores, sparsity)
    elif options.wanda_variant:  # its own grouping (per row, one alpha per matrix); wanda_group is unused
        mask = wanda_variant_mask(scores, sparsity)
    elif options.wanda_group == "matrix":
        mask = matrix_mask(scores, sparsity)
    else:
        mask = rowwise_mask(scores, sparsity)
    return weight.detach().masked_fill(mask, 0), mask
