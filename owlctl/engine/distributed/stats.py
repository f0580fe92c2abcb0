"""Per-Linear statistics of a sharded calibration pass, reduced so that they do not depend on the number of
processes (core/stats.py defines them; __init__.py says what is exact).

- activation norms (Wanda, profile): each batch's float32 contribution sum_t x_t^2 is kept in its own row
  (global batch index), the rows are summed over processes (every row has one non-zero contributor, so the
  sum is exact), and then added up in batch order in float32 -- the same additions, in the same order, as
  one process makes: bit-identical to a single process.
- Hessians (SparseGPT): each batch's float32 X^T X is added to a float64 accumulator, the accumulators are
  summed over processes in float64, and the total is rounded to float32. Which partial sums a process holds
  depends on N, so totals agree to float64 rounding (~1e-16 relative) before the final rounding to float32.
"""

from __future__ import annotations

from typing import Any

import torch

from owlctl.core.stats import InputStatistics


class ShardedStatistics(InputStatistics):
    """InputStatistics of this rank's batches; ``cursor[1]`` is the global index of the batch being added;
    ``reduce(world)`` makes them the statistics of all batches."""

    def __init__(self, c_in: int, *, act_norm: bool, hessian: bool, device: Any, n_batches: int,
                 cursor: list[int]) -> None:
        super().__init__(c_in, act_norm=False, hessian=False, device=device)
        self.cursor = cursor
        self._rows = torch.zeros(n_batches, c_in, dtype=torch.float32, device=device) if act_norm else None
        self._xtx64 = torch.zeros(c_in, c_in, dtype=torch.float64, device=device) if hessian else None

    def add(self, x: torch.Tensor, nseq: int) -> None:
        if x.shape[-1] != self.c_in:
            raise ValueError(f"input width {x.shape[-1]} != C_in {self.c_in}")
        flat = x.reshape(-1, self.c_in).float()
        if self._rows is not None:
            self._rows[self.cursor[1]] = flat.pow(2).sum(dim=0)
        if self._xtx64 is not None:
            self._xtx64 += (flat.t() @ flat).double()
        self.count += nseq

    def reduce(self, world: Any) -> None:
        counts = torch.tensor([float(self.count)], dtype=torch.float64, device=self._device())
        self.count = int(world.all_reduce_(counts, "sequence counts").item())
        if self._rows is not None:
            rows = world.all_reduce_(self._rows, "activation norms")
            self._sq = torch.zeros(self.c_in, dtype=torch.float32, device=rows.device)
            for r in rows:
                self._sq += r
            self._rows = None
        if self._xtx64 is not None:
            self._xtx = world.all_reduce_(self._xtx64, "hessians").float()
            self._xtx64 = None

    def _device(self) -> Any:
        t = self._rows if self._rows is not None else self._xtx64
        return t.device if t is not None else "cpu"


def reduce_all(world: Any, stats: dict[str, Any]) -> None:
    """Reduce each distinct statistic of a block once (q/k/v and gate/up share theirs)."""
    seen: set[int] = set()
    for st in stats.values():
        if id(st) not in seen:
            seen.add(id(st))
            st.reduce(world)


def share_solutions(world: Any, solved: list[tuple[Any, Any]]) -> list[Any]:
    """SparseGPT's per-matrix solutions: matrix k was solved on rank k % N; its pruned weight (written in
    place into ``solved[k][0]``, the Linear's weight) and mask are broadcast from there. ``solved[k][1]`` is
    the mask where this rank solved matrix k, else None. Returns every mask (bool)."""
    masks = []
    for k, (weight, mask) in enumerate(solved):
        src = k % world.size
        world.broadcast_(weight.data.view(torch.uint8), src, "pruned weights")
        buf = mask.to(torch.uint8) if mask is not None else torch.empty(weight.shape, dtype=torch.uint8,
                                                                          device=weight.device)
        masks.append(world.broadcast_(buf, src, "masks").bool())
    return masks
