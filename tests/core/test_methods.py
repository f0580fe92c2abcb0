"""prune_weight: dispatch, dtype handling, the nothing-to-prune path and input validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from owlctl.core.masks import matrix_mask, nm_mask, rowwise_mask, wanda_variant_mask
from owlctl.core.methods import METHODS, NEEDS, MethodOptions, prune_weight, wanda_scores
from owlctl.core.sparsegpt import sparsegpt_prune

T, F = True, False


def problem(rows=8, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(256, cols, generator=g) * (0.2 + 3 * torch.rand(cols, generator=g))
    act_sq_norm = (X**2).sum(0) / 4  # as if 4 samples of 64 tokens
    H = 2.0 / 256 * X.T @ X
    return W, act_sq_norm, H


def stats(method, act, H):
    return {"magnitude": {}, "wanda": {"act_sq_norm": act}, "sparsegpt": {"hessian": H}}[method]


def test_registry_constants():
    assert METHODS == ("magnitude", "wanda", "sparsegpt")
    assert set(NEEDS) == set(METHODS)
    assert NEEDS["wanda"] == {"act_norm"} and NEEDS["sparsegpt"] == {"hessian"} and not NEEDS["magnitude"]


def test_wanda_scores_literal():
    W = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-1.0, 0.0, 0.5, -8.0]], dtype=torch.float16)
    act = torch.tensor([4.0, 1.0, 1.0, 0.25])
    s = wanda_scores(W, act)
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.tensor([[2.0, 2.0, 3.0, 2.0], [2.0, 0.0, 0.5, 4.0]]))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        wanda_scores(W, act[:3])


def test_wanda_row_literal():
    W = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-1.0, 0.0, 0.5, -8.0]])
    act = torch.tensor([4.0, 1.0, 1.0, 0.25])  # scores [[2,2,3,2],[2,0,.5,4]]
    new, mask = prune_weight("wanda", W, sparsity=0.5, act_sq_norm=act)
    assert torch.equal(mask, torch.tensor([[T, T, F, F], [F, T, T, F]]))  # ties -> lower columns
    assert torch.equal(new, torch.tensor([[0.0, 0.0, 3.0, 4.0], [-1.0, 0.0, 0.0, -8.0]]))
    # per-matrix group: the 4 smallest of the matrix (0, .5, then the first two 2s by flat index)
    _, mmask = prune_weight("wanda", W, sparsity=0.5, act_sq_norm=act, options=MethodOptions(wanda_group="matrix"))
    assert torch.equal(mmask, torch.tensor([[T, T, F, F], [F, T, T, F]]))
    # at 25% the groups differ: the matrix rule takes both of row 1's small scores, the row rule one per row
    _, mmask = prune_weight("wanda", W, sparsity=0.25, act_sq_norm=act, options=MethodOptions(wanda_group="matrix"))
    assert torch.equal(mmask, torch.tensor([[F, F, F, F], [F, T, T, F]]))
    _, rmask = prune_weight("wanda", W, sparsity=0.25, act_sq_norm=act)
    assert torch.equal(rmask, torch.tensor([[T, F, F, F], [F, T, F, F]]))


def test_magnitude_literal():
    W = torch.tensor([[0.1, -5.0, 0.2, 3.0], [-0.3, 0.05, 4.0, -0.2]])
    new, mask = prune_weight("magnitude", W, sparsity=0.5)
    assert torch.equal(mask, torch.tensor([[T, F, T, F], [F, T, F, T]]))
    assert torch.equal(new, torch.tensor([[0.0, -5.0, 0.0, 3.0], [-0.3, 0.0, 4.0, 0.0]]))


def test_dispatch_matches_building_blocks():
    W, act, H = problem()
    scores = wanda_scores(W, act)
    cases = [
        ("magnitude", {"sparsity": 0.6}, MethodOptions(), matrix_mask(W.abs(), 0.6)),
        ("magnitude", {"n_keep": 2, "m": 4}, MethodOptions(), nm_mask(W.abs(), 2, 4)),
        ("wanda", {"sparsity": 0.6}, MethodOptions(), rowwise_mask(scores, 0.6)),
        ("wanda", {"sparsity": 0.6}, MethodOptions(wanda_group="matrix"), matrix_mask(scores, 0.6)),
        ("wanda", {"sparsity": 0.6}, MethodOptions(wanda_variant=True), wanda_variant_mask(scores, 0.6)),
        ("wanda", {"n_keep": 3, "m": 8}, MethodOptions(), nm_mask(scores, 3, 8)),
    ]
    for method, pattern, options, expected in cases:
        new, mask = prune_weight(method, W, options=options, **pattern, **stats(method, act, H))
        assert torch.equal(mask, expected), (method, pattern, options)
        assert torch.equal(new, W.masked_fill(expected, 0.0))
    # the row rule and the matrix rule really differ on this data (so the option is exercised)
    assert not torch.equal(rowwise_mask(scores, 0.6), matrix_mask(scores, 0.6))


def test_sparsegpt_dispatch_and_options():
    W, act, H = problem(cols=64)
    opts = MethodOptions(blocksize=16, percdamp=0.05)
    for pattern in ({"sparsity": 0.5}, {"n_keep": 2, "m": 4}):
        new, mask = prune_weight("sparsegpt", W, hessian=H, options=opts, **pattern)
        ref, ref_mask = sparsegpt_prune(W, H, blocksize=16, percdamp=0.05, **pattern)
        assert torch.equal(mask, ref_mask) and torch.equal(new, ref)
    # the options reach the solver: a different blocksize gives a different result
    other, _ = prune_weight("sparsegpt", W, hessian=H, sparsity=0.5, options=MethodOptions(blocksize=64))
    assert not torch.equal(other, prune_weight("sparsegpt", W, hessian=H, sparsity=0.5, options=opts)[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_preserved_and_input_untouched(method, dtype):
    W, act, H = problem(cols=32)
    W = W.to(dtype)
    before = W.clone()
    for pattern in ({"sparsity": 0.5}, {"n_keep": 2, "m": 4}):
        new, mask = prune_weight(method, W, **pattern, **stats(method, act, H))
        assert new.dtype == dtype and new.shape == W.shape
        assert mask.dtype == torch.bool and int(mask.sum()) == W.numel() // 2
        assert torch.all(new[mask] == 0)
        assert torch.equal(W, before)
        if method != "sparsegpt":
            assert torch.equal(new[~mask], W[~mask])  # no weight update


@pytest.mark.parametrize("method", METHODS)
def test_nothing_to_prune_returns_weight(method):
    W, act, H = problem()
    for pattern in ({"sparsity": 0.0}, {"n_keep": 4, "m": 4}):
        new, mask = prune_weight(method, W, **pattern, **stats(method, act, H))
        assert new is W
        assert mask.shape == W.shape and mask.dtype == torch.bool and not mask.any()


def test_nm_zero_keep_prunes_all():
    W, act, _ = problem()
    new, mask = prune_weight("wanda", W, n_keep=0, m=4, act_sq_norm=act)
    assert mask.all() and torch.all(new == 0)


def test_errors():
    W, act, H = problem()
    with pytest.raises(ValueError, match="magnitude, wanda, sparsegpt"):
        prune_weight("owl", W, sparsity=0.5)
    with pytest.raises(ValueError, match="act_sq_norm"):
        prune_weight("wanda", W, sparsity=0.5)
    with pytest.raises(ValueError, match="hessian"):
        prune_weight("sparsegpt", W, sparsity=0.5, act_sq_norm=act)
    with pytest.raises(ValueError, match="act_sq_norm"):
        prune_weight("wanda", W, sparsity=0.0, act_sq_norm=act[:-1])  # checked even when nothing is pruned
    with pytest.raises(ValueError, match="hessian"):
        prune_weight("sparsegpt", W, sparsity=0.5, hessian=H[:4, :4])
    with pytest.raises(ValueError, match="not both"):
        prune_weight("magnitude", W, sparsity=0.5, n_keep=2, m=4)
    with pytest.raises(ValueError, match="give sparsity"):
        prune_weight("magnitude", W)
    with pytest.raises(ValueError, match="both n_keep and m"):
        prune_weight("magnitude", W, m=4)
    with pytest.raises(ValueError, match="width 32"):
        prune_weight("magnitude", W, n_keep=2, m=6)
    with pytest.raises(ValueError, match="n_keep"):
        prune_weight("magnitude", W, n_keep=5, m=4)
    with pytest.raises(ValueError, match="sparsity"):
        prune_weight("magnitude", W, sparsity=1.0)
    with pytest.raises(ValueError, match="unstructured"):
        prune_weight("wanda", W, n_keep=2, m=4, act_sq_norm=act, options=MethodOptions(wanda_variant=True))
    with pytest.raises(ValueError, match="2-D"):
        prune_weight("magnitude", W[0], sparsity=0.5)


def test_method_options():
    o = MethodOptions()
    assert (o.wanda_group, o.wanda_variant, o.blocksize, o.percdamp) == ("row", False, 128, 0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.blocksize = 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="wanda_group"):
        MethodOptions(wanda_group="column")
    with pytest.raises(ValueError, match="blocksize"):
        MethodOptions(blocksize=0)
    with pytest.raises(ValueError, match="percdamp"):
        MethodOptions(percdamp=-0.1)
