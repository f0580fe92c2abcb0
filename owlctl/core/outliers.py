"""Outlier statistics of a decoder block: OWL's Layerwise Outlier Distribution (Yin et al., ICML 2024).

For block l with Linears ℓ, the Wanda score A^ℓ_ij = |W^ℓ_ij| * ||X^ℓ_j||_2 (SPEC 2). With A^l the
concatenation of all A^ℓ of the block and mean Ā^l,
    D_l = 100 * #{a in A^l : a > M * Ā^l} / |A^l|       (strict >, percent)
Counts for several M come from the same scores, so one dense pass serves any later choice of M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MatrixScoreSummary:
    numel: int
    score_sum: float
    max_score: float
    outlier_count: list[int]  # one per M, against the BLOCK mean


@dataclass
class BlockOutliers:
    numel: int
    score_sum: float
    mean_score: float
    outlier_count: list[int]  # one per M
    matrices: list[MatrixScoreSummary]


def block_outliers(scores: list[Tensor], ms: list[float]) -> BlockOutliers:
    """Outlier counts of one block. ``scores``: the block's score matrices (any shapes, float32)."""
    if not scores:
        raise ValueError("a block needs at least one score matrix")
    numels = [int(s.numel()) for s in scores]
    sums = torch.stack([s.double().sum() for s in scores])
    maxes = torch.stack([s.max().double() for s in scores])
    total = int(sum(numels))
    mean = sums.sum() / total
    # The comparison runs in the scores' own precision (float32, as the reference); sums are float64.
    thresholds = (torch.tensor(list(ms), dtype=torch.float64, device=sums.device) * mean).to(scores[0].dtype)
    counts = torch.stack([torch.stack([(s > t).sum() for t in thresholds]) for s in scores])  # (matrices, M)
    counts_l, sums_l, maxes_l = counts.tolist(), sums.tolist(), maxes.tolist()
    mats = [MatrixScoreSummary(n, sm, mx, [int(c) for c in cs]) for n, sm, mx, cs in zip(numels, sums_l, maxes_l, counts_l)]
    block_counts = [int(sum(m.outlier_count[k] for m in mats)) for k in range(len(ms))]
    return BlockOutliers(total, float(sum(sums_l)), float(mean), block_counts, mats)
