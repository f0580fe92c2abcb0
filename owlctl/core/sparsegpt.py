"""SparseGPT: one-shot pruning by Optimal Brain Surgeon with lazy batch updates (SPEC 5.3).

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv 2301.00774. For a Linear W (C_out, C_in) with inputs X (tokens, C_in), minimise ||W X^T - W' X^T||^2
over W' with the given sparsity. With H = (2/K) sum_k X_k^T X_k (C_in, C_in) and U the upper Cholesky
factor of H^-1 (H^-1 = U^T U), columns are processed left to right; pruning column j of row r costs

    e_rj = W_rj^2 / U_jj^2                      (OBS saliency; smallest pruned)

and the error it leaves is pushed onto the not-yet-processed columns:

    err_r = (W_rj - Q_rj) / U_jj,    W[:, j+1:] -= err ⊗ U[j, j+1:]

Lazy batching applies this inside a block of B columns immediately and to the columns after the block
once, as W[:, i2:] -= Err_block @ U[i1:i2, i2:] (mathematically identical, BLAS-3 instead of rank-1).
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator

import torch
from torch import Tensor

from owlctl.core.masks import matrix_mask, nm_mask, prune_count

__all__ = ["sparsegpt_prune"]


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Disable TF32 matmuls for the duration (SPEC 5.3: all fp32, TF32 off); no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _validate(weight: Tensor, hessian: Tensor, sparsity, n_keep, m, blocksize, percdamp):
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (C_out, C_in), got {getattr(weight, 'shape', weight)!r}")
    cols = weight.shape[1]
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"hessian must have shape (C_in, C_in) = ({cols}, {cols}) for weight {tuple(weight.shape)}, "
            f"got {tuple(getattr(hessian, 'shape', ()))}"
        )
    nm_given = n_keep is not None or m is not None
    if (sparsity is None) == (not nm_given) or (nm_given and (n_keep is None or m is None)):
        raise ValueError("give exactly one of sparsity= or the pair (n_keep=, m=)")
    blocksize = operator.index(blocksize)
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if not (math.isfinite(float(percdamp)) and percdamp >= 0):
        raise ValueError(f"percdamp must be a finite fraction >= 0, got {percdamp!r}")
    if sparsity is not None:
        prune_count(0, sparsity)  # validates the range [0, 1)
        return blocksize
    n_keep, m = operator.index(n_keep), operator.index(m)
    if m < 1 or not 0 <= n_keep <= m:
        raise ValueError(f"N:M needs m >= 1 and 0 <= n_keep <= m (n_keep = weights kept), got {n_keep}:{m}")
    if cols % m != 0:
        raise ValueError(f"N:M with m={m} needs the input width to be a multiple of m, got width {cols}")
    if blocksize % m != 0:
        # N:M groups restart at every block boundary; a group must never straddle two blocks.
        raise ValueError(f"blocksize {blocksize} must be a multiple of m={m} for N:M (e.g. {blocksize // m * m or m})")
    return blocksize


_IN_PLACE: dict[str, bool] = {}


def _factor(h: Tensor, in_place: bool) -> Tensor:
    if not in_place:  # row-major like the in-place result (LAPACK returns column-major; later products
        # on a different layout round differently)
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).contiguous()
    torch.linalg.cholesky(h, out=h)
    torch.cholesky_inverse(h, out=h)
    return torch.linalg.cholesky(h, upper=True, out=h)


def _in_place_ok(device: torch.device) -> bool:
    """Whether this device's factorisations give the same bits in place (out= the input) as on copies:
    checked once per device type on a small matrix; where not, the three factors are separate tensors."""
    if device.type not in _IN_PLACE:
        x = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)).to(device)
        h = x.t() @ x + torch.eye(64, device=device)
        try:
            _IN_PLACE[device.type] = torch.equal(_factor(h.clone(), True), _factor(h.clone(), False))
        except RuntimeError:
            _IN_PLACE[device.type] = False
    return _IN_PLACE[device.type]


def _upper_inverse_factor(hessian: Tensor, percdamp: float) -> Tensor:
    """U with H^-1 = U^T U, upper triangular, after damping H += percdamp * mean(diag H) * I. H is modified
    (and, where the device allows it, overwritten by U: one C_in x C_in matrix at the peak instead of four)."""
    diag = hessian.diagonal()
    diag.add_(percdamp * diag.mean())
    try:
        return _factor(hessian, _in_place_ok(hessian.device))
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"SparseGPT: the Hessian is not positive definite after damping with percdamp={percdamp} "
            f"(too few calibration tokens or degenerate inputs?); increase percdamp (e.g. 0.1). [{exc}]"
        ) from None


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | None = None,
    n_keep: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    overwrite_hessian: bool = False,
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` (C_out, C_in) with SparseGPT given ``hessian`` (C_in, C_in) = (2/K) sum_k X_k^T X_k.

    Exactly one of ``sparsity`` (fraction pruned, [0, 1), unstructured) or ``n_keep``/``m`` (N:M, n_keep
    weights KEPT per group of m columns) must be given. Work is done in float32 on weight's device, TF32 off.

    Steps (SPEC 5.3): dead inputs (H_jj == 0) get H_jj = 1 and W[:, j] = 0; H += percdamp*mean(diag H)*I;
    U = upper Cholesky factor of H^-1; then for each column block [i1, i2) of width ``blocksize``:
    - unstructured: at the block start, e = W_blk^2 / diag(U_blk)^2 over the (C_out, i2-i1) slice and exactly
      prune_count(C_out*(i2-i1), sparsity) smallest are pruned (ties by flat index). This deliberately fixes
      the reference's "<= threshold at index floor(n*s)" which prunes at least one extra entry (SPEC 12.10);
    - N:M: at every column j with (j - i1) % m == 0, each row prunes its m - n_keep smallest e among
      columns j..j+m-1, using the weights as already updated by the columns before j;
    - OBS update column by column inside the block, then W[:, i2:] -= Err_blk @ U[i1:i2, i2:].

    Returns (new_weight float32 (C_out, C_in), mask bool (C_out, C_in), True = pruned). Pruned entries are
    exactly 0.0. Dead-input columns are zero in new_weight even where the mask is False (the mask records
    what the solver chose, so its count per slice is exactly prune_count). Raises ValueError on bad input
    or when H is not positive definite after damping. ``hessian`` is left unchanged unless
    ``overwrite_hessian`` (then it is damped and factored in place when it is float32 on weight's device).
    """
    blocksize = _validate(weight, hessian, sparsity, n_keep, m, blocksize, percdamp)
    device = weight.device
    rows, cols = weight.shape
    W = weight.detach().to(device=device, dtype=torch.float32, copy=True)
    H = hessian.detach().to(device=device, dtype=torch.float32, copy=not overwrite_hessian)
    mask = torch.zeros((rows, cols), dtype=torch.bool, device=device)
    if cols == 0:
        return W, mask
    if not bool(torch.isfinite(H).all()):
        raise ValueError("SparseGPT: the Hessian contains NaN or Inf; check the calibration activations")

    with _ieee_fp32(device):
        dead = H.diagonal() == 0
        H.diagonal()[dead] = 1.0
        W[:, dead] = 0.0
        U = _upper_inverse_factor(H, float(percdamp))
        del H
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            _prune_block(W, U, mask, i1, i2, sparsity, n_keep, m)
    W.masked_fill_(mask, 0.0)
    return W, mask


def _prune_block(W: Tensor, U: Tensor, mask: Tensor, i1: int, i2: int, sparsity, n_keep, m) -> None:
    """Process columns [i1, i2) of W and mask in place: choose the mask, OBS-update the block, propagate."""
    W1 = W[:, i1:i2].clone()  # contiguous working copy of the block (column slices of W are strided)
    U1 = U[i1:i2, i1:i2]
    d = U1.diagonal()
    mask1 = torch.zeros_like(W1, dtype=torch.bool)
    Err1 = torch.empty_like(W1)
    if sparsity is not None:
        mask1 = matrix_mask(W1.square() / d.square(), sparsity)
    for jj in range(i2 - i1):
        if m is not None and jj % m == 0:
            e = W1[:, jj : jj + m].square() / d[jj : jj + m].square()
            mask1[:, jj : jj + m] = nm_mask(e, n_keep, m)
        w = W1[:, jj]
        err = torch.where(mask1[:, jj], w, 0.0) / d[jj]  # (w - q) / U_jj with q = w masked to zero
        W1[:, jj + 1 :].addr_(err, U1[jj, jj + 1 :], alpha=-1.0)  # rank-1 update, no temporary
        w.masked_fill_(mask1[:, jj], 0.0)  # column jj becomes q exactly
        Err1[:, jj] = err
    W[:, i1:i2] = W1
    mask[:, i1:i2] = mask1
    if i2 < W.shape[1]:
        W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
