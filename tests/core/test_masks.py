"""Masks: literal hand-computed cases, and naive Python loops checked bit for bit against the vectorised code."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from owlctl.core.masks import matrix_mask, nm_mask, prune_count, rowwise_mask, wanda_variant_mask

T, F = True, False


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- naive loops
def _order(values):
    return sorted(range(len(values)), key=lambda j: (values[j], j))


def naive_rowwise(scores, sparsity):
    rows = scores.tolist()
    out = []
    for row in rows:
        k = math.floor(len(row) * sparsity + 1e-9)
        pruned = set(_order(row)[:k])
        out.append([j in pruned for j in range(len(row))])
    return torch.tensor(out, dtype=torch.bool).reshape(scores.shape)


def naive_matrix(scores, sparsity):
    flat = scores.reshape(-1).tolist()
    k = math.floor(len(flat) * sparsity + 1e-9)
    pruned = set(_order(flat)[:k])
    return torch.tensor([i in pruned for i in range(len(flat))], dtype=torch.bool).reshape(scores.shape)


def naive_nm(scores, n_keep, m):
    out = []
    for row in scores.tolist():
        mrow = [False] * len(row)
        for g in range(0, len(row), m):
            for j in _order(row[g : g + m])[: m - n_keep]:
                mrow[g + j] = True
        out.append(mrow)
    return torch.tensor(out, dtype=torch.bool).reshape(scores.shape)


def naive_variant(scores, sparsity, alpha_start=0.4, alpha_hi=0.8, tol=0.001):
    rows = scores.tolist()
    numel = scores.numel()

    def masks_for(alpha):
        out, total_pruned = [], 0
        for row in rows:
            order = _order(row)
            total = sum(row[j] for j in order)
            acc, pruned = 0.0, set()
            for j in order:
                acc += row[j]
                if acc <= alpha * total:
                    pruned.add(j)
                else:
                    break
            total_pruned += len(pruned)
            out.append([j in pruned for j in range(len(row))])
        return out, total_pruned / numel

    lo, hi, alpha = 0.0, alpha_hi, alpha_start
    out, cur = masks_for(alpha)
    while abs(cur - sparsity) > tol and hi - lo >= tol:
        if cur > sparsity:
            hi, alpha = alpha, (alpha + lo) / 2
        else:
            lo, alpha = alpha, (alpha + hi) / 2
        out, cur = masks_for(alpha)
    return torch.tensor(out, dtype=torch.bool).reshape(scores.shape)


# ---------------------------------------------------------------------------------------------- prune_count
@pytest.mark.parametrize(
    "n, s, k",
    [(10, 0.7, 7), (10, 0.0, 0), (4, 0.99, 3), (100, 0.7 - 0.08, 62), (100, 0.29, 29), (3, 0.5, 1),
     (4096, 0.7, 2867), (0, 0.5, 0), (1, 0.999999, 0), (10**9, 0.7, 700_000_000)],
)
def test_prune_count_literal(n, s, k):
    assert prune_count(n, s) == k


def test_prune_count_float_noise_never_loses_an_entry():
    for n in range(1, 200):
        for pct in range(0, 100):
            assert prune_count(n, pct / 100) == (n * pct) // 100


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "x"])
def test_prune_count_rejects_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        prune_count(10, bad)


def test_prune_count_rejects_negative_n():
    with pytest.raises(ValueError):
        prune_count(-1, 0.5)


# ---------------------------------------------------------------------------------------------- literals
def test_rowwise_literal_with_ties():
    s = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 5.0, 0.0, 0.0]])
    # 50% of 4 columns -> 2 per row; row 1 has three zeros: columns 0 and 2 (lower index first).
    assert torch.equal(rowwise_mask(s, 0.5), B([[F, T, T, F], [T, F, T, F]]))
    # 25% -> 1 per row; the tie at the minimum goes to the lower column.
    assert torch.equal(rowwise_mask(s, 0.25), B([[F, T, F, F], [T, F, F, F]]))
    assert torch.equal(rowwise_mask(s, 0.0), B([[F, F, F, F], [F, F, F, F]]))
    # 0.99 of 4 columns -> 3 per row, never all 4.
    assert torch.equal(rowwise_mask(s, 0.99), B([[F, T, T, T], [T, F, T, T]]))


def test_matrix_literal_with_ties():
    s = torch.tensor([[3.0, 1.0, 1.0, 2.0], [0.0, 5.0, 1.0, 0.0]])
    # 8 entries, 50% -> exactly 4: the zeros (flat 4, 7), then the 1s at flat 1 and 2 (flat 6 tied, later).
    assert torch.equal(matrix_mask(s, 0.5), B([[F, T, T, F], [T, F, F, T]]))
    # 3/8: two zeros + the first 1 by flat index.
    assert torch.equal(matrix_mask(s, 0.375), B([[F, T, F, F], [T, F, F, T]]))
    assert not matrix_mask(s, 0.0).any()
    # floor(8 * 0.99) = 7: everything but the 5.
    assert torch.equal(matrix_mask(s, 0.99), B([[T, T, T, T], [T, F, T, T]]))


def test_matrix_prunes_exactly_k_even_with_all_ties():
    s = torch.ones(3, 5)
    mask = matrix_mask(s, 0.7)  # floor(15 * 0.7) = 10, the first 10 flat positions
    assert int(mask.sum()) == 10
    assert torch.equal(mask.reshape(-1), torch.arange(15) < 10)


def test_nm_literal_2_4_1_4_4_8():
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 0.0, 9.0], [0.5, 0.5, 0.5, 0.5, 8.0, 7.0, 6.0, 5.0]])
    assert torch.equal(
        nm_mask(s, 2, 4), B([[F, F, T, T, T, F, T, F], [T, T, F, F, F, F, T, T]])
    )
    assert torch.equal(
        nm_mask(s, 1, 4), B([[F, T, T, T, T, T, T, F], [T, T, T, F, F, T, T, T]])
    )
    # 4:8 = one group per row, 4 smallest pruned; ties (1.0 x3 in row 0) by lower column.
    assert torch.equal(
        nm_mask(s, 4, 8), B([[F, F, F, T, T, T, T, F], [T, T, T, T, F, F, F, F]])
    )


def test_nm_edge_counts():
    s = torch.randn(3, 8)
    assert not nm_mask(s, 4, 4).any()
    assert nm_mask(s, 0, 4).all()
    assert torch.equal(nm_mask(s, 2, 4).reshape(3, 2, 4).sum(-1), torch.full((3, 2), 2))


def test_nm_errors():
    s = torch.randn(2, 6)
    with pytest.raises(ValueError, match="width 6") as e:
        nm_mask(s, 2, 4)
    assert "m=4" in str(e.value)
    with pytest.raises(ValueError):
        nm_mask(s, 5, 3)
    with pytest.raises(ValueError):
        nm_mask(s, -1, 3)
    with pytest.raises(ValueError):
        nm_mask(s, 0, 0)
    with pytest.raises(ValueError, match="2-D"):
        nm_mask(torch.randn(8), 2, 4)


def test_masks_reject_non_2d():
    for fn in (rowwise_mask, matrix_mask, wanda_variant_mask):
        with pytest.raises(ValueError, match="2-D"):
            fn(torch.randn(2, 3, 4), 0.5)


# ---------------------------------------------------------------------------------------------- vs naive loops
shapes = st.tuples(st.integers(1, 9), st.integers(1, 24))
sparsities = st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.62, 0.7, 0.75, 0.9, 0.99])
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _scores(draw_seed, shape, ties):
    g = torch.Generator().manual_seed(draw_seed)
    if ties:  # integer-valued: many exact ties
        return torch.randint(0, 4, shape, generator=g).float()
    return torch.rand(shape, generator=g)


@fast
@given(shape=shapes, s=sparsities, seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_rowwise_matches_naive(shape, s, seed, ties):
    x = _scores(seed, shape, ties)
    mask = rowwise_mask(x, s)
    assert torch.equal(mask, naive_rowwise(x, s))
    assert torch.equal(mask.sum(1), torch.full((shape[0],), prune_count(shape[1], s)))


@fast
@given(shape=shapes, s=sparsities, seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_matrix_matches_naive(shape, s, seed, ties):
    x = _scores(seed, shape, ties)
    mask = matrix_mask(x, s)
    assert torch.equal(mask, naive_matrix(x, s))
    assert int(mask.sum()) == prune_count(x.numel(), s)


@fast
@given(
    rows=st.integers(1, 6), groups=st.integers(1, 5), nm=st.sampled_from([(2, 4), (1, 4), (3, 4), (4, 8), (3, 8), (0, 2), (2, 2), (1, 3)]),
    seed=st.integers(0, 2**31 - 1), ties=st.booleans(),
)
def test_nm_matches_naive(rows, groups, nm, seed, ties):
    n_keep, m = nm
    x = _scores(seed, (rows, groups * m), ties)
    assert torch.equal(nm_mask(x, n_keep, m), naive_nm(x, n_keep, m))


@pytest.mark.parametrize("shape", [(8, 64), (16, 128), (5, 33)])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_rowwise_matrix_nm_larger_random(shape, s):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    assert torch.equal(rowwise_mask(x, s), naive_rowwise(x, s))
    assert torch.equal(matrix_mask(x, s), naive_matrix(x, s))
    if shape[1] % 4 == 0:
        assert torch.equal(nm_mask(x, 2, 4), naive_nm(x, 2, 4))


# ---------------------------------------------------------------------------------------------- Wanda variant
@pytest.mark.parametrize("target", [0.3, 0.5, 0.6, 0.7, 0.8])
def test_variant_hits_target_within_tol(target):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(64, 512, generator=g) * torch.rand(1, 512, generator=g) * 3  # Wanda-like, column scales
    mask = wanda_variant_mask(x, target)
    assert abs(mask.float().mean().item() - target) <= 0.001
    assert mask.sum(1).unique().numel() > 1  # rows get different sparsities (not the per-row rule)


@pytest.mark.parametrize("seed", range(4))
def test_variant_matches_naive_integer_scores(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (6, 20), generator=g).float()  # exact sums: no float-order ambiguity
    for target in (0.2, 0.5, 0.7):
        assert torch.equal(wanda_variant_mask(x, target), naive_variant(x, target))


def test_variant_prunes_a_prefix_per_row():
    x = torch.rand(16, 40, generator=torch.Generator().manual_seed(3))
    mask = wanda_variant_mask(x, 0.5)
    for r in range(16):
        kept_min = x[r][~mask[r]].min() if (~mask[r]).any() else math.inf
        pruned_max = x[r][mask[r]].max() if mask[r].any() else -math.inf
        assert pruned_max <= kept_min


def test_variant_row_with_nothing_qualifying_is_not_wiped():
    # Row 0 is flat: its smallest entry alone is 1/8 of the row mass. Other rows are very skewed, so the
    # bisection settles at an alpha < 1/8 where nothing in row 0 qualifies. The reference wipes such a row.
    skew = torch.tensor([0.001] * 6 + [10.0, 10.0])
    x = torch.stack([torch.ones(8)] + [skew] * 7)
    mask = wanda_variant_mask(x, 0.6)
    assert not mask[0].any()
    assert torch.equal(mask[1:], torch.tensor([[True] * 6 + [False, False]] * 7))


def test_variant_edge_and_errors():
    assert not wanda_variant_mask(torch.zeros(0, 4), 0.5).any()
    with pytest.raises(ValueError):
        wanda_variant_mask(torch.rand(2, 4), 1.0)
    with pytest.raises(ValueError):
        wanda_variant_mask(torch.rand(2, 4), 0.5, tol=0.0)
    with pytest.raises(ValueError):
        wanda_variant_mask(torch.rand(2, 4), 0.5, alpha_start=0.9, alpha_hi=0.8)


def test_variant_boundary_is_inclusive():
    # alpha pinned at 0.25 (alpha_start == alpha_hi): threshold 0.25 * 8 = 2; cumsum [1, 2, 4, 8] -> the
    # entry whose cumsum equals the threshold is pruned too (cumsum <= alpha * rowsum).
    x = torch.tensor([[1.0, 1.0, 2.0, 4.0], [4.0, 2.0, 1.0, 1.0]])
    mask = wanda_variant_mask(x, 0.5, alpha_start=0.25, alpha_hi=0.25)
    assert torch.equal(mask, B([[T, T, F, F], [F, F, T, T]]))


def test_nan_and_inf_scores_are_pruned_last_with_exact_counts():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, 1.0, inf, 0.0], [2.0, nan, nan, -inf]])
    assert torch.equal(rowwise_mask(x, 0.5), B([[F, T, F, T], [T, F, F, T]]))
    assert int(rowwise_mask(x, 0.75).sum()) == 6
    assert torch.equal(matrix_mask(x, 0.5), B([[F, T, F, T], [T, F, F, T]]))
    assert torch.equal(nm_mask(x, 1, 4), B([[F, T, T, T], [T, T, F, T]]))


def test_integer_scores_accepted():
    x = torch.tensor([[3, 1, 1, 2], [0, 5, 0, 0]])
    assert torch.equal(rowwise_mask(x, 0.5), B([[F, T, T, F], [T, F, T, F]]))
    assert torch.equal(matrix_mask(x, 0.5), B([[F, T, F, F], [T, F, T, T]]))


@pytest.mark.parametrize("elements", [1, 7, 64, 10**9])
def test_rowwise_mask_in_passes_equals_one_pass(monkeypatch, elements):
    """Rows selected a few at a time (a bounded working set) give exactly the one-pass mask, ties and NaN
    included; ``elements`` below one row still takes one row per pass."""
    import owlctl.core.masks as masks

    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 5, (37, 16), generator=g).float()  # many ties
    s[3, 2] = float("nan")
    ref = masks._smallest_k(s, masks.prune_count(16, 0.6))
    monkeypatch.setattr(masks, "ROWS_ELEMENTS", elements)
    got = masks.rowwise_mask(s, 0.6)
    assert torch.equal(got, ref) and bool((got.sum(dim=1) == masks.prune_count(16, 0.6)).all())
