"""The one layer-by-layer driver: capture block-0 inputs, then for each block observe -> decide -> apply ->
propagate (SPEC 1.2, 1.4).

Block-0 capture is a forward-pre-hook with kwargs that records every positional and keyword input of the
first decoder block and stops the forward, so it works whatever the block receives (position_embeddings,
cache_position, attention masks or None). Calibration runs in batches of sequences. Blocks not being worked
on stay on CPU; only the current block and the activations live on the compute device.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from owlctl.core.stats import InputStatistics
from owlctl.families import ModelLayout, share_groups

_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions")


class _StopForward(Exception):
    pass


@dataclass
class Timings:
    """Seconds spent per phase, and how many block forwards each calibration sequence went through."""

    capture: float = 0.0
    statistics: float = 0.0
    forwards: float = 0.0
    decide: float = 0.0
    propagate: float = 0.0
    block_forwards_per_sample: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: round(v, 4) for k, v in self.__dict__.items() if isinstance(v, float)}
        d["block_forwards_per_sample"] = self.block_forwards_per_sample
        d.update(self.extra)
        return d


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _non_block_modules(model: Any, layout: ModelLayout) -> list[Any]:
    prefix = layout.blocks_path + "."
    return [m for n, m in model.named_modules()
            if n and not n.startswith(prefix) and n != layout.blocks_path and not list(m.children())]


@contextmanager
def _outside_blocks_on(model: Any, layout: ModelLayout, device: str) -> Iterator[None]:
    mods = _non_block_modules(model, layout)
    if device != "cpu":
        for m in mods:
            m.to(device)
    try:
        yield
    finally:
        if device != "cpu":
            for m in mods:
                m.to("cpu")


@dataclass
class BlockInputs:
    """Per batch: the hidden states entering the current block, plus the other inputs (fixed)."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    nseq: list[int]


def capture_inputs(model: Any, layout: ModelLayout, input_ids: torch.Tensor, device: str,
                   batch_size: int) -> BlockInputs:
    """Run the embedding part of the model on every calibration batch, recording block 0's inputs."""
    captured: list[tuple[tuple, dict]] = []

    def pre_hook(_mod: Any, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    block0 = layout.blocks[0]
    handle = block0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    hidden, rest_args, kwargs_l, nseq = [], [], [], []
    try:
        with _outside_blocks_on(model, layout, device):
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                args, kw = captured.pop()
                kw = {k: v for k, v in kw.items() if k not in _DROP_KWARGS}
                if args:
                    h, args = args[0], tuple(args[1:])
                else:
                    h = kw.pop("hidden_states")
                hidden.append(h.detach())
                rest_args.append(args)
                kwargs_l.append(kw)
                nseq.append(batch.shape[0])
    finally:
        handle.remove()
    return BlockInputs(hidden, rest_args, kwargs_l, nseq)


def _block_forward(block: Any, inputs: BlockInputs, b: int) -> torch.Tensor:
    out = block(inputs.hidden[b], *inputs.args[b], **inputs.kwargs[b])
    return out[0] if isinstance(out, (tuple, list)) else out


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


class _NoTask:
    def advance(self, n: int = 1, info: str | None = None) -> None:
        pass


@contextmanager
def progress_task(progress: Any, description: str, total: int) -> Iterator[Any]:
    """A progress task from a reporter (see owlctl.cli.console.Progress), or a silent one without it."""
    if progress is None:
        yield _NoTask()
    else:
        with progress.task(description, total) as task:
            yield task


DecideFn = Callable[[int, Any, dict[str, Any], dict[str, InputStatistics]], None]


def run_blocks(model: Any, layout: ModelLayout, input_ids: torch.Tensor, *, device: str, batch_size: int,
               needs: frozenset[str], decide: DecideFn, propagate: str, progress: Any = None,
               description: str = "blocks") -> Timings:
    """Drive every block: observe its inputs (hooks), ``decide`` (prune or score), and propagate.

    ``propagate="dense"``: the block is not changed by ``decide`` (profiling), so the outputs of the observing
    forward feed the next block (one forward per block). ``propagate="pruned"``: after ``decide`` changed the
    block, a second forward produces the next block's inputs from the pruned weights (SPEC 1.4).
    """
    if propagate not in ("dense", "pruned"):
        raise ValueError(propagate)
    timings = Timings()
    model.config.use_cache = False
    with torch.inference_mode():
        t0 = time.perf_counter()
        inputs = capture_inputs(model, layout, input_ids, device, batch_size)
        _sync(device)
        timings.capture = time.perf_counter() - t0
        nblocks = layout.num_blocks
        with progress_task(progress, description, nblocks) as task:
            for i in range(nblocks):
                block = layout.blocks[i]
                if device != "cpu":
                    block.to(device)
                current = [0]
                outs: list[torch.Tensor] = []
                t0 = time.perf_counter()
                with collect_statistics(layout, i, needs, device, timings, current) as stats:
                    for b in range(len(inputs.hidden)):
                        current[0] = inputs.nseq[b]
                        out = _block_forward(block, inputs, b)
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
                    outs = [_block_forward(block, inputs, b) for b in range(len(inputs.hidden))]
                    _sync(device)
                    timings.propagate += time.perf_counter() - t0
                inputs.hidden = outs
                if device != "cpu":
                    block.to("cpu")
                task.advance(1, info=f"block {i + 1}/{nblocks}")
    timings.forwards -= timings.statistics
    timings.block_forwards_per_sample = 1 if propagate == "dense" else 2
    return timings
