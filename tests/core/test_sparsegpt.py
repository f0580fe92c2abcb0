"""SparseGPT solver: against a plain column-by-column OBS loop (no lazy batching) and real properties."""

from __future__ import annotations

import math

import pytest
import torch

from owlctl.core.masks import matrix_mask, prune_count
from owlctl.core.sparsegpt import sparsegpt_prune


def make_problem(rows, cols, tokens=512, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix  # correlated inputs: H is far from diagonal
    X = X * (0.5 + torch.rand(cols, generator=g))  # uneven channel scales
    for j in dead:
        X[:, j] = 0.0
    W = torch.randn(rows, cols, generator=g)
    H = (2.0 / tokens) * X.T @ X
    return W, H, X


def naive_obs(W, H, *, sparsity=None, n_keep=None, m=None, blocksize=128, percdamp=0.01):
    """Textbook OBS, one column at a time; every later column is updated immediately (no lazy batches)."""
    W, H = W.clone().float(), H.clone().float()
    rows, cols = W.shape
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    H += percdamp * torch.diag(H).mean() * torch.eye(cols)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        i1 = j - j % blocksize
        i2 = min(i1 + blocksize, cols)
        if sparsity is not None and j == i1:
            e = (W[:, i1:i2] ** 2 / torch.diag(U)[i1:i2] ** 2).reshape(-1).tolist()
            k = math.floor(len(e) * sparsity + 1e-9)
            width = i2 - i1
            for f in sorted(range(len(e)), key=lambda t: (e[t], t))[:k]:
                mask[f // width, i1 + f % width] = True
        if m is not None and (j - i1) % m == 0:
            e = W[:, j : j + m] ** 2 / torch.diag(U)[j : j + m] ** 2
            for r in range(rows):
                er = e[r].tolist()
                for t in sorted(range(m), key=lambda t: (er[t], t))[: m - n_keep]:
                    mask[r, j + t] = True
        w = W[:, j].clone()
        q = torch.where(mask[:, j], torch.zeros_like(w), w)
        err = (w - q) / U[j, j]
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
        W[:, j] = q
    return W, mask


@pytest.mark.parametrize(
    "shape, blocksize, kwargs",
    [
        ((12, 64), 16, {"sparsity": 0.5}),
        ((12, 64), 16, {"sparsity": 0.7}),
        ((7, 72), 16, {"sparsity": 0.6}),  # last block is 8 wide
        ((12, 64), 16, {"n_keep": 2, "m": 4}),
        ((10, 64), 32, {"n_keep": 4, "m": 8}),
        ((9, 40), 128, {"sparsity": 0.5}),  # one block wider than the matrix
    ],
)
def test_matches_naive_column_loop(shape, blocksize, kwargs):
    W, H, _ = make_problem(*shape, seed=shape[1] + blocksize)
    new, mask = sparsegpt_prune(W, H, blocksize=blocksize, **kwargs)
    ref, ref_mask = naive_obs(W, H, blocksize=blocksize, **kwargs)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)
    assert new.dtype == torch.float32 and new.shape == W.shape
    assert torch.all(new[mask] == 0.0)


def test_unstructured_count_per_slice_is_exact():
    W, H, _ = make_problem(11, 72, seed=1)
    s = 0.7
    _, mask = sparsegpt_prune(W, H, sparsity=s, blocksize=16)
    for i1 in range(0, 72, 16):
        block = mask[:, i1 : i1 + 16]
        assert int(block.sum()) == prune_count(block.numel(), s)
    # rows are not forced to the same count (adaptive across rows within a slice)
    assert mask.sum(1).unique().numel() > 1


def test_nm_pattern_and_zeros():
    W, H, _ = make_problem(8, 32, seed=2)
    new, mask = sparsegpt_prune(W, H, n_keep=2, m=4, blocksize=16)
    assert torch.equal(mask.reshape(8, 8, 4).sum(-1), torch.full((8, 8), 2))
    assert torch.equal(new == 0, mask)  # random data: kept weights are non-zero


def test_dead_input_column_is_zeroed():
    W, H, _ = make_problem(6, 32, seed=3, dead=(5, 17))
    assert H[5, 5] == 0 and H[17, 17] == 0
    new, mask = sparsegpt_prune(W, H, sparsity=0.25, blocksize=8)
    assert torch.all(new[:, 5] == 0) and torch.all(new[:, 17] == 0)
    assert int(mask[:, 0:8].sum()) == prune_count(48, 0.25)
    assert torch.isfinite(new).all()


def test_beats_magnitude_and_mask_without_update():
    W, H, X = make_problem(32, 64, tokens=1024, seed=4)
    s = 0.5
    new, mask = sparsegpt_prune(W, H, sparsity=s, blocksize=16)

    def recon(Wp):
        return torch.linalg.norm(X @ (W - Wp).T).item()

    magnitude = W.masked_fill(matrix_mask(W.abs(), s), 0.0)
    same_mask_no_update = W.masked_fill(mask, 0.0)
    assert int(mask.sum()) == int((magnitude == 0).sum())  # same number of zeros
    assert recon(new) < 0.9 * recon(magnitude)
    assert recon(new) < 0.9 * recon(same_mask_no_update)


def test_input_untouched_and_dtype_conversion():
    W, H, _ = make_problem(4, 16, seed=5)
    W16 = W.half()
    before = W16.clone()
    new, mask = sparsegpt_prune(W16, H.double(), sparsity=0.5, blocksize=8)
    assert torch.equal(W16, before)
    assert new.dtype == torch.float32
    assert int(mask.sum()) == 32


def test_nothing_to_prune_keeps_weights():
    W, H, _ = make_problem(4, 16, seed=6)
    for kwargs in ({"sparsity": 0.0}, {"n_keep": 4, "m": 4}):
        new, mask = sparsegpt_prune(W, H, blocksize=8, **kwargs)
        assert not mask.any()
        torch.testing.assert_close(new, W)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({}, "exactly one"),
        ({"sparsity": 0.5, "n_keep": 2, "m": 4}, "exactly one"),
        ({"n_keep": 2}, "exactly one"),
        ({"n_keep": 2, "m": 3}, "width 16"),
        ({"n_keep": 5, "m": 4}, "n_keep"),
        ({"n_keep": 2, "m": 4, "blocksize": 6}, "multiple of m"),
        ({"sparsity": 0.5, "blocksize": 0}, "blocksize"),
        ({"sparsity": 0.5, "percdamp": -1.0}, "percdamp"),
    ],
)
def test_bad_arguments(kwargs, match):
    W, H, _ = make_problem(4, 16, seed=7)
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(W, H, **kwargs)


def test_shape_mismatch_and_not_positive_definite():
    W, H, _ = make_problem(4, 16, seed=8)
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        sparsegpt_prune(W, H[:8, :8], sparsity=0.5)
    with pytest.raises(ValueError, match="2-D"):
        sparsegpt_prune(W[0], H, sparsity=0.5)
    with pytest.raises(ValueError, match="increase percdamp"):
        sparsegpt_prune(W, -torch.eye(16), sparsity=0.5)
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(W, torch.full((16, 16), float("nan")), sparsity=0.5)


def _problem(rows=24, cols=96, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g)
    return torch.randn(rows, cols, generator=g), (2.0 / 4) * (x.t() @ x)


@pytest.mark.parametrize("in_place", [True, False])
def test_overwrite_hessian_gives_the_same_bits_and_leaves_the_default_untouched(monkeypatch, in_place):
    """Both sides of the device check: factors in place (out= the input) or on copies, same result; the
    caller's Hessian is changed only when it asked for that."""
    import owlctl.core.sparsegpt as sg

    w, h = _problem()
    ref_w, ref_m = sparsegpt_prune(w, h.clone(), sparsity=0.5, blocksize=32)  # the check's own choice
    monkeypatch.setitem(sg._IN_PLACE, "cpu", in_place)
    keep = h.clone()
    w1, m1 = sparsegpt_prune(w, h, sparsity=0.5, blocksize=32)
    assert torch.equal(h, keep)  # default: the input is not modified
    h2 = h.clone()
    w2, m2 = sparsegpt_prune(w, h2, sparsity=0.5, blocksize=32, overwrite_hessian=True)
    assert not torch.equal(h2, keep)  # it was used as the work matrix
    for got_w, got_m in ((w1, m1), (w2, m2)):
        assert torch.equal(got_w, ref_w) and torch.equal(got_m, ref_m)


def test_in_place_factor_equals_the_three_step_factor():
    from owlctl.core.sparsegpt import _factor

    _w, h = _problem(cols=200, seed=5)
    h.diagonal().add_(0.01 * h.diagonal().mean())
    out = _factor(h.clone(), False)
    assert torch.equal(_factor(h.clone(), True), out)
    assert torch.allclose(out.t() @ out, torch.linalg.inv(h.double()).float(), rtol=1e-3, atol=1e-5)


def test_consumed_hessian_equals_the_copy():
    from owlctl.core.stats import InputStatistics

    st = InputStatistics(16, act_norm=False, hessian=True)
    st.add(torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(1)), 3)
    copy = st.hessian()
    assert torch.equal(st.hessian(consume=True), copy)
    with pytest.raises(ValueError, match="not collected"):
        st.hessian()
