"""Building the level database block by block on the uniform path (see database.py for why that path).

Its own block loop over the calibration driver's pieces (capture_inputs, _block_forward, collect_statistics,
prune_block), so it does not depend on how run_blocks drives a prune. Per block: one observing forward of
the dense block (statistics), one prune per level from the dense weights, one forward of the block at the
target level to make the next block's inputs. A finished block is not rebuilt: on resume its target level
is read back and only its forward runs.
"""

from __future__ import annotations

import time
from typing import Any

from owlctl.engine.search.database import LevelStore, level_targets
from owlctl.engine.search.space import Space


def build_levels(model: Any, layout: Any, calib_ids: Any, method: str, opts: Any, space: Space, store: LevelStore,
                 *, device: str, batch_size: int, progress: Any = None) -> float:
    """Write every missing block of the database; the model's blocks end at the target level (uniform).
    Returns the seconds spent."""
    import torch

    from owlctl.core.methods import get
    from owlctl.engine.calibration.capture import _block_forward, capture_inputs
    from owlctl.progress import task as progress_task

    t0 = time.perf_counter()
    needs = get(method).needs
    model.config.use_cache = False
    with torch.inference_mode():
        inputs = capture_inputs(model, layout, calib_ids, device, batch_size) if needs else None
        with progress_task(progress, f"levels ({method})", layout.num_blocks) as task:
            for i in range(layout.num_blocks):
                block = layout.blocks[i]
                if device != "cpu":
                    block.to(device)
                if store.done(i):
                    set_block(layout, i, store.weights(i, 0))
                else:
                    _build_block(layout, i, inputs, method, opts, space, store, device, needs)
                if inputs is not None:
                    inputs.hidden = [_block_forward(block, inputs, i, b) for b in range(len(inputs.hidden))]
                if device != "cpu":
                    block.to("cpu")
                task.advance(1, info=f"block {i + 1}/{layout.num_blocks}, {len(space.levels)} levels")
    return time.perf_counter() - t0


def _build_block(layout: Any, i: int, inputs: Any, method: str, opts: Any, space: Space, store: LevelStore,
                 device: str, needs: frozenset) -> None:
    from owlctl.engine.calibration.capture import _block_forward
    from owlctl.engine.calibration.driver import Timings, collect_statistics
    from owlctl.engine.calibration.prune import prune_block

    linears = layout.linears(i)
    dense = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    stats: dict = {}
    if inputs is not None:
        current = [0]
        with collect_statistics(layout, i, needs, device, Timings(), current) as stats:
            for b in range(len(inputs.hidden)):
                current[0] = inputs.nseq[b]
                _block_forward(layout.blocks[i], inputs, i, b)
    levels: dict[int, dict] = {}
    targets = level_targets(space)
    for k in sorted(targets, key=lambda k: (k == 0, k)):  # the target level last: it stays in the block
        set_block(layout, i, dense)
        prune_block(layout.block_name(i), i, linears, stats, method, targets[k], opts)
        levels[k] = {n: lin.weight.detach().cpu().clone() for n, lin in linears.items()}
    store.write_block(i, {n: w.cpu() for n, w in dense.items()}, levels)


def set_block(layout: Any, i: int, weights: dict) -> None:
    """Copy ``weights`` ({linear name: tensor}) into block i's prunable Linears."""
    for name, lin in layout.linears(i).items():
        lin.weight.data.copy_(weights[name])
