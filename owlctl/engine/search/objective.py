"""The search objective: KL divergence from the dense model's next-token distributions, on held-out windows.

For W windows of T tokens of held-out text (the validation split; never the test split, which is kept for
``owlctl eval``), with P the dense model's and Q the candidate's next-token distribution at a position,

    KL_t = sum_{v in top_k(P_t)} P_t(v) (log P_t(v) - log Q_t(v))  +  P_t(rest) (log P_t(rest) - log Q_t(rest))

where "rest" pools every token outside the dense model's k most likely ones (k = ``topk``). That is the
exact KL divergence between P and Q coarsened to k + 1 outcomes: a lower bound of the full KL that is
tight when P puts little mass outside its top k, and it needs k numbers per position of the dense
reference instead of the whole vocabulary (262k for Gemma-3). A window's value is the mean of KL_t over
its T positions; the objective on w windows is the mean over the first w windows (so a score on a few
windows is a prefix of the score on more). Every window value is appended to a log in the database
directory, keyed by the candidate, so a resumed search reads what was already measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def heldout_windows(source: str, split: str, tok: Any, seqlen: int, nwindows: int, bos: str) -> Any:
    """(W, seqlen) token windows: the first ``nwindows`` of the split with the perplexity protocol's cut."""
    from owlctl.engine.data import token_stream
    from owlctl.engine.evaluation.perplexity import windows

    ids = token_stream(source, split, tok, bos)
    return windows(ids.long(), seqlen, nwindows, int(tok.bos_token_id) if bos == "always" else None)


def _logits(model: Any, row: Any, device: str) -> Any:
    return model(input_ids=row.unsqueeze(0).to(device), use_cache=False).logits[0].float()


def dense_reference(model: Any, wins: Any, topk: int, device: str, progress: Any = None) -> list[tuple]:
    """Per window: (top-k token ids (T, k), their log P (T, k), log P(rest) (T,)) of the dense model."""
    import torch

    from owlctl.progress import task as progress_task

    ref = []
    with torch.inference_mode(), progress_task(progress, "dense reference", len(wins)) as task:
        for w in range(len(wins)):
            logp = torch.log_softmax(_logits(model, wins[w], device), dim=-1)
            top, idx = logp.topk(min(topk, logp.shape[-1]), dim=-1)
            rest = torch.log1p(-top.exp().sum(-1).clamp(max=1.0 - 1e-7))
            ref.append((idx.cpu(), top.cpu(), rest.cpu()))
            task.advance(1, info=f"{w + 1}/{len(wins)} windows")
    return ref


def window_kl(model: Any, row: Any, ref: tuple, device: str) -> float:
    """Mean over the window's positions of the coarsened KL(P_dense || Q_model) (module docstring)."""
    import torch

    idx, logp_top, logp_rest = (t.to(device) for t in ref)
    with torch.inference_mode():
        logq = torch.log_softmax(_logits(model, row, device), dim=-1)
        logq_top = logq.gather(-1, idx)
        logq_rest = torch.log1p(-logq_top.exp().sum(-1).clamp(max=1.0 - 1e-7))
        p_top, p_rest = logp_top.exp(), logp_rest.exp()
        kl = (p_top * (logp_top - logq_top)).sum(-1) + p_rest * (logp_rest - logq_rest)
        return float(kl.mean().double())


def windows_sha256(wins: Any) -> str:
    import torch

    return hashlib.sha256(wins.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class EvaluationLog:
    """Window values per candidate key, appended to a JSON-lines file (one line per window)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.values: dict[str, dict[int, float]] = {}
        self.seconds = 0.0  # search seconds recorded by the last line (a resumed run continues the clock)
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    key, w, kl, t = str(rec["key"]), int(rec["w"]), float(rec["kl"]), float(rec.get("t", 0.0))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a line cut by an interrupt
                    continue
                self.values.setdefault(key, {})[w] = kl
                self.seconds = max(self.seconds, t)
        self._fh = None

    def add(self, key: str, w: int, value: float, t: float) -> None:
        self.values.setdefault(key, {})[w] = value
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run, closed by close())
        self._fh.write(json.dumps({"key": key, "w": w, "kl": value, "t": round(t, 3)}) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Objective:
    """score(key, nwin, prepare): the mean of the first ``nwin`` window values of a candidate; ``prepare()``
    puts the candidate in the model, called only when a window is missing from the log."""

    def __init__(self, model: Any, wins: Any, ref: list, log: EvaluationLog, device: str,
                 clock: Callable[[], float]) -> None:
        self.model, self.wins, self.ref, self.log, self.device, self.clock = model, wins, ref, log, device, clock
        self.computed = 0  # window forwards run in this process

    def score(self, key: str, nwin: int, prepare: Callable[[], None]) -> float:
        have = self.log.values.get(key, {})
        missing = [w for w in range(nwin) if w not in have]
        if missing:
            prepare()
            for w in missing:
                value = window_kl(self.model, self.wins[w], self.ref[w], self.device)
                self.computed += 1
                self.log.add(key, w, value, self.clock())
        have = self.log.values[key]
        return sum(have[w] for w in range(nwin)) / nwin
