"""One search on a loaded model: dense reference, level database, seeds, evolution, the real-prune check,
and the ``params.search`` section of the allocation document it writes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.engine.search.evolve import Budget, EvolveSettings, Outcome, evolve, score_seeds
from owlctl.engine.search.space import Space, key, mixed_offsets, unstructured_offsets

OBJECTIVE = ("kl: mean over held-out positions of KL(P_dense || Q_candidate), the dense model's top-k tokens "
             "kept and the rest pooled into one outcome")


@dataclass(frozen=True)
class SearchJob:
    """What one search needs besides the model: the space, the seeds' grid and the budget."""

    method: str
    opts: Any  # core.methods.MethodOptions
    space: Space
    outlier_ms: tuple[float, ...]
    lambdas: tuple[float, ...]
    balance: str
    budget: Budget
    settings: EvolveSettings
    topk: int
    db: Path
    owl_only: bool = False
    verify: bool = True
    activations: str = "device"  # where the driver keeps hidden states between blocks (--offload-activations)


def make_seeds(space: Space, profile_doc: dict, job: SearchJob, numels: Sequence[int]) -> list[dict]:
    """Uniform, then OWL for every (M, lambda) of the grid, on the level grid (space.snap)."""
    from owlctl.core.allocation import owl_sparsities
    from owlctl.formats.profile import block_ratios

    seeds = [{"name": "uniform", "outlier_m": None, "lambda": None, "offsets": (0,) * space.num_blocks}]
    for m in job.outlier_ms:
        ratios = block_ratios(profile_doc, m)
        for lam in job.lambdas:
            if space.nm is not None:
                off = mixed_offsets(space, ratios, lam)
            else:
                s = owl_sparsities(ratios, space.base, lam, weights=numels if job.balance == "params" else None,
                                   clamp="redistribute", min_sparsity=space.value(space.k_lo),
                                   max_sparsity=space.value(space.k_hi))
                off = unstructured_offsets(space, s)
            seeds.append({"name": f"owl M {m:g} lambda {lam:g}", "outlier_m": float(m), "lambda": float(lam),
                          "offsets": off})
    return seeds


class Candidates:
    """Puts a candidate's levels into the model (only the blocks that differ) and scores it."""

    def __init__(self, layout: Any, store: Any, objective: Any) -> None:
        self.layout, self.store, self.objective = layout, store, objective
        self.current: list[int | None] = [0] * layout.num_blocks  # build_levels leaves every block at 0

    def prepare(self, offsets: Sequence[int]) -> None:
        from owlctl.engine.search.build import set_block

        for i, k in enumerate(offsets):
            if self.current[i] != k:
                set_block(self.layout, i, self.store.weights(i, k))
                self.current[i] = k

    def score(self, offsets: tuple, nwin: int) -> float:
        return self.objective.score(key(offsets), nwin, lambda: self.prepare(offsets))


def run_search(model: Any, layout: Any, calib: Any, wins: Any, profile_doc: dict, store: Any, job: SearchJob, *,
               device: str, batch_size: int, t_start: float, progress: Any = None) -> dict:
    """The whole search (module docstring); returns the result: winner offsets, objectives, rounds, timings."""
    from owlctl.engine.search.build import build_levels
    from owlctl.engine.search.objective import EvaluationLog, Objective, dense_reference, windows_sha256

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ref = dense_reference(_whole(model, device), wins, job.topk, device, progress)
    seconds["reference"] = time.perf_counter() - t0
    seconds["database"] = build_levels(_host(model, layout), calib.input_ids, job.method, job.opts, job.space,
                                       store, device=device, batch_size=batch_size, progress=progress,
                                       activations=job.activations)
    _whole(model, device)
    log = EvaluationLog(Path(job.db) / f"evaluations-{windows_sha256(wins)[:12]}-k{job.topk}.jsonl")
    prior = log.seconds
    t_run = time.perf_counter()

    def clock() -> float:
        return prior + (time.perf_counter() - t_run) if prior else time.perf_counter() - t_start

    objective = Objective(model, wins, ref, log, device, clock)
    cands = Candidates(layout, store, objective)
    numels = [sum(lin.weight.numel() for lin in layout.linears(i).values()) for i in range(layout.num_blocks)]
    seeds = make_seeds(job.space, profile_doc, job, numels)
    t0 = time.perf_counter()
    try:
        outcome = _search(job, seeds, cands.score, len(wins), clock, progress)
    finally:
        log.close()
    seconds["search"] = time.perf_counter() - t0
    result = {"outcome": outcome, "seconds": seconds, "window_forwards": objective.computed,
              "ref": ref, "candidates": cands, "objective": objective}
    return result


def _search(job: SearchJob, seeds: list[dict], score: Callable, nwin: int, clock: Callable, progress: Any) -> Outcome:
    from owlctl.progress import interactive, note
    from owlctl.progress import task as progress_task

    if job.owl_only:
        scored = score_seeds(seeds, score, nwin)
        best = min(range(len(scored)), key=lambda i: (scored[i]["objective"], i))
        return Outcome(tuple(scored[best]["offsets"]), scored[best]["objective"], scored, stopped="owl-grid")
    total = job.budget.evaluations
    live = interactive(progress)
    with progress_task(progress if live else None, "search", total) as task:
        last = [0]

        def report(rnd: dict) -> None:
            line = (f"generation {rnd['generation']}, best {rnd['best_objective']:.6f}"
                    f"{' (improved)' if rnd['improved'] else ''}, {rnd['evaluations']} children, "
                    f"{rnd['seconds'] / 60:.1f} min")
            if live:  # a bar on a terminal
                task.advance(rnd["evaluations"] - last[0], info=line)
                last[0] = rnd["evaluations"]
            else:  # one plain line per round on stderr (nothing with -q)
                note(f"search {line}")

        return evolve(job.space, seeds, score, nwin, job.settings, job.budget, clock, report)


def _host(model: Any, layout: Any) -> Any:
    """The model as the calibration driver's host, the whole model back on the CPU first (the driver moves
    one block at a time to the device)."""
    from owlctl.engine.models.hosts import InMemory

    return InMemory(_whole(model, "cpu"), layout)


def _whole(model: Any, device: str) -> Any:
    """The whole model on ``device`` for the objective's forwards; on the CPU for the block drivers, which
    move one block at a time to the device."""
    if device != "cpu" or next(model.parameters()).device.type != "cpu":
        model.to(device)
    return model


def verify(model: Any, layout: Any, alloc: dict, job: SearchJob, calib: Any, wins: Any, result: dict, *,
           device: str, batch_size: int) -> float:
    """The winner's objective after a real ``prune --allocation`` (sequential: every block calibrated on
    the pruned path of this allocation), from the dense weights kept in the database."""
    from owlctl.engine.calibration.prune import prune_model
    from owlctl.engine.search.build import set_block
    from owlctl.engine.search.objective import window_kl

    cands: Candidates = result["candidates"]
    for i in range(layout.num_blocks):
        set_block(layout, i, cands.store.dense(i))
        cands.current[i] = None
    prune_model(_host(model, layout), alloc, job.method, job.opts, calib, device=device, batch_size=batch_size,
                activations=job.activations)
    _whole(model, device)
    values = [window_kl(model, wins[w], result["ref"][w], device) for w in range(len(wins))]
    return sum(values) / len(values)
