"""The layer-by-layer driver (engine/calibration/driver.py) on one rank of several: this rank's batches go
through every block, the statistics are reduced before each decision (stats.py), and only rank 0 reports
progress and runs ``after`` (which writes the pruned blocks)."""

from __future__ import annotations

from typing import Any

from owlctl.engine.distributed.world import fingerprint


def run_blocks_sharded(world: Any, host: Any, input_ids: Any, *, device: str, batch_size: int, needs: frozenset,
                       decide: Any, propagate: str, progress: Any, description: str, after: Any,
                       activations: str) -> Any:
    from owlctl.engine.calibration.driver import _run_data_free, _run_with_data

    if not world.main:
        progress, after = None, None
    if input_ids is None:  # a data-free method: every rank prunes every block (cheap, identical)
        with world.work():
            return _run_data_free(host, device, decide, after, progress, description)
    mine, batches = world.take(input_ids, batch_size, "calibration sequences")  # fails alike on every rank
    n_batches = -(-input_ids.shape[0] // batch_size)
    with world.work(fingerprint(input_ids)):
        return _run_with_data(host, mine, device, batch_size, needs, decide, propagate, progress, description,
                              after, activations, shard=(world, batches, n_batches))
