"""Shared by the tiny and the real-model propagation tests: what the model's own forward and owlctl's driver
feed into and get out of every decoder block."""

from __future__ import annotations

import torch

from owlctl.engine.calibration.driver import run_blocks
from owlctl.engine.models.hosts import InMemory


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def model_block_outputs(model, layout, ids):
    """The model's own forward: the hidden states entering every block (``output_hidden_states``; its last
    entry has the final norm applied, so the last block's output is taken with a forward hook instead)."""
    last = []
    h = layout.blocks[-1].register_forward_hook(
        lambda _m, _a, out: last.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            hs = model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        h.remove()
    assert len(hs) == layout.num_blocks + 1
    return list(hs[:layout.num_blocks]), [*hs[1:layout.num_blocks], last[0]]


def driver_block_io(model, layout, ids, batch_size):
    """What run_blocks feeds every block and what every block returns, over all batches (dense)."""
    ins = {i: [] for i in range(layout.num_blocks)}
    outs = {i: [] for i in range(layout.num_blocks)}
    handles = []
    for i, block in enumerate(layout.blocks):
        def hook(_m, a, kw, out, i=i):  # a completed block forward (inputs and output), nothing else
            ins[i].append((a[0] if a else kw["hidden_states"]).clone())
            outs[i].append((out[0] if isinstance(out, tuple) else out).clone())
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        run_blocks(InMemory(model, layout), ids, device="cpu", batch_size=batch_size, needs=frozenset(),
                   decide=lambda *a: None, propagate="dense")
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(ins[i]) for i in ins], [torch.cat(outs[i]) for i in outs]
