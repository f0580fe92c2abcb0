"""Building the level database block by block on the uniform path (see database.py for why that path).

One pass of the calibration driver (run_blocks, pruned propagation) over a model held in memory: per block,
the observing forward of the dense block gives the statistics, ``decide`` prunes the block at every level
from its dense weights and writes them, and leaves it at the target level, whose forward makes the next
block's inputs. A finished block is not rebuilt: on resume its target level is read back (its statistics
forward still runs; it is what the next block's inputs need anyway).
"""

from __future__ import annotations

import time
from typing import Any

from owlctl.engine.search.database import LevelStore, level_targets
from owlctl.engine.search.space import Space


def build_levels(host: Any, calib_ids: Any, method: str, opts: Any, space: Space, store: LevelStore,
                 *, device: str, batch_size: int, progress: Any = None, activations: str = "device") -> float:
    """Write every missing block of the database; the model's blocks end at the target level (uniform).
    ``host``: an in-memory host (engine/models/hosts.InMemory). Returns the seconds spent."""
    from owlctl.core.methods import get
    from owlctl.engine.calibration.driver import run_blocks
    from owlctl.engine.calibration.prune import prune_block

    t0 = time.perf_counter()
    layout = host.layout
    needs = get(method).needs
    targets = level_targets(space)
    order = sorted(targets, key=lambda k: (k == 0, k))  # the target level last: it stays in the block

    def decide(i: int, _block: Any, linears: dict, stats: dict) -> None:
        if store.done(i):
            set_block(layout, i, store.weights(i, 0))
            return
        dense = {n: lin.weight.detach().clone() for n, lin in linears.items()}
        levels: dict[int, dict] = {}
        for k in order:
            set_block(layout, i, dense)
            prune_block(layout.block_name(i), i, linears, stats, method, targets[k], opts, keep_statistics=True)
            levels[k] = {n: lin.weight.detach().cpu().clone() for n, lin in linears.items()}
        store.write_block(i, {n: w.cpu() for n, w in dense.items()}, levels)

    run_blocks(host, calib_ids if needs else None, device=device, batch_size=batch_size, needs=needs,
               decide=decide, propagate="pruned", progress=progress,
               description=f"levels ({method}, {len(space.levels)} per block)", activations=activations)
    return time.perf_counter() - t0


def set_block(layout: Any, i: int, weights: dict) -> None:
    """Copy ``weights`` ({linear name: tensor}) into block i's prunable Linears."""
    for name, lin in layout.linears(i).items():
        lin.weight.data.copy_(weights[name])
