"""The search itself: seeds, then a (1 + lambda) evolution with level-switch mutations and two-stage
selection (the scheme of EvoPress, Sieberling et al. 2024, written here from its description).

1. Every seed (uniform, OWL for each (M, lambda) of the grid, snapped onto the level grid) is scored on all
   W windows; the best is the parent (ties: the earlier seed, uniform first).
2. Each generation makes ``offspring`` children of the parent, each with 1..``max_swaps`` level switches
   (space.mutate: the mean stays exact), scores them on the first few windows (an eighth of W, a quarter of
   W in the last third of the budget: more tokens for the last rounds), scores the best ``survivors`` of them
   on all W windows, and the best of those replaces the parent if its objective is lower.
3. It stops when the budget is spent, or earlier when ``patience`` generations in a row brought no child
   that was not scored before (a small space, or a winner whose neighbourhood is exhausted): a time budget
   on a tiny model would otherwise spin on cached scores.

The parent only ever changes to a candidate with a lower objective on all W windows, so the winner's
objective is <= every seed's. Everything is deterministic for a seed: the random generator is seeded and
the only other input is the objective, which a resumed run reads from the evaluation log. Pure Python;
``score(offsets, nwin)`` is the only link to the model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from owlctl.engine.search.space import Space, mutate


@dataclass(frozen=True)
class Budget:
    """Stop after ``evaluations`` children, or when ``seconds`` of search time are spent (one of the two)."""

    evaluations: int | None = None
    seconds: float | None = None

    def as_dict(self) -> dict:
        if self.evaluations is not None:
            return {"kind": "evaluations", "value": self.evaluations}
        return {"kind": "minutes", "value": round((self.seconds or 0.0) / 60.0, 4)}


@dataclass(frozen=True)
class EvolveSettings:
    offspring: int = 8
    survivors: int = 2
    max_swaps: int = 3
    seed: int = 0
    patience: int = 20  # generations in a row without one new child before the search stops ("exhausted")


@dataclass
class Outcome:
    winner: tuple[int, ...]
    objective: float
    seeds: list[dict]
    rounds: list[dict] = field(default_factory=list)
    evaluations: int = 0
    improvements: int = 0
    stopped: str = "budget"  # "budget" | "exhausted" (no new neighbour of the winner for `patience` rounds)


def score_seeds(seeds: Sequence[dict], score: Callable[[tuple, int], float], nwin: int) -> list[dict]:
    """Each seed ({name, offsets, ...}) with its objective on ``nwin`` windows."""
    return [{**s, "objective": score(tuple(s["offsets"]), nwin)} for s in seeds]


def evolve(space: Space, seeds: Sequence[dict], score: Callable[[tuple, int], float], nwin: int,
           settings: EvolveSettings, budget: Budget, clock: Callable[[], float],
           report: Callable[[dict], None] | None = None) -> Outcome:
    """Run the search (module docstring). ``clock()`` is the search seconds spent so far."""
    scored = score_seeds(seeds, score, nwin)
    best = min(range(len(scored)), key=lambda i: (scored[i]["objective"], i))
    out = Outcome(tuple(scored[best]["offsets"]), scored[best]["objective"], scored)
    rng = random.Random(settings.seed)
    seen = {tuple(s["offsets"]) for s in scored}
    gen = stale = 0
    while _left(budget, out.evaluations, clock()) > 0 and stale < settings.patience:
        gen += 1
        n = min(settings.offspring, _left(budget, out.evaluations, clock()))
        children = [_child(space, out.winner, rng, settings.max_swaps, seen) for _ in range(n)]
        fresh = [c for c in children if c not in seen]
        stale = 0 if fresh else stale + 1
        seen.update(fresh)
        screen = _screen_windows(nwin, _spent(budget, out.evaluations, clock()))
        first = [score(c, screen) for c in children]
        out.evaluations += n
        order = sorted(range(n), key=lambda i: (first[i], i))[:settings.survivors]
        full = [(score(children[i], nwin), i) for i in order]
        value, i = min(full)
        improved = value < out.objective
        if improved:
            out.winner, out.objective = children[i], value
            out.improvements += 1
        rnd = {"generation": gen, "evaluations": out.evaluations, "best_objective": out.objective,
               "screen_windows": screen, "improved": improved, "seconds": round(clock(), 2)}
        out.rounds.append(rnd)
        if report is not None:
            report(rnd)
    out.stopped = "budget" if stale < settings.patience else "exhausted"
    return out


def _child(space: Space, parent: tuple, rng: random.Random, max_swaps: int, seen: set) -> tuple[int, ...]:
    """A mutation of ``parent`` not seen before where a few tries find one (a switch can undo another, and
    a small space runs out of new neighbours); else the last try."""
    c = tuple(parent)
    for _ in range(16):
        c = mutate(space, parent, rng, max_swaps)
        if c != tuple(parent) and c not in seen:
            return c
    return c


def _left(budget: Budget, evaluations: int, seconds: float) -> int:
    """Children the budget still allows (a large number for a time budget with time left)."""
    if budget.evaluations is not None:
        return max(0, budget.evaluations - evaluations)
    return 1 << 30 if seconds < (budget.seconds or 0.0) else 0


def _spent(budget: Budget, evaluations: int, seconds: float) -> float:
    """Fraction of the budget spent, in [0, 1]."""
    if budget.evaluations is not None:
        return min(1.0, evaluations / max(1, budget.evaluations))
    return min(1.0, seconds / max(1e-9, budget.seconds or 0.0))


def _screen_windows(nwin: int, spent: float) -> int:
    return max(1, nwin // 4 if spent >= 2.0 / 3.0 else nwin // 8)

