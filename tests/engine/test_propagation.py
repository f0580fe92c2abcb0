"""The driver's block-by-block forward equals the model's own forward, for every registered family and for
configs built to make blocks differ (several layer types, sliding windows shorter than the calibration
windows, tied embeddings): dense propagation of calibration batches matches ``output_hidden_states`` at every
block boundary, and the statistics the driver collects match a full-model hook loop."""

from __future__ import annotations

import pytest
import torch
from propagation_check import driver_block_io, model_block_outputs, rel_err
from tiny import FAMILIES, SLIDING, VARIANTS
from transformers import AutoModelForCausalLM

from owlctl.engine.calibration.driver import run_blocks
from owlctl.engine.models.hosts import InMemory
from owlctl.families import resolve

NAMES = list(FAMILIES) + list(VARIANTS)
NSEQ, SEQLEN = 5, 3 * SLIDING  # windows three times longer than the sliding window
RTOL = 1e-5


def _model(tiny_models, name):
    m = AutoModelForCausalLM.from_pretrained(tiny_models(name), dtype=torch.float32)
    return m.eval()


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (NSEQ, SEQLEN), generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_dense_propagation_equals_model_forward(name, tiny_models):
    model = _model(tiny_models, name)
    layout = resolve(model)
    ids = _ids()
    want_in, want_out = model_block_outputs(model, layout, ids)
    got_in, got_out = driver_block_io(model, layout, ids, batch_size=2)  # batches of 2, 2, 1
    for i in range(layout.num_blocks):
        assert rel_err(got_in[i], want_in[i]) <= RTOL, f"{name}: input of block {i}"
        assert rel_err(got_out[i], want_out[i]) <= RTOL, f"{name}: output of block {i}"


def _naive_act_norms(model, layout, ids):
    """SPEC 1.3 with the model's own forward: one sequence at a time, hooks on every prunable Linear, running
    mean over sequences of each input channel's squared L2 norm."""
    stats = {}
    hooks = []
    for i in range(layout.num_blocks):
        for n, lin in layout.linears(i).items():
            def hook(_m, a, key=(i, n)):
                x = a[0].reshape(-1, a[0].shape[-1]).double()  # (T, C_in); OPT's fc1/fc2 see (B*T, C_in)
                stats.setdefault(key, []).append((x ** 2).sum(0))
            hooks.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for row in ids:
                model(row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.stack(v).mean(0) for k, v in stats.items()}


@pytest.mark.parametrize("name", NAMES)
def test_statistics_equal_full_model_hook_loop(name, tiny_models):
    model = _model(tiny_models, name)
    layout = resolve(model)
    ids = _ids(1)
    want = _naive_act_norms(model, layout, ids)
    got = {}

    def decide(i, _b, linears, stats):
        for n in linears:
            got[(i, n)] = stats[n].act_sq_norm().double()

    run_blocks(InMemory(model, layout), ids, device="cpu", batch_size=2, needs=frozenset({"act_norm"}), decide=decide,
               propagate="dense")
    assert set(got) == set(want)
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-5, f"{name}: statistic of {key}"


def test_blocks_of_one_type_share_their_inputs(tiny_models):
    """Per-block inputs cost no extra memory: blocks of the same layer type get the same tensor objects,
    and equal masks / rotary tables of later batches are the first batch's."""
    from owlctl.engine.calibration.capture import capture_inputs

    model = _model(tiny_models, "gemma3_text-hybrid")
    layout = resolve(model)
    with torch.inference_mode():
        inputs = capture_inputs(InMemory(model, layout), _ids(), "cpu", batch_size=2)
    kw = inputs.kwargs
    assert len(kw) == layout.num_blocks and all(len(k) == 3 for k in kw)  # 3 batches per block
    pe = [k[0]["position_embeddings"] for k in kw]
    assert pe[0][0] is pe[2][0] and pe[1][0] is pe[3][0]  # sliding blocks 0, 2; full blocks 1, 3
    assert not torch.equal(pe[0][0], pe[1][0])  # the two layer types' rotary tables differ (theta 1e4 vs 1e6)
    assert kw[0][1]["position_embeddings"][0] is pe[0][0]  # batch 1 reuses batch 0's equal table
    sliding, full = kw[0][0]["attention_mask"], kw[1][0]["attention_mask"]
    assert sliding is not None and kw[2][0]["attention_mask"] is sliding
    assert full is None or not torch.equal(sliding, full)  # None: SDPA's causal flag does the full mask
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert list(layout.blocks) == list(model.model.layers) and type(layout.blocks[0]).__name__ != "_BlockStub"
