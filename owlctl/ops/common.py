"""Pieces several ops share: model + calibration setup, defaults for the built-in model, timestamps."""

from __future__ import annotations

import datetime as _dt
import warnings
from typing import Any

from owlctl.engine.memory import peak_rss_mb  # noqa: F401 (ops report it)
from owlctl.engine.models import is_builtin
from owlctl.errors import OwlctlWarning

# The reference protocol is 128 x 2048 tokens of C4; the built-in models default to what fits this 2-core box.
DEFAULT_CALIB = {"source": "c4", "nsamples": 128, "seqlen": 2048}
BUILTIN_CALIB = {"source": "builtin:wiki", "nsamples": 32, "seqlen": 512}


def calib_defaults(model: str, calib: str | None, nsamples: int | None, seqlen: int | None,
                   context: int | None = None) -> tuple[str, int, int]:
    """(source, nsamples, seqlen) with the defaults filled in; 0 or less is an error, not "the default".
    The default seqlen is capped at the model's ``context`` (a 512-position model calibrates at 512)."""
    from owlctl.errors import InputError

    base = BUILTIN_CALIB if is_builtin(model) else DEFAULT_CALIB
    if nsamples is not None and nsamples < 1:
        raise InputError(f"--nsamples must be >= 1, got {nsamples}")
    if seqlen is not None and seqlen < 2:
        raise InputError(f"--seqlen must be >= 2, got {seqlen}")
    if seqlen is None:
        seqlen = base["seqlen"] if context is None else min(base["seqlen"], context)
    return (calib or base["source"], base["nsamples"] if nsamples is None else nsamples, seqlen)


def output_claim(path: Any, force: bool, kind: str, inputs: Any = (), need_bytes: int | None = None) -> Any:
    """An OutputClaim for ``path``, or a do-nothing context when there is no output."""
    from contextlib import nullcontext

    from owlctl.formats.claims import OutputClaim

    if path is None:
        return nullcontext(None)
    return OutputClaim(path, force=force, kind=kind, inputs=inputs, need_bytes=need_bytes)


def weights_bytes(path: Any) -> int | None:
    """Bytes of a local model's weight files (an estimate of what a pruned copy needs on disk)."""
    from pathlib import Path

    if path is None:
        return None
    files = list(Path(path).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) or None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


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


def hub_of(cfg: Any) -> Any:
    """The hub settings of a command's config (``--revision``, ``--trust-remote-code``), as a context."""
    from owlctl.engine.models import hub

    return hub(getattr(cfg, "revision", None), bool(getattr(cfg, "trust_remote_code", False)))
