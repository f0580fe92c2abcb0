"""Per-block sparsity from the Layerwise Outlier Distribution: OWL (Yin et al., ICML 2024, arXiv 2310.05175).

Unstructured (SPEC 3). With D_l the outlier ratio of block l in percent, S the target sparsity and lambda
the range knob:
    z_l = (D_l - min D) / (max D - min D) * 2*lambda        (min-max to [0, 2*lambda])
    s_l = S - (z_l - mean(z))                                (more outliers -> denser block)
The mean is unweighted in the reference; ``weights`` (parameter counts, ``--balance params``) makes it the
parameter-weighted mean, so the global fraction of pruned weights is S on heterogeneous blocks too.
Then one of three clamping policies:
    "redistribute"  s_l = clip(s_l + t, min, max) with the single shift t that restores the mean S
                    (blocks inside the range all move by t, so order and spread <= 2*lambda are kept);
    "reference"     s_l <= 0 -> 0.01, no upper clip, mean not restored (parity with wanda_owl);
    "none"          no clamping; a value outside [0, 1) is an error.

Mixed N:M (SPEC 4), written with n_keep = weights KEPT per group of m (the reference's N is m - n_keep):
    z_l      = (D_l - min D) / (max D - min D) * lambda      (lambda, not 2*lambda: units of one N step)
    a_l      = round_half_even(z_l - mean(z));  special: a_l == 1 -> 2
    n_keep_l = clamp(n_keep + a_l, 0, m)                      (more outliers -> more weights kept)

Constant D (max D == min D) gives the uniform allocation. Pure stdlib floats; no owlctl imports.
"""

from __future__ import annotations

import math
from typing import Sequence

CLAMP_POLICIES = ("redistribute", "reference", "none")
REFERENCE_FLOOR = 0.01  # the reference's replacement for s_l <= 0 (wanda_owl, sparsegpt_owl)
NM_HINT = "N:M means N weights KEPT per group of M consecutive inputs (2:4 = 50%); the reference's '5:8' is 3:8 here"


def outlier_ratio_pct(count: int, numel: int) -> float:
    """D_l in percent: 100 * count / numel."""
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    return 100.0 * count / numel


def weighted_mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Plain mean, or sum(w*v)/sum(w) when ``weights`` are given."""
    if not values:
        raise ValueError("mean of an empty sequence")
    if weights is None:
        return math.fsum(values) / len(values)
    if len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return math.fsum(w * v for w, v in zip(weights, values)) / total


def uniform_sparsities(num_blocks: int, target: float) -> list[float]:
    """The baseline: every block gets S."""
    _check_target(target)
    if num_blocks < 1:
        raise ValueError(f"need at least one block, got {num_blocks}")
    return [float(target)] * num_blocks


def owl_sparsities(
    ratios: Sequence[float],
    target: float,
    lam: float,
    weights: Sequence[float] | None = None,
    clamp: str = "redistribute",
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
) -> list[float]:
    """Per-block sparsity s_l (fractions) from outlier ratios D_l (percent, any scale). See module docstring."""
    _check_target(target)
    _check_lam(lam)
    ratios = _check_ratios(ratios)
    if weights is not None:
        if len(weights) != len(ratios):
            raise ValueError(f"{len(ratios)} ratios but {len(weights)} weights")
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError("weights (parameter counts) must be positive")
    if clamp not in CLAMP_POLICIES:
        raise ValueError(f"unknown clamp policy {clamp!r}; choose one of {', '.join(CLAMP_POLICIES)}")
    if clamp == "redistribute":
        if not 0.0 <= min_sparsity <= max_sparsity < 1.0:
            raise ValueError(f"need 0 <= min_sparsity <= max_sparsity < 1, got [{min_sparsity}, {max_sparsity}]")
        if not min_sparsity <= target <= max_sparsity:
            raise ValueError(f"target sparsity {target} is outside [{min_sparsity}, {max_sparsity}]")

    z = _normalised(ratios, 2.0 * lam)
    if z is None:
        return [float(target)] * len(ratios)
    z_mean = weighted_mean(z, weights)
    s = [target - (zl - z_mean) for zl in z]

    if clamp == "reference":
        s = [REFERENCE_FLOOR if v <= 0 else v for v in s]
        _check_valid_fractions(s, "(the reference clamp has no upper bound)")
        return s
    if clamp == "none":
        _check_valid_fractions(s, "")
        return s
    if all(min_sparsity <= v <= max_sparsity for v in s):
        return s  # nothing to clamp: exactly the reference formula
    return _shift_to_mean(s, weights or [1.0] * len(s), target, min_sparsity, max_sparsity)


def mixed_nm_keep(ratios: Sequence[float], n_keep: int, m: int, lam: float, special: bool = False) -> list[int]:
    """Weights kept per group of m for each block (mixed N:M, SPEC 4). See module docstring."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"M must be an integer >= 1, got {m!r}")
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 0 <= n_keep <= m:
        raise ValueError(f"N must be an integer in [0, {m}], got {n_keep!r}")
    _check_lam(lam)
    ratios = _check_ratios(ratios)
    z = _normalised(ratios, lam)
    if z is None:
        return [n_keep] * len(ratios)
    z_mean = weighted_mean(z)
    steps = [round(zl - z_mean) for zl in z]  # Python's round() is round-half-to-even, as numpy's
    if special:
        steps = [2 if a == 1 else a for a in steps]
    return [min(m, max(0, n_keep + a)) for a in steps]


def parse_pattern(text: str) -> tuple[int, int]:
    """"3:8" -> (n_keep=3, m=8). Raises ValueError with a readable message (see NM_HINT)."""
    parts = str(text).strip().split(":")
    if len(parts) != 2:
        raise ValueError(f"pattern {text!r} is not of the form N:M")
    try:
        n_keep, m = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"pattern {text!r}: N and M must be integers") from None
    if m < 1:
        raise ValueError(f"pattern {text!r}: M must be at least 1")
    if not 0 <= n_keep <= m:
        raise ValueError(f"pattern {text!r}: N must be in [0, M] (N is the number of weights kept)")
    return n_keep, m


# --- helpers -------------------------------------------------------------------------------------------

def _check_target(target: float) -> None:
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0.0 <= target < 1.0):
        raise ValueError(f"target sparsity must be a fraction in [0, 1), got {target!r}")


def _check_lam(lam: float) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"lambda must be >= 0, got {lam!r}")


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    out = [float(r) for r in ratios]
    if not out:
        raise ValueError("no blocks: the outlier ratio list is empty")
    if any(not math.isfinite(r) or r < 0 for r in out):
        raise ValueError("outlier ratios must be finite and >= 0")
    return out


def _normalised(ratios: list[float], span: float) -> list[float] | None:
    """Min-max normalise to [0, span]; None when all ratios are equal (no division by zero)."""
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return None
    return [(r - lo) / (hi - lo) * span for r in ratios]


def _check_valid_fractions(s: list[float], why: str) -> None:
    bad = [i for i, v in enumerate(s) if not 0.0 <= v < 1.0]
    if bad:
        i = bad[0]
        raise ValueError(f"block {i} gets sparsity {s[i]:.4f}, outside [0, 1) {why}".rstrip()
                         + "; lower lambda or use clamp 'redistribute'")


def _shift_to_mean(base: list[float], w: Sequence[float], target: float, lo: float, hi: float) -> list[float]:
    """clip(base_l + t, lo, hi) with the t whose weighted mean is ``target`` (lo <= target <= hi).

    The mean is piecewise linear and non-decreasing in t with breakpoints where a block hits a bound;
    find the segment that brackets the target and solve the linear equation on it exactly.
    """
    total = math.fsum(w)

    def mean_at(t: float) -> float:
        return math.fsum(wi * min(hi, max(lo, b + t)) for wi, b in zip(w, base)) / total

    points = sorted({lo - b for b in base} | {hi - b for b in base})
    t = points[-1]
    for a, b in zip(points, points[1:]):
        if mean_at(b) >= target:
            mid = 0.5 * (a + b)
            free = [lo < v + mid < hi for v in base]
            w_free = math.fsum(wi for wi, f in zip(w, free) if f)
            if w_free == 0.0:
                t = b
                break
            fixed = math.fsum(wi * (lo if v + mid <= lo else hi) for wi, v, f in zip(w, base, free) if not f)
            moving = math.fsum(wi * v for wi, v, f in zip(w, base, free) if f)
            t = (target * total - fixed - moving) / w_free
            t = min(b, max(a, t))
            break
    return [min(hi, max(lo, v + t)) for v in base]
