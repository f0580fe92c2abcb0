"""Perplexity of a model streamed from its files: the evaluation windows pass block by block, like calibration.

The windows' inputs are captured once (embeddings only, engine/calibration/capture.py), every block is read,
run over all windows and dropped, then the model's own forward runs once more per batch with every block
replaced by a stub that hands over the final hidden states, so the final norm, the LM head and whatever
the family does after the blocks (soft-capping, a projection) are the model's own code. The windows, the
batches and the cross-entropy are those of engine/evaluation/perplexity.py, so both paths give the same
numbers (tested). The sparsity audit runs on each block while it is on the device.
"""

from __future__ import annotations

from typing import Any

import torch

from owlctl.engine.calibration.capture import _block_forward, capture_inputs
from owlctl.engine.evaluation.perplexity import summarise, windows
from owlctl.progress import task as progress_task


class _HeadStub(torch.nn.Module):
    """Block ``index`` during the head pass: the last one returns the stored final hidden states, the others
    pass their input on (their work was done block by block)."""

    def __init__(self, last: bool, final: list, tuple_out: bool) -> None:
        super().__init__()
        self.last, self.final, self.tuple_out = last, final, tuple_out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = self.final[0] if self.last else (args[0] if args else kwargs["hidden_states"])
        return (hidden,) if self.tuple_out else hidden


def _tuple_output(host: Any, inputs: Any, device: str) -> bool:
    with host.block(0, device) as block:
        out = block.forward(inputs.hidden[0], *inputs.args[0][0], **inputs.kwargs[0][0])
    return isinstance(out, (tuple, list))


def _head_logits(host: Any, batch: torch.Tensor, final: torch.Tensor, tuple_out: bool) -> torch.Tensor:
    blocks = host.layout.blocks
    n = len(blocks)
    originals = [blocks[i] for i in range(n)]
    holder = [final]
    try:
        for i in range(n):
            blocks[i] = _HeadStub(i == n - 1, holder, tuple_out)
        return host.model(input_ids=batch, use_cache=False).logits
    finally:
        for i in range(n):
            blocks[i] = originals[i]


def perplexity_streamed(host: Any, ids: Any, seqlen: int, *, batch_size: int = 1, max_windows: int | None = None,
                        device: str = "cpu", progress: Any = None, description: str = "perplexity",
                        bos_id: int | None = None, auditor: Any = None, activations: str = "device") -> dict:
    """engine/evaluation/perplexity.perplexity for a host whose model is streamed (or any host): the same
    windows, batches and result. ``auditor``: an evaluation.audit.Auditor fed each block on the way."""
    wins = windows(ids.long(), seqlen, max_windows, bos_id)
    n_win = wins.shape[0]
    from owlctl.engine.distributed.evaluation import window_losses

    per_window = window_losses(wins, batch_size, lambda w, main: _streamed_losses(
        host, w, batch_size, device, progress if main else None, description, auditor, activations))
    return summarise(per_window, n_win, seqlen, bos_id)


def _streamed_losses(host: Any, wins: torch.Tensor, batch_size: int, device: str, progress: Any,
                     description: str, auditor: Any, activations: str) -> list:
    layout = host.layout
    with torch.inference_mode():
        inputs = capture_inputs(host, wins, device, batch_size, activations)
        try:
            tuple_out = _tuple_output(host, inputs, device)
            with progress_task(progress, description, layout.num_blocks + 1) as task:
                for i in range(layout.num_blocks):
                    with host.block(i, device) as block:
                        outs = inputs.hidden.new()
                        for b in range(len(inputs.hidden)):
                            outs.append(_block_forward(block, inputs, i, b))
                        if auditor is not None:
                            auditor.block(i, layout.block_name(i), layout.linears(i))
                    inputs.hidden.close()
                    inputs.hidden = outs
                    task.advance(1, info=f"block {i + 1}/{layout.num_blocks}")
                per_window = _window_losses(host, wins, inputs, batch_size, device, tuple_out)
                task.advance(1, info="LM head")
        finally:
            inputs.hidden.close_root()
    return per_window


def _window_losses(host: Any, wins: torch.Tensor, inputs: Any, batch_size: int, device: str,
                   tuple_out: bool) -> list:
    import torch.nn.functional as F

    per_window = []
    with host.outside(device, head=True):
        for b, start in enumerate(range(0, wins.shape[0], batch_size)):
            batch = wins[start:start + batch_size].to(device)
            logits = _head_logits(host, batch, inputs.hidden[b], tuple_out)
            for k in range(batch.shape[0]):
                per_window.append(F.cross_entropy(logits[k, :-1].float(), batch[k, 1:], reduction="mean"))
            del logits
    return per_window


def audit_streamed(host: Any, auditor: Any, device: str = "cpu") -> None:
    """The audit alone (no perplexity): every block read once."""
    layout = host.layout
    with torch.inference_mode():
        for i in range(layout.num_blocks):
            with host.block(i, device):
                auditor.block(i, layout.block_name(i), layout.linears(i))
