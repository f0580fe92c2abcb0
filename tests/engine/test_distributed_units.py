"""The pieces of several-process runs that need no process group: the launcher's environment, the timeout,
which rank runs which batch, and the sharded statistics (reduced here by a stand-in for all_reduce that sums
the shards of two simulated ranks), against the one-process statistics."""

from __future__ import annotations

import pytest
import torch

from owlctl.core.stats import InputStatistics
from owlctl.engine import distributed
from owlctl.engine.distributed.stats import ShardedStatistics
from owlctl.engine.distributed.world import World
from owlctl.errors import InputError

LAUNCH = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_launcher_environment(monkeypatch):
    for k in LAUNCH:
        monkeypatch.delenv(k, raising=False)
    assert distributed.launched() is None and not distributed.secondary()
    for k, v in LAUNCH.items():
        monkeypatch.setenv(k, v)
    assert distributed.launched() == (1, 2, 1) and distributed.secondary()
    monkeypatch.setenv("RANK", "0")
    assert not distributed.secondary()


def test_timeout(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_s() == 1800.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_s() == 12.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(InputError, match="OWLCTL_DIST_TIMEOUT"):
            distributed.timeout_s()


def test_batches_go_round_robin_and_too_many_ranks_is_an_error():
    worlds = [World(r, 3, r, "gloo", "cpu") for r in range(3)]
    assert [w.batches(10, 2, "x") for w in worlds] == [[0, 3], [1, 4], [2]]
    rows, mine = worlds[1].take(torch.arange(10), 2, "x")
    assert rows.tolist() == [2, 3, 8, 9] and mine == [1, 4]
    rows, mine = worlds[2].take(torch.arange(9), 2, "x")  # the short last batch stays last
    assert rows.tolist() == [4, 5] and mine == [2]
    with pytest.raises(InputError, match="3 processes but only 2 batch"):
        worlds[0].batches(4, 2, "calibration sequences")


def _reduce_pair(shards: list[ShardedStatistics]) -> None:
    """Reduce two simulated ranks' shards: the stand-in for all_reduce returns the sum over both."""
    totals = {"sequence counts": torch.tensor([float(sum(s.count for s in shards))], dtype=torch.float64),
              "activation norms": shards[0]._rows + shards[1]._rows,
              "hessians": shards[0]._xtx64 + shards[1]._xtx64}

    class Summed:
        def all_reduce_(self, t: torch.Tensor, what: str) -> torch.Tensor:
            return totals[what].clone()

    for s in shards:
        s.reduce(Summed())


def test_sharded_statistics_equal_the_one_process_statistics():
    torch.manual_seed(0)
    batches = [torch.randn(2, 16, 24) * (1 + 10 * (torch.rand(24) > 0.9)) for _ in range(5)]
    one = InputStatistics(24, act_norm=True, hessian=True)
    for x in batches:
        one.add(x, 2)
    shards = []
    for rank in range(2):
        cursor = [0, 0]
        s = ShardedStatistics(24, act_norm=True, hessian=True, device="cpu", n_batches=5, cursor=cursor)
        for b in range(rank, 5, 2):
            cursor[1] = b
            s.add(batches[b], 2)
        shards.append(s)
    _reduce_pair(shards)
    for s in shards:
        assert s.count == one.count == 10
        assert torch.equal(s.act_sq_norm(), one.act_sq_norm())  # the same float32 additions, in batch order
        torch.testing.assert_close(s.hessian(), one.hessian(), rtol=1e-5, atol=1e-5)  # float64 vs float32 sums
    assert torch.equal(shards[0].hessian(), shards[1].hessian())
