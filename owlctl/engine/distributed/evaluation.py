"""Perplexity on several processes: this rank's batches of windows, each window's mean cross-entropy
gathered in window order (every window has one owner, so the gathered values are the one-process values
and the perplexity is bit-identical)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def window_losses(wins: torch.Tensor, batch_size: int, losses: Callable[[torch.Tensor, bool], list]) -> list:
    """Each window's loss, computed by ``losses(windows, main)`` (main: whether this process reports
    progress): on this process alone, or, under a launcher, on this rank's share and gathered in order."""
    from owlctl.engine.distributed import current

    world = current()
    if world is None:
        return losses(wins, True)
    from owlctl.engine.distributed.world import fingerprint

    mine, batches = my_windows(world, wins, batch_size)  # too many processes: fails alike on every rank
    with world.work(fingerprint(wins)):
        return gather_losses(world, losses(mine, world.main), batches, batch_size, wins.shape[0])


def my_windows(world: Any, wins: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, list[int]]:
    """(this rank's windows, its batch indices); batch b = windows b*B .. (b+1)*B-1, run by rank b % N."""
    return world.take(wins, batch_size, "evaluation windows")


def gather_losses(world: Any, mine: list, batches: list[int], batch_size: int, n_win: int) -> list:
    """Every window's loss, in window order, from each rank's ``mine`` (its windows' losses in order)."""
    device = mine[0].device if mine else "cpu"
    idx = torch.cat([torch.arange(b * batch_size, min((b + 1) * batch_size, n_win)) for b in batches])
    full = torch.zeros(n_win, dtype=torch.float32, device=device)
    full[idx.to(device)] = torch.stack(mine).float()
    world.all_reduce_(full, "window losses")
    return list(full)
