"""Capturing what the model passes each decoder block, for a batch of calibration sequences (SPEC 1.2).

One pass per batch runs the model with every decoder block temporarily replaced by a stub that records what
the model passes that block (positional and keyword inputs: position_embeddings, attention masks or None,
position ids, ...) and hands the hidden states on unchanged; the last stub stops the forward, so the final
norm and the LM head never run. Each block is then fed its OWN non-hidden inputs: models with several layer
types (Gemma-2/3, Qwen2/3 with max_window_layers, ...) give different blocks different masks (sliding window
vs full) and rotary tables (Gemma-3: theta 1e4 vs 1e6), so replaying block 0's inputs for every block (the
reference's Catcher) computes the wrong thing for them. The hidden states entering block 0 are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from owlctl.engine.calibration.activations import Activations

_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache", "output_attentions")


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """What the driver feeds the blocks, per calibration batch b:

    - ``hidden[b]``: the hidden states entering the current block (replaced by each block's outputs), kept
      where ``--offload-activations`` says (engine/calibration/activations.py);
    - ``args[i][b]`` / ``kwargs[i][b]``: block i's own other inputs for batch b, exactly as the model passed
      them (minus the KV-cache arguments). They are references, not copies: blocks of the same layer type
      receive the very same tensor objects from the model, and tensors equal to one stored for an earlier
      batch (same masks and rotary tables for every full batch) are replaced by that one, so memory holds
      one mask / rotary table per layer type and batch shape, not one per block and batch.
    """

    hidden: Activations
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


def capture_inputs(host: Any, input_ids: torch.Tensor, device: str, batch_size: int,
                   activations: str = "device") -> BlockInputs:
    """One cheap pass over the calibration batches (embeddings only; every block is a recording stub)
    that collects block 0's input hidden states and every block's own other inputs. ``host``: where the
    model's modules come from (engine/models/hosts.py)."""
    model, layout = host.model, host.layout
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
            blocks[0] = originals[0]
            try:
                with host.block(0, device) as block0:
                    tuple_out.append(isinstance(block0.forward(*args, **kwargs), (tuple, list)))
            finally:
                blocks[0] = stubs[0]
        return tuple_out[0]

    hidden = Activations(activations, device)
    args_l, kwargs_l, nseq = [[] for _ in range(n)], [[] for _ in range(n)], []
    stubs = [_BlockStub(i, i == n - 1, record, output_form) for i in range(n)]
    try:
        for i in range(n):
            blocks[i] = stubs[i]
        with host.outside(device):
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
    except BaseException:
        hidden.close_root()
        raise
    finally:
        for i in range(n):
            blocks[i] = originals[i]
        current.clear()
    return BlockInputs(hidden, args_l, kwargs_l, nseq)


def _block_forward(block: Any, inputs: BlockInputs, i: int, b: int) -> torch.Tensor:
    out = block(inputs.hidden[b], *inputs.args[i][b], **inputs.kwargs[i][b])  # hidden: on the device
    return out[0] if isinstance(out, (tuple, list)) else out
