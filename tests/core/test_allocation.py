"""OWL allocation (SPEC 3, 4): worked examples by hand, then hypothesis properties."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from owlctl.core import allocation as alloc
from owlctl.core.allocation import (
    mixed_nm_keep,
    outlier_ratio_pct,
    owl_sparsities,
    parse_pattern,
    uniform_sparsities,
    weighted_mean,
)


def raw_owl(ratios, target, lam, weights=None):
    """The reference formula written out again, without any clamping."""
    lo, hi = min(ratios), max(ratios)
    z = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    zbar = sum(w * v for w, v in zip(weights, z)) / sum(weights) if weights else sum(z) / len(z)
    return [target - (v - zbar) for v in z]


# ------------------------------------------------------------------------------------------ worked examples
def test_spec_worked_example_unstructured():
    s = owl_sparsities([1.0, 2.0, 3.0], 0.7, 0.08)
    assert s == pytest.approx([0.78, 0.70, 0.62], abs=1e-12)


def test_units_do_not_matter():
    # min-max normalisation is scale free: percent and fractions give the same allocation
    assert owl_sparsities([1, 2, 3], 0.7, 0.08) == pytest.approx(owl_sparsities([0.01, 0.02, 0.03], 0.7, 0.08))


def test_spec_worked_example_mixed_nm():
    # reference "5:8" (5 pruned) with lambda 2 -> N_prune [6, 5, 4] -> owlctl 3:8 keeps [2, 3, 4]
    assert mixed_nm_keep([1.0, 2.0, 3.0], n_keep=3, m=8, lam=2.0) == [2, 3, 4]


def test_special_remap_plus_one_becomes_plus_two():
    assert mixed_nm_keep([1, 2, 3], n_keep=3, m=8, lam=2.0, special=True) == [2, 3, 5]
    # 2:4 base: the +1 block would be 3:4 pruned-one... special makes it dense (reference N_l = 0)
    assert mixed_nm_keep([1, 2, 3], n_keep=2, m=4, lam=2.0, special=True) == [1, 2, 4]
    assert mixed_nm_keep([1, 2, 3], n_keep=2, m=4, lam=2.0, special=False) == [1, 2, 3]


def test_mixed_nm_uses_lambda_not_two_lambda():
    # lambda 1 on three blocks: centred z = [-0.5, 0, 0.5] -> rounds half to even -> all 0
    assert mixed_nm_keep([1, 2, 3], n_keep=4, m=8, lam=1.0) == [4, 4, 4]


def test_mixed_nm_rounds_half_to_even():
    # z = [0, 3], centred [-1.5, 1.5] -> [-2, 2] (banker's rounding as numpy), not [-1, 2] or [-2, 1]
    assert mixed_nm_keep([0.0, 7.0], n_keep=4, m=8, lam=3.0) == [2, 6]


def test_mixed_nm_clamped_to_zero_and_m():
    assert mixed_nm_keep([0, 1, 2], n_keep=1, m=4, lam=8.0) == [0, 1, 4]


def test_constant_ratios_give_uniform():
    assert owl_sparsities([2.5] * 5, 0.6, 0.08) == [0.6] * 5
    assert owl_sparsities([0.0] * 3, 0.5, 0.2, weights=[1, 2, 3]) == [0.5] * 3
    assert mixed_nm_keep([4.0] * 4, n_keep=2, m=4, lam=2.0) == [2, 2, 2, 2]
    assert uniform_sparsities(3, 0.5) == [0.5, 0.5, 0.5]


def test_lambda_zero_is_uniform():
    assert owl_sparsities([1, 5, 2], 0.7, 0.0) == pytest.approx([0.7] * 3, abs=0)


def test_reference_clamp_sets_nonpositive_to_point_zero_one():
    # z = [0, 0, 0.4], mean 0.4/3 -> the last block goes negative; reference replaces it by 0.01
    raw = raw_owl([0, 0, 10], 0.1, 0.2)
    assert raw[2] < 0
    s = owl_sparsities([0, 0, 10], 0.1, 0.2, clamp="reference")
    assert s == pytest.approx([raw[0], raw[1], 0.01], abs=1e-12)
    assert sum(s) / 3 > 0.1  # the mean is not restored


def test_redistribute_shifts_the_others():
    s = owl_sparsities([0, 0, 0, 10], 0.1, 0.2)
    assert s[3] == 0.0
    assert s[:3] == pytest.approx([0.4 / 3] * 3, abs=1e-12)
    assert sum(s) / 4 == pytest.approx(0.1, abs=1e-12)


def test_redistribute_upper_bound():
    s = owl_sparsities([0, 1, 5, 10], 0.95, 0.2, max_sparsity=0.98)
    assert max(s) == 0.98 and sum(s) / 4 == pytest.approx(0.95, abs=1e-12)


def test_none_clamp_raises_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        owl_sparsities([0, 0, 10], 0.1, 0.2, clamp="none")
    assert owl_sparsities([1, 2, 3], 0.7, 0.08, clamp="none") == pytest.approx([0.78, 0.7, 0.62])


def test_reference_clamp_rejects_sparsity_of_one_or_more():
    with pytest.raises(ValueError, match="outside"):
        owl_sparsities([10, 0, 0], 0.9, 0.2, clamp="reference")


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=1.0), "target sparsity"), (dict(target=-0.1), "target sparsity"),
    (dict(target=float("nan")), "target sparsity"), (dict(lam=-0.01), "lambda"),
    (dict(ratios=[]), "empty"), (dict(ratios=[1, -2]), ">= 0"), (dict(clamp="sideways"), "clamp"),
    (dict(target=0.995), "outside"), (dict(weights=[1, 0, 1]), "positive"), (dict(weights=[1, 1]), "weights"),
    (dict(min_sparsity=0.8, max_sparsity=0.5), "min_sparsity"),
])
def test_owl_validation(kwargs, match):
    args = dict(ratios=[1, 2, 3], target=0.7, lam=0.08) | kwargs
    with pytest.raises(ValueError, match=match):
        owl_sparsities(**args)


@pytest.mark.parametrize("n_keep, m, lam", [(5, 4, 1.0), (-1, 4, 1.0), (2, 0, 1.0), (2, 4, -1.0), (True, 4, 1.0)])
def test_mixed_nm_validation(n_keep, m, lam):
    with pytest.raises(ValueError):
        mixed_nm_keep([1, 2], n_keep, m, lam)


def test_parse_pattern():
    assert parse_pattern("3:8") == (3, 8)
    assert parse_pattern(" 2 : 4 ") == (2, 4)
    assert parse_pattern("4:4") == (4, 4)
    for bad, match in [("5:4", r"N must be in \[0, M\]"), ("a:4", "integers"), ("2.5:4", "integers"),
                       ("2:0", "at least 1"), ("24", "N:M"), ("1:2:3", "N:M"), ("-1:4", r"\[0, M\]")]:
        with pytest.raises(ValueError, match=match):
            parse_pattern(bad)
    assert "KEPT" in alloc.NM_HINT


def test_small_helpers():
    assert outlier_ratio_pct(5, 1000) == 0.5
    with pytest.raises(ValueError):
        outlier_ratio_pct(1, 0)
    assert weighted_mean([1.0, 3.0]) == 2.0
    assert weighted_mean([1.0, 3.0], [3, 1]) == 1.5
    with pytest.raises(ValueError):
        weighted_mean([])


def test_core_imports_nothing_from_owlctl_or_torch():
    tree = ast.parse(Path(alloc.__file__).read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"__future__", "math", "typing"}, mods


# ------------------------------------------------------------------------------------------------ properties
ratio_lists = st.lists(st.floats(0.0, 50.0, allow_nan=False), min_size=2, max_size=40)
weight_lists = st.lists(st.integers(1, 10**7), min_size=40, max_size=40)


@settings(max_examples=300)
@given(ratio_lists, st.floats(0.4, 0.6), st.floats(0.0, 0.09))
def test_mean_and_spread_when_no_clamping(ratios, target, lam):
    assume(max(ratios) > min(ratios))
    s = owl_sparsities(ratios, target, lam)
    assert s == pytest.approx(raw_owl(ratios, target, lam), abs=1e-12)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)
    assert max(s) == pytest.approx(s[ratios.index(min(ratios))])
    assert min(s) == pytest.approx(s[ratios.index(max(ratios))])


def test_reference_clamp_is_not_monotone():
    # a pinned quirk: 0.01 replaces s <= 0, so the most-outlier block can end up sparser than a block
    # with fewer outliers whose s was small but positive; redistribute keeps the order
    ratios = [21.0, 35.0, 50.0]
    ref = owl_sparsities(ratios, 0.0, 0.25, clamp="reference")
    assert ref[2] == 0.01 and ref[1] < ref[2]
    red = owl_sparsities(ratios, 0.0, 0.25)
    assert red == [0.0, 0.0, 0.0]


@settings(max_examples=300)
@given(ratio_lists, st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 0.3), st.floats(0.6, 0.99),
       st.booleans(), weight_lists)
def test_monotone_in_outliers(ratios, frac, lam, lo, hi, use_weights, weights):
    target = min(hi, max(lo, lo + frac * (hi - lo)))  # float rounding may step 1 ulp outside
    s = owl_sparsities(ratios, target, lam, weights=weights[:len(ratios)] if use_weights else None,
                       min_sparsity=lo, max_sparsity=hi)
    for i in range(len(s)):
        for j in range(len(s)):
            if ratios[i] > ratios[j]:
                assert s[i] <= s[j] + 1e-12


@settings(max_examples=300)
@given(ratio_lists, st.floats(0.0, 0.3), st.floats(0.6, 0.99), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
       st.booleans(), weight_lists)
def test_redistribute_keeps_mean_and_bounds(ratios, lo, hi, frac, lam, use_weights, weights):
    target = min(hi, max(lo, lo + frac * (hi - lo)))  # float rounding may step 1 ulp outside
    w = weights[:len(ratios)] if use_weights else None
    s = owl_sparsities(ratios, target, lam, weights=w, min_sparsity=lo, max_sparsity=hi)
    assert all(lo <= v <= hi for v in s)
    assert weighted_mean(s, w) == pytest.approx(target, abs=1e-9)
    assert max(s) - min(s) <= 2 * lam + 1e-12


@settings(max_examples=200)
@given(ratio_lists, st.floats(0.4, 0.6), st.floats(0.0, 0.09), weight_lists)
def test_param_balance_preserves_weighted_mean(ratios, target, lam, weights):
    assume(max(ratios) > min(ratios))
    w = weights[:len(ratios)]
    s = owl_sparsities(ratios, target, lam, weights=w)
    assert s == pytest.approx(raw_owl(ratios, target, lam, w), abs=1e-12)
    assert weighted_mean(s, w) == pytest.approx(target, abs=1e-12)


@settings(max_examples=200)
@given(ratio_lists, st.floats(0.01, 0.3), st.floats(0.0, 0.5))
def test_reference_clamp_property(ratios, target, lam):
    assume(max(ratios) > min(ratios))
    raw = raw_owl(ratios, target, lam)
    assume(max(raw) < 1)
    s = owl_sparsities(ratios, target, lam, clamp="reference")
    assert s == pytest.approx([0.01 if v <= 0 else v for v in raw], abs=1e-12)


@settings(max_examples=300)
@given(ratio_lists, st.integers(1, 16), st.data(), st.floats(0.0, 40.0), st.booleans())
def test_mixed_nm_in_range_and_monotone(ratios, m, data, lam, special):
    n_keep = data.draw(st.integers(0, m))
    k = mixed_nm_keep(ratios, n_keep, m, lam, special=special)
    assert all(isinstance(v, int) and 0 <= v <= m for v in k)
    for i in range(len(k)):
        for j in range(len(k)):
            if ratios[i] > ratios[j]:
                assert k[i] >= k[j]
    if max(ratios) == min(ratios) or lam == 0:
        assert k == [n_keep] * len(ratios)


@given(st.lists(st.floats(0.0, 50.0), min_size=2, max_size=30).filter(lambda r: max(r) > min(r)),
       st.floats(0.1, 6.0))
def test_mixed_nm_matches_reference_rounding(ratios, lam):
    lo, hi = min(ratios), max(ratios)
    z = [(r - lo) / (hi - lo) * lam for r in ratios]
    zbar = math.fsum(z) / len(z)
    n_prune_ref = [5 - round(v - zbar) for v in z]  # reference "5:8": N_l = N - a_l (pruned)
    expect = [min(8, max(0, 8 - n)) for n in n_prune_ref]
    assert mixed_nm_keep(ratios, 3, 8, lam) == expect
