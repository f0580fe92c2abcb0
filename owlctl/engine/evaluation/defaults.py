"""What ``eval`` measures when not told: the reference protocol (WikiText-2 at 2048 tokens) for hub and local
models, builtin:wiki at 512 for the built-in models and checkpoints pruned from them."""

from __future__ import annotations

from typing import Sequence

DEFAULT_EVAL = {"data": ("wikitext2",), "seqlen": 2048}


BUILTIN_EVAL = {"data": ("builtin:wiki",), "seqlen": 512}


def eval_defaults(model_id: str, data: Sequence[str] | None = None, seqlen: int | None = None,
                  context: int | None = None) -> tuple[tuple[str, ...], int]:
    """(data sources, seqlen) for a model id (a checkpoint reports the id it was pruned from); the default
    seqlen is capped at the model's ``context``."""
    from owlctl.engine.models import is_builtin

    base = BUILTIN_EVAL if is_builtin(model_id) else DEFAULT_EVAL
    if seqlen is None:
        seqlen = base["seqlen"] if context is None else min(base["seqlen"], context)
    return tuple(data) if data else base["data"], seqlen
