"""The one layer-by-layer driver: for each decoder block observe -> decide -> apply -> propagate (SPEC 1.4).

Calibration runs in batches of sequences; statistics are collected by hooks on the block's prunable Linears
(one per shared input: q/k/v, gate/up), always removed. Blocks not being worked on stay where the model keeps
them; only the current block and the activations live on the compute device.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from owlctl.core.stats import InputStatistics
from owlctl.engine.calibration.capture import _block_forward, capture_inputs
from owlctl.families import ModelLayout, share_groups
from owlctl.progress import task as progress_task


@dataclass
class Timings:
    """Seconds spent per phase, and how many block forwards each calibration sequence went through."""

    capture: float = 0.0
    statistics: float = 0.0
    forwards: float = 0.0
    decide: float = 0.0
    propagate: float = 0.0
    block_forwards_per_sample: int = 0

    def as_dict(self) -> dict:
        d = {k: round(v, 4) for k, v in self.__dict__.items() if isinstance(v, float)}
        d["block_forwards_per_sample"] = self.block_forwards_per_sample
        return d


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def collect_statistics(layout: ModelLayout, block_index: int, needs: frozenset[str], device: str,
                       timings: Timings, current_nseq: list[int]) -> Iterator[dict[str, InputStatistics]]:
    """Hooks on every prunable Linear of a block, always removed. Linears that read the same input
    (q/k/v, gate/up) share one statistic."""
    linears = layout.linears(block_index)
    leader = share_groups(layout)
    stats: dict[str, InputStatistics] = {}
    for name, lin in linears.items():
        if leader[name] == name:
            stats[name] = InputStatistics(lin.in_features, act_norm="act_norm" in needs,
                                          hessian="hessian" in needs, device=device)
    handles = []

    def make_hook(st: InputStatistics) -> Callable:
        def hook(_mod: Any, inp: tuple) -> None:
            t0 = time.perf_counter()
            st.add(inp[0].detach(), current_nseq[0])
            timings.statistics += time.perf_counter() - t0
        return hook

    try:
        for name in stats:
            handles.append(linears[name].register_forward_pre_hook(make_hook(stats[name])))
        yield {name: stats[leader[name]] for name in linears}
    finally:
        for h in handles:
            h.remove()


DecideFn = Callable[[int, Any, dict[str, Any], dict[str, InputStatistics]], None]
AfterFn = Callable[[int, Any], None]


def _run_data_free(host: Any, device: str, decide: DecideFn, after: AfterFn | None, progress: Any,
                   description: str) -> Timings:
    timings = Timings()
    layout = host.layout
    t0 = time.perf_counter()
    with progress_task(progress, description, layout.num_blocks) as task, torch.inference_mode():
        for i in range(layout.num_blocks):
            with host.block(i, device) as block:
                decide(i, block, layout.linears(i), {})
                if after is not None:
                    after(i, block)
            task.advance(1, info=f"block {i + 1}/{layout.num_blocks}")
    timings.decide = time.perf_counter() - t0
    return timings


def run_blocks(host: Any, input_ids: torch.Tensor | None, *, device: str, batch_size: int,
               needs: frozenset[str], decide: DecideFn, propagate: str, progress: Any = None,
               description: str = "blocks", after: AfterFn | None = None, activations: str = "device") -> Timings:
    """Drive every block of ``host`` (engine/models/hosts.py: a model in memory or streamed from its files):
    observe its inputs (hooks), ``decide`` (prune or score), propagate, then ``after(i, block)`` while the
    block is still on the device (the streamed prune writes it out there). With ``input_ids`` None (a
    data-free method) every block goes straight to ``decide`` with no statistics.

    ``propagate="dense"``: the block is not changed by ``decide`` (profiling), so the outputs of the observing
    forward feed the next block (one forward per block). ``propagate="pruned"``: after ``decide`` changed the
    block, a second forward produces the next block's inputs from the pruned weights (SPEC 1.4).
    ``activations``: where the hidden states between blocks are kept (device | cpu | disk).
    """
    if propagate not in ("dense", "pruned"):
        raise ValueError(propagate)
    if input_ids is None:  # a data-free method (magnitude): no capture, no forwards
        return _run_data_free(host, device, decide, after, progress, description)
    timings = Timings()
    layout = host.layout
    host.model.config.use_cache = False
    with torch.inference_mode():
        t0 = time.perf_counter()
        inputs = capture_inputs(host, input_ids, device, batch_size, activations)
        _sync(device)
        timings.capture = time.perf_counter() - t0
        nblocks = layout.num_blocks
        try:
            with progress_task(progress, description, nblocks) as task:
                for i in range(nblocks):
                    with host.block(i, device) as block:
                        _one_block(host, block, i, inputs, needs, decide, propagate, timings, device)
                        if after is not None:
                            after(i, block)
                    task.advance(1, info=f"block {i + 1}/{nblocks}")
        finally:
            inputs.hidden.close_root()
    timings.forwards -= timings.statistics
    timings.block_forwards_per_sample = 1 if propagate == "dense" else 2
    return timings


def _one_block(host: Any, block: Any, i: int, inputs: Any, needs: frozenset[str], decide: DecideFn, propagate: str,
               timings: Timings, device: str) -> None:
    """Observe, decide and propagate one block; ``inputs.hidden`` becomes the next block's inputs."""
    layout = host.layout
    current = [0]
    outs = inputs.hidden.new()
    t0 = time.perf_counter()
    with collect_statistics(layout, i, needs, device, timings, current) as stats:
        for b in range(len(inputs.hidden)):
            current[0] = inputs.nseq[b]
            out = _block_forward(block, inputs, i, b)
            if propagate == "dense":
                outs.append(out)
    _sync(device)
    timings.forwards += time.perf_counter() - t0
    t0 = time.perf_counter()
    decide(i, block, layout.linears(i), stats)
    _sync(device)
    timings.decide += time.perf_counter() - t0
    del stats
    if propagate == "pruned":
        t0 = time.perf_counter()
        for b in range(len(inputs.hidden)):
            outs.append(_block_forward(block, inputs, i, b))
        _sync(device)
        timings.propagate += time.perf_counter() - t0
    inputs.hidden.close()
    inputs.hidden = outs
