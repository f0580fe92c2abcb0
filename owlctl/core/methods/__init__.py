"""Pruning methods, one module each, in one registry: a method owns the calibration statistics it needs,
how it prunes one weight matrix, and how many weights that must remove (its comparison group).

    magnitude  (Han et al. 2015):              score |W_ij|,               comparison group = whole matrix
    wanda      (Sun et al. 2023, 2306.11695):  score |W_ij| * ||X_j||_2,   comparison group = each row
    sparsegpt  (Frantar & Alistarh 2023):      OBS saliency W_ij^2 / U_jj^2 (H^-1 = U^T U), plus weight updates

W has shape (C_out, C_in). Adding a method is one module that calls ``register`` and one import line at the
bottom of this file. Importing the registry does not import torch (the CLI checks a method's needs before
any weight is read); each method imports it when it prunes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["PruningMethod", "MethodOptions", "REGISTRY", "METHODS", "NEEDS", "register", "get",
           "prune_weight", "expected_pruned", "wanda_scores"]


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
        if self.wanda_group not in ("row", "matrix"):
            raise ValueError(f"wanda_group must be one of ('row', 'matrix'), got {self.wanda_group!r}")
        if operator.index(self.blocksize) < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp}")


@dataclass(frozen=True)
class PruningMethod:
    """One pruning method.

    needs: calibration statistics ("act_norm" -> act_sq_norm (C_in,), "hessian" -> (C_in, C_in)); empty for
        data-free methods, which are pruned without any calibration forward.
    prune(weight, *, sparsity, n_keep, m, stats, options) -> (new weight, mask True = pruned), with exactly one
        of ``sparsity`` (fraction pruned, unstructured) or ``n_keep``/``m`` (N:M, n_keep KEPT per m) given and
        ``stats`` the statistics in ``needs``; never modifies ``weight``.
    expected_pruned((rows, cols), sparsity, options) -> weights an unstructured target must remove (-1 when
        data-dependent); N:M counts are the same for every method.
    """

    name: str
    needs: frozenset
    prune: Callable[..., Any]
    expected_pruned: Callable[[tuple[int, int], float, MethodOptions], int]


REGISTRY: dict[str, PruningMethod] = {}


def register(method: PruningMethod) -> PruningMethod:
    REGISTRY[method.name] = method
    return method


def get(name: str) -> PruningMethod:
    if name not in REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def expected_pruned(method: str, shape: tuple[int, int], sparsity: float | None, nm: tuple[int, int] | None,
                    options: MethodOptions) -> int:
    """How many weights a matrix of ``shape`` must lose under the method's comparison group."""
    rows, cols = shape
    if nm is not None:
        n_keep, m = nm
        return rows * (cols // m) * (m - n_keep)
    if sparsity is None or sparsity == 0:
        return 0
    return get(method).expected_pruned(shape, sparsity, options)


def _check_stat(name: str, stat: Any, shape: tuple[int, ...], method: str, weight: Any) -> None:
    from torch import Tensor

    if stat is None:
        raise ValueError(f"method {method!r} needs the calibration statistic {name} {shape}; none was given")
    if not isinstance(stat, Tensor) or tuple(stat.shape) != shape:
        raise ValueError(
            f"{name} must have shape {shape} for weight {tuple(weight.shape)}, got {tuple(getattr(stat, 'shape', ()))}"
        )


def _check_pattern(sparsity: Any, n_keep: Any, m: Any) -> bool:
    """Validate "exactly one of sparsity or (n_keep, m)"; return True when the pattern prunes nothing."""
    from owlctl.core.masks import prune_count

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


_STATS = {"act_norm": ("act_sq_norm", lambda cols: (cols,)), "hessian": ("hessian", lambda cols: (cols, cols))}


def prune_weight(method: str, weight: Any, *, sparsity: float | None = None, n_keep: int | None = None,
                 m: int | None = None, act_sq_norm: Any = None, hessian: Any = None,
                 options: MethodOptions = MethodOptions(), overwrite_hessian: bool = False) -> tuple[Any, Any]:
    """Returns (new_weight in weight's dtype, mask True=pruned) for one matrix.

    weight: (C_out, C_in); sparsity: fraction pruned in [0, 1); n_keep/m: N:M with n_keep weights KEPT per
    group of m input columns; act_sq_norm: (C_in,) for wanda; hessian: (C_in, C_in) for sparsegpt.
    When nothing is to be pruned (sparsity 0, or n_keep == m) the input tensor itself is returned (not a
    copy) with an all-False mask; SparseGPT's dead-input zeroing is skipped in that case. Validates: unknown
    method (ValueError listing the registry), missing statistic, exactly one of sparsity or (n_keep, m).
    The input weight is never modified in place; ``hessian`` is, only with ``overwrite_hessian`` (SparseGPT
    then damps and factors it in place instead of on a copy: one C_in x C_in matrix less at the peak).
    """
    import torch
    from torch import Tensor

    impl = get(method)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (C_out, C_in), got {getattr(weight, 'shape', weight)!r}")
    cols = weight.shape[1]
    given = {"act_sq_norm": act_sq_norm, "hessian": hessian}
    stats = {}
    for need in sorted(impl.needs):
        key, shape = _STATS[need]
        _check_stat(key, given[key], shape(cols), method, weight)
        stats[key] = given[key]
    nothing = _check_pattern(sparsity, n_keep, m)
    nm = sparsity is None
    if nm and cols % m != 0:
        raise ValueError(f"N:M with m={m} needs the input width to be a multiple of m, got width {cols}")
    if method == "wanda" and options.wanda_variant and nm:
        raise ValueError("the Wanda cumulative-mass variant applies to unstructured sparsity only, not N:M")
    if nothing:
        return weight, torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    if overwrite_hessian and "hessian" in stats:
        stats["overwrite_hessian"] = True
    return impl.prune(weight, sparsity=sparsity, n_keep=n_keep, m=m, stats=stats, options=options)


def __getattr__(name: str) -> Any:
    if name == "METHODS":
        return tuple(REGISTRY)
    if name == "NEEDS":
        return {k: v.needs for k, v in REGISTRY.items()}
    raise AttributeError(name)


def wanda_scores(weight: Any, act_sq_norm: Any) -> Any:
    from owlctl.core.methods.wanda import scores

    return scores(weight, act_sq_norm)


# The registry: one line per method; the order here is the order in --help.
from owlctl.core.methods import magnitude  # noqa: E402,F401,I001  isort: skip
from owlctl.core.methods import wanda  # noqa: E402,F401  isort: skip
from owlctl.core.methods import sparsegpt  # noqa: E402,F401  isort: skip
