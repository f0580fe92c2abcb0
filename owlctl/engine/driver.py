"""The one layer-by-layer driver: capture every block's inputs, then for each block observe -> decide -> apply
-> propagate (SPEC 1.2, 1.4).

The capture pass runs the model once per calibration batch with every decoder block temporarily replaced by
a stub that records what the model passes that block (positional and keyword inputs: position_embeddings,
attention masks or None, position ids, ...) and hands the hidden states on unchanged; the last stub stops
the forward, so the final norm and the LM head never run. Each block is then fed its OWN non-hidden inputs:
models with several layer types (Gemma-2/3, Qwen2/3 with max_window_layers, ...) give different blocks
different masks (sliding window vs full) and rotary tables (Gemma-3: theta 1e4 vs 1e6), so replaying block
0's inputs for every block (the reference's Catcher) computes the wrong thing for them. The hidden states
entering block 0 are kept as before. Calibration runs in batches of sequences. Blocks not being worked on
stay on CPU; only the current block and the activations live on the compute device.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from owlctl.core.stats import InputStatistics
from owlctl.families import ModelLayout, share_groups

_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache", "output_attentions")


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
    """What the driver feeds the blocks, per calibration batch b:

    - ``hidden[b]``: the hidden states entering the current block (replaced by each block's outputs);
    - ``args[i][b]`` / ``kwargs[i][b]``: block i's own other inputs for batch b, exactly as the model passed
      them (minus the KV-cache arguments). They are references, not copies: blocks of the same layer type
      receive the very same tensor objects from the model, and tensors equal to one stored for an earlier
      batch (same masks and rotary tables for every full batch) are replaced by that one, so memory holds
      one mask / rotary table per layer type and batch shape, not one per block and batch.
    """

    hidden: list[torch.Tensor]
    args: list[list[tuple]]
    kwargs: list[list[dict]]
    nseq: list[int]


class _Pool:
    """Shares equal tensors between calibration batches (see BlockInputs)."""

    def __init__(self) -> None:
        self.seen: dict[int, torch.Tensor] = {}  # id -> tensor, to keep identity sharing cheap
        self.by_shape: dict[tuple, list[torch.Tensor]] = {}

    def share(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) in self.seen and self.seen[id(obj)] is obj:
                return obj
            key = (tuple(obj.shape), obj.dtype, obj.device)
            for t in self.by_shape.get(key, []):
                if torch.equal(t, obj):
                    return t
            self.by_shape.setdefault(key, []).append(obj)
            self.seen[id(obj)] = obj
            return obj
        if isinstance(obj, tuple):
            return tuple(self.share(o) for o in obj)
        if isinstance(obj, list):
            return [self.share(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self.share(v) for k, v in obj.items()}
        return obj


class _BlockStub(torch.nn.Module):
    """Stands in for decoder block ``index`` during the capture pass: records its inputs, returns the hidden
    states unchanged in the form the real block returns (a tensor in transformers 5, a tuple in older
    versions), and stops the forward after the last block."""

    def __init__(self, index: int, last: bool, record: Callable[[int, tuple, dict], None],
                 output_form: Callable[[tuple, dict], bool]) -> None:
        super().__init__()
        self.index, self.last, self.record, self.output_form = index, last, record, output_form

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.record(self.index, args, kwargs)
        if self.last:
            raise _StopForward
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.output_form(args, kwargs) else hidden


def capture_inputs(model: Any, layout: ModelLayout, input_ids: torch.Tensor, device: str,
                   batch_size: int) -> BlockInputs:
    """One cheap pass over the calibration batches (embeddings only; every block is a recording stub)
    that collects block 0's input hidden states and every block's own other inputs."""
    blocks = layout.blocks
    n = len(blocks)
    originals = [blocks[i] for i in range(n)]
    pool = _Pool()
    current: dict[int, tuple[tuple, dict]] = {}
    tuple_out: list[bool] = []

    def record(i: int, args: tuple, kwargs: dict) -> None:
        current[i] = (args, kwargs)

    def output_form(args: tuple, kwargs: dict) -> bool:
        # Learn once whether the real blocks return a tuple, by running the real block 0 on its inputs
        # (.forward: its hooks, e.g. a caller's, must not see this extra call).
        if not tuple_out:
            block0 = originals[0]
            if device != "cpu":
                block0.to(device)
            try:
                tuple_out.append(isinstance(block0.forward(*args, **kwargs), (tuple, list)))
            finally:
                if device != "cpu":
                    block0.to("cpu")
        return tuple_out[0]

    hidden, args_l, kwargs_l, nseq = [], [[] for _ in range(n)], [[] for _ in range(n)], []
    try:
        for i in range(n):
            blocks[i] = _BlockStub(i, i == n - 1, record, output_form)
        with _outside_blocks_on(model, layout, device):
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                current.clear()
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                if len(current) != n:
                    raise RuntimeError(f"the model called {len(current)} of its {n} decoder blocks")
                for i in range(n):
                    args, kw = current[i]
                    kw = {k: v for k, v in kw.items() if k not in _DROP_KWARGS}
                    if args:
                        h, args = args[0], tuple(args[1:])
                    else:
                        h = kw.pop("hidden_states")
                    if i == 0:
                        hidden.append(h.detach())
                    args_l[i].append(pool.share(args))
                    kwargs_l[i].append(pool.share(kw))
                nseq.append(batch.shape[0])
    finally:
        for i in range(n):
            blocks[i] = originals[i]
        current.clear()
    return BlockInputs(hidden, args_l, kwargs_l, nseq)


def _block_forward(block: Any, inputs: BlockInputs, i: int, b: int) -> torch.Tensor:
    out = block(inputs.hidden[b], *inputs.args[i][b], **inputs.kwargs[i][b])
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
                    outs = [_block_forward(block, inputs, i, b) for b in range(len(inputs.hidden))]
                    _sync(device)
                    timings.propagate += time.perf_counter() - t0
                inputs.hidden = outs
                if device != "cpu":
                    block.to("cpu")
                task.advance(1, info=f"block {i + 1}/{nblocks}")
    timings.forwards -= timings.statistics
    timings.block_forwards_per_sample = 1 if propagate == "dense" else 2
    return timings
