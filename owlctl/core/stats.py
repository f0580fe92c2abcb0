"""Streaming input statistics of a Linear layer over calibration sequences.

Wanda (Sun et al., 2023) per-input-channel norm, SPEC 1.3: after K calibration sequences,
    act_sq_norm[j] = (1/K) * sum_k ||x_k[:, j]||_2^2           x_k: (T, C_in) tokens of sequence k
so sqrt(act_sq_norm[j]) = ||X_j||_2 / sqrt(K). SparseGPT (Frantar & Alistarh, 2023) Hessian proxy, SPEC 5.3:
    H = (2/K) * sum_k x_k^T x_k                                 (C_in, C_in)
Both are accumulated in float32 from batches of several sequences at once; a batch of B sequences adds its
token sums and counts B (identical to the reference's per-sample running means up to float rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor


class InputStatistics:
    """Accumulates the statistics a pruning method needs from a Linear's inputs x: (B, T, C_in)."""

    def __init__(self, c_in: int, *, act_norm: bool, hessian: bool, device: torch.device | str = "cpu") -> None:
        self.c_in = c_in
        self.count = 0  # sequences seen (K)
        self._sq = torch.zeros(c_in, dtype=torch.float32, device=device) if act_norm else None
        self._xtx = torch.zeros(c_in, c_in, dtype=torch.float32, device=device) if hessian else None

    def add(self, x: Tensor, nseq: int) -> None:
        """Add a batch: x (..., C_in) holding the tokens of ``nseq`` sequences."""
        if x.shape[-1] != self.c_in:
            raise ValueError(f"input width {x.shape[-1]} != C_in {self.c_in}")
        flat = x.reshape(-1, self.c_in).float()
        if self._sq is not None:
            self._sq += flat.pow(2).sum(dim=0)
        if self._xtx is not None:
            self._xtx.addmm_(flat.t(), flat)
        self.count += nseq

    def act_sq_norm(self) -> Tensor:
        """(C_in,) mean over sequences of the squared L2 norm of each input channel."""
        if self._sq is None:
            raise ValueError("activation norms were not collected")
        return self._sq / max(self.count, 1)

    def hessian(self, consume: bool = False) -> Tensor:
        """(C_in, C_in) H = (2/K) sum_k x_k^T x_k: a new tensor, or with ``consume`` the accumulator itself,
        scaled in place and handed over (the statistic holds no Hessian afterwards; same values). At
        intermediate 28672 (70B) one fp32 copy is 3.3 GB, so the last user of a statistic consumes it."""
        if self._xtx is None:
            raise ValueError("the Hessian was not collected")
        if consume:
            h, self._xtx = self._xtx, None
            return h.mul_(2.0 / max(self.count, 1))
        return self._xtx * (2.0 / max(self.count, 1))
