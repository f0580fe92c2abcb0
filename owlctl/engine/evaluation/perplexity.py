"""Perplexity with the reference protocol (SPEC 7.1, the OWL/Wanda/SparseGPT WikiText-2 evaluation).

Given one token stream (the split's documents joined and tokenised once) of n tokens and a window length T:

    W        = floor(n / T)  non-overlapping windows  x_w = ids[w*T : (w+1)*T];  the remainder is dropped
    ce_w     = (1 / (T-1)) * sum_{t=0}^{T-2}  -log softmax(logits_w[t])[x_w[t+1]]     (positions 0..T-2
               predict 1..T-1; no BOS is added per window, nothing strides or overlaps)
    ppl      = exp( (1/W) * sum_w ce_w )

The reference writes this as exp(sum_w ce_w*T / (W*T)), which is the same number. Logits are upcast to
float32 before the cross-entropy (the reference computes it in the model dtype, fp16 on GPU).

With a BOS per window (``--bos always``; ``bos_id`` set, the stream tokenised without special tokens) each
window is [BOS] + T-1 stream tokens, W = floor(n / (T-1)): the same T-1 predictions per window, the first of
them predicting the window's first text token from BOS alone.
"""

from __future__ import annotations

import math
from typing import Any

from owlctl.errors import DataError, InputError

__all__ = ["perplexity", "windows", "max_positions"]

_MAX_EXP = math.log(1.7e308)


def max_positions(model: Any) -> int | None:
    """The longest sequence the model's position scheme covers (None when the config does not say)."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def windows(ids: Any, seqlen: int, max_windows: int | None = None, bos_id: int | None = None) -> Any:
    """The evaluation windows of a 1-D token stream: (W, seqlen), W = floor(n / seqlen), capped at
    ``max_windows`` (the first ones); with ``bos_id``, each window is [bos_id] + seqlen - 1 stream tokens and
    W = floor(n / (seqlen - 1)). Raises DataError when the stream is shorter than one window."""
    if ids.dim() != 1:
        raise InputError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
    if seqlen < 2:
        raise InputError(f"--seqlen must be >= 2 (one prediction per window needs two tokens), got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"--max-windows must be >= 1, got {max_windows}")
    n = ids.numel()
    body = seqlen if bos_id is None else seqlen - 1
    w = n // body
    if w == 0:
        raise DataError(f"the evaluation text has {n} tokens, fewer than one window of --seqlen {seqlen}",
                        hint=f"lower --seqlen (at most {n}), or evaluate on a larger corpus")
    if max_windows is not None:
        w = min(w, max_windows)
    wins = ids[: w * body].view(w, body)
    if bos_id is None:
        return wins
    import torch

    return torch.cat([torch.full((w, 1), int(bos_id), dtype=ids.dtype), wins], dim=1)


def perplexity(model: Any, ids: Any, seqlen: int, *, batch_size: int = 1, max_windows: int | None = None,
               device: str = "cpu", progress: Any = None, description: str = "perplexity",
               bos_id: int | None = None) -> dict:
    """Perplexity of ``model`` on the 1-D LongTensor ``ids`` with the reference protocol (module docstring).

    The model must already be on ``device``; windows are sent there ``batch_size`` at a time (batching does
    not change the result: every window is scored on its own). ``bos_id``: a BOS per window (module docstring).
    Returns {"ppl", "nll_mean" (mean window CE, nats per token), "windows", "tokens" (windows x seqlen),
    "predictions", "seqlen", "window_nll" (per-window mean CE, a list of floats), "bos" ("always" | "never"),
    "stream_tokens_used"}. Under a launcher (several processes) each rank scores its own batches of windows.
    """
    from owlctl.engine.distributed.evaluation import window_losses

    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise InputError(f"--seqlen {seqlen} is longer than the model's {limit} positions "
                         "(max_position_embeddings)", hint=f"use --seqlen {limit} or less")
    wins = windows(ids.long(), seqlen, max_windows, bos_id)
    n_win = wins.shape[0]
    per_window = window_losses(wins, batch_size, lambda w, main: _losses(model, w, batch_size, device,
                                                                          progress if main else None, description))
    return summarise(per_window, n_win, seqlen, bos_id)


def _losses(model: Any, wins: Any, batch_size: int, device: str, progress: Any, description: str) -> list:
    """Each window's mean cross-entropy (a list of 0-d tensors), ``batch_size`` windows per forward."""
    import torch
    import torch.nn.functional as F

    n_win = wins.shape[0]
    per_window: list[Any] = []
    cm = progress.task(description, n_win) if progress is not None else None
    task = cm.__enter__() if cm is not None else None
    try:
        with torch.inference_mode():
            for start in range(0, n_win, batch_size):
                batch = wins[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # One window at a time keeps the float32 copy of the logits at (T, vocab), not (B, T, vocab).
                for b in range(batch.shape[0]):
                    ce = F.cross_entropy(logits[b, :-1].float(), batch[b, 1:], reduction="mean")
                    per_window.append(ce)
                del logits
                if task is not None:
                    done = min(start + batch_size, n_win)
                    task.advance(batch.shape[0], info=f"{done}/{n_win} windows")
    finally:
        if cm is not None:
            cm.__exit__(None, None, None)
    return per_window


def summarise(per_window: list, n_win: int, seqlen: int, bos_id: int | None) -> dict:
    """The result document of a perplexity run from its per-window mean cross-entropies (one device sync)."""
    import torch

    window_nll = torch.stack(per_window).double().cpu()
    nll_mean = float(window_nll.mean())
    if not math.isfinite(nll_mean):
        raise DataError(f"the model produced a non-finite loss ({nll_mean}) on the evaluation windows",
                        hint="the weights may hold inf/NaN, or float16 overflowed; try --dtype float32")
    ppl = math.exp(nll_mean) if nll_mean < _MAX_EXP else None  # None: beyond float range (JSON has no inf)
    return {"ppl": ppl, "nll_mean": nll_mean, "windows": n_win, "tokens": n_win * seqlen,
            "predictions": n_win * (seqlen - 1), "seqlen": seqlen, "window_nll": window_nll.tolist(),
            "bos": "never" if bos_id is None else "always",
            "stream_tokens_used": n_win * (seqlen if bos_id is None else seqlen - 1)}
