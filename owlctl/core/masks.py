"""Pruning masks from importance scores: per row, per matrix, N:M, and the Wanda cumulative-mass variant.

Given a score matrix A of shape (C_out, C_in) (|W| for magnitude, |W_ij| * ||X_j||_2 for Wanda; Sun et al.
2023, "A Simple and Effective Pruning Approach for LLMs", arXiv 2306.11695) a mask prunes the k smallest
scores of a comparison group:

    per row     (Wanda default):   k = floor(C_in * s) smallest of every row A[i, :]
    per matrix  (magnitude):       k = floor(C_out * C_in * s) smallest of A
    N:M         (Mishra et al. 2021, hardware 2:4): in every group of m consecutive columns of a row,
                                   the m - n_keep smallest                      (n_keep = weights KEPT)
    cumulative mass (Wanda appendix variant): per row, the longest ascending prefix whose score mass is
                                   <= alpha * row total, alpha bisected so the matrix sparsity hits s

Conventions shared by every function here:
- masks are bool tensors of the scores' shape; True = PRUNE (zero this weight);
- sparsity s is the FRACTION pruned, in [0, 1);
- ties are broken by position: among equal scores the lower (flat or column) index is pruned first, so every
  result is deterministic and equals a stable ascending sort;
- NaN scores are pruned last (ranked with, or in nm_mask after, +inf); callers should not pass them.
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch
from torch import Tensor

__all__ = ["prune_count", "rowwise_mask", "matrix_mask", "nm_mask", "wanda_variant_mask"]

# A sparsity is treated as exact to this absolute tolerance. Float arithmetic (0.7, or 0.7 - 0.08 from an
# allocator) leaves errors of ~1e-16 that would otherwise turn floor(10 * 0.7) into 6; 1e-12 absorbs them
# while being far below any sparsity difference that matters.
_SPARSITY_TOL = Fraction(1, 10**12)


def _check_sparsity(sparsity: float) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (math.isfinite(s) and 0.0 <= s < 1.0):
        raise ValueError(f"sparsity must be a fraction in [0, 1) (0.7 = 70% pruned), got {sparsity!r}")
    return s


def _check_2d(scores: Tensor, what: str = "scores") -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{what} must be a 2-D tensor (C_out, C_in), got {shape}")


def prune_count(n: int, sparsity: float) -> int:
    """Number of entries to prune out of ``n`` at ``sparsity`` (fraction in [0, 1)): floor(n * s).

    Computed exactly as floor(n * (s + 1e-12)) in rational arithmetic, so float noise in ``s`` cannot lose
    an entry: prune_count(10, 0.7) == 7 and prune_count(100, 0.7 - 0.08) == 62. The result is in [0, n].
    """
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    s = _check_sparsity(sparsity)
    k = math.floor(n * (Fraction(s) + _SPARSITY_TOL))
    return min(k, n)


def _scatter_prefix(order: Tensor, k: int) -> Tensor:
    """Mask (shape of ``order``) with True at the first ``k`` indices of ``order`` along its last dim."""
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    if k > 0:
        mask.scatter_(-1, order[..., :k], True)
    return mask


def _smallest_k(scores: Tensor, k: int) -> Tensor:
    """Mask with True at the k smallest entries along the last dim, ties by lower index (= stable sort).

    Selection instead of a full sort (kthvalue is ~3-4x faster on CPU for LLM-sized rows/matrices):
    everything strictly below the k-th value, then the first entries equal to it until k are taken.
    """
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        # NaN would compare false everywhere; rank it with +inf (kept)
        scores = torch.nan_to_num(scores, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    at_most = scores <= kth
    if bool((at_most.sum(dim=-1) == k).all()):  # no ties straddle the k-th value (the usual case): done
        return at_most
    below = scores < kth
    ties = at_most & ~below
    room = k - below.sum(dim=-1, keepdim=True)
    rank_dtype = torch.int32 if scores.shape[-1] < 2**31 else torch.int64
    return below | (ties & (ties.cumsum(dim=-1, dtype=rank_dtype) <= room))


# Rows selected per pass: kthvalue works on a float copy with int64 indices (12 bytes per score), which for
# LLaMA-7B's down_proj at once is 540 MB beside a 90 MB bf16 weight; in passes of ~4M scores it is ~50 MB.
ROWS_ELEMENTS = 1 << 22


def rowwise_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune the k = prune_count(C_in, sparsity) smallest scores of every row (Wanda's comparison group).

    scores: (C_out, C_in). Returns bool (C_out, C_in), True = prune; every row has exactly k True.
    Ties: lower column index pruned first (stable ascending sort). Rows are selected in passes of about
    ROWS_ELEMENTS scores (rows are independent: the same mask as one pass, with a bounded working set).
    """
    _check_2d(scores)
    k = prune_count(scores.shape[1], sparsity)
    rows, cols = scores.shape
    step = max(1, ROWS_ELEMENTS // max(cols, 1))
    if rows <= step:
        return _smallest_k(scores, k)
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for r in range(0, rows, step):
        mask[r:r + step] = _smallest_k(scores[r:r + step], k)
    return mask


def matrix_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune exactly k = prune_count(C_out * C_in, sparsity) smallest scores over the whole matrix.

    scores: (C_out, C_in). Returns bool (C_out, C_in), True = prune. Ties: lower flat (row-major) index first.
    Deliberate departure from the reference (SPEC 12.10): magnitude/SparseGPT there prune every score
    <= the value at sorted index floor(n*s), i.e. at least floor(n*s) + 1 entries plus all ties; owlctl
    prunes exactly floor(n*s), so realised sparsity never exceeds the target.
    """
    _check_2d(scores)
    k = prune_count(scores.numel(), sparsity)
    return _smallest_k(scores.reshape(-1), k).view(scores.shape)


def nm_mask(scores: Tensor, n_keep: int, m: int) -> Tensor:
    """N:M mask: keep ``n_keep`` of every ``m`` consecutive input columns of each row (hardware notation).

    scores: (C_out, C_in) with C_in % m == 0. In each group [g*m, (g+1)*m) of a row the m - n_keep smallest
    scores are pruned (ties: lower column first). 2:4 = 50% sparsity; n_keep == m prunes nothing, n_keep == 0
    prunes everything. Note: the reference code's "N:M" counts PRUNED weights ("5:8" there is 3:8 here).
    Returns bool (C_out, C_in), True = prune.
    """
    _check_2d(scores)
    n_keep, m = operator.index(n_keep), operator.index(m)
    if m < 1:
        raise ValueError(f"N:M group size m must be >= 1, got {m}")
    if not 0 <= n_keep <= m:
        raise ValueError(f"N:M needs 0 <= n_keep <= m (n_keep = weights kept per group), got {n_keep}:{m}")
    rows, cols = scores.shape
    if cols % m != 0:
        raise ValueError(f"N:M with m={m} needs the input width to be a multiple of m, got width {cols}")
    groups = scores.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)
    return _scatter_prefix(order, m - n_keep).view(rows, cols)


def wanda_variant_mask(
    scores: Tensor,
    sparsity: float,
    *,
    alpha_start: float = 0.4,
    alpha_hi: float = 0.8,
    tol: float = 0.001,
) -> Tensor:
    """Wanda's cumulative-mass variant (SPEC 5.2, ``--use_variant``): row sparsities adapt to the score mass.

    scores: (C_out, C_in), non-negative (Wanda scores). For a given alpha, each row is sorted ascending
    (stable) and its longest prefix whose cumulative sum stays <= alpha * (row total) is pruned. alpha is
    bisected on [0, alpha_hi], starting at alpha_start, until the matrix sparsity is within ``tol`` of
    ``sparsity`` or the alpha bracket is narrower than ``tol``. Returns bool (C_out, C_in), True = prune.

    Departures from the reference, both deliberate:
    - a row in which no entry qualifies prunes nothing (the reference indexes position -1, wraps to the row
      maximum and prunes the whole row);
    - the pruned set is exactly the qualifying prefix in stable sorted order; the reference prunes every entry
      <= the last qualifying value, so values tied with it beyond the prefix are also pruned there.
    Cumulative sums are taken in float64 so the cut does not depend on fp32 accumulation order.
    """
    _check_2d(scores)
    target = _check_sparsity(sparsity)
    for name, v in (("alpha_start", alpha_start), ("alpha_hi", alpha_hi), ("tol", tol)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {v!r}")
    if not (tol > 0 and 0.0 <= alpha_start <= alpha_hi):
        raise ValueError(f"need tol > 0 and 0 <= alpha_start <= alpha_hi, got {tol}, {alpha_start}, {alpha_hi}")
    rows, cols = scores.shape
    numel = rows * cols
    if numel == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)

    order = torch.argsort(scores, dim=1, stable=True)
    cumsum = torch.gather(scores, 1, order).to(torch.float64).cumsum(dim=1)  # (rows, cols), ascending per row
    total = cumsum[:, -1:]

    def pruned_per_row(alpha: float) -> Tensor:
        # cumsum is non-decreasing for non-negative scores, so "#entries with cumsum <= alpha*total"
        # is the length of the qualifying prefix (0 when even the smallest entry exceeds it).
        return torch.searchsorted(cumsum, total * alpha, right=True)

    lo, hi, alpha = 0.0, float(alpha_hi), float(alpha_start)
    counts = pruned_per_row(alpha)
    current = counts.sum().item() / numel  # one sync per bisection step, not per entry
    while abs(current - target) > tol and hi - lo >= tol:
        if current > target:
            hi, alpha = alpha, (alpha + lo) / 2.0
        else:
            lo, alpha = alpha, (alpha + hi) / 2.0
        counts = pruned_per_row(alpha)
        current = counts.sum().item() / numel

    in_prefix = torch.arange(cols, device=scores.device).unsqueeze(0) < counts  # (rows, cols), sorted domain
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, order, in_prefix)
