"""Pieces several ops share: model + calibration setup, defaults for the built-in model, timestamps."""

from __future__ import annotations

import datetime as _dt
import warnings
from typing import Any

from owlctl.engine.loading import is_builtin
from owlctl.errors import OwlctlWarning

# The reference protocol is 128 x 2048 tokens of C4; the built-in models default to what fits this 2-core box.
DEFAULT_CALIB = {"source": "c4", "nsamples": 128, "seqlen": 2048}
BUILTIN_CALIB = {"source": "builtin:wiki", "nsamples": 32, "seqlen": 512}


def calib_defaults(model: str, calib: str | None, nsamples: int | None, seqlen: int | None) -> tuple[str, int, int]:
    base = BUILTIN_CALIB if is_builtin(model) else DEFAULT_CALIB
    return (calib or base["source"], nsamples or base["nsamples"], seqlen or base["seqlen"])


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def peak_rss_mb() -> float:
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def model_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def warn(msg: str) -> None:
    """A warning for the user (the CLI shows it on stderr as `warning: ...`)."""
    warnings.warn(msg, OwlctlWarning, stacklevel=2)


def resolve_bos(tok: Any, requested: str) -> str:
    """--bos auto | always | never -> "always" | "never" for this tokenizer, warning when a tokenizer that adds
    a BOS to every sequence runs without one per window."""
    from owlctl.engine.data import bos_warning
    from owlctl.engine.data import resolve_bos as _resolve

    resolved = _resolve(tok, requested)
    msg = bos_warning(tok, resolved)
    if msg:
        warn(msg)
    return resolved
