"""Checks that need no weights, run before any weight is read (a mistake costs seconds, not a 7B load).

Everything here reads at most config.json, a profile or an allocation, and never imports torch.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from owlctl.errors import InputError
from owlctl.options import finite

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
                 "max_seq_len")


def context_length(config: dict) -> int | None:
    """The longest sequence the model's positions cover, from config.json (None when it does not say)."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in _CONTEXT_KEYS:
        v = cfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_seqlen(seqlen: int | None, config: dict, spec: str, flag: str = "--seqlen") -> None:
    """Refuse windows longer than the model's positions (eval did; profile and prune accepted them)."""
    if seqlen is None:
        return
    limit = context_length(config)
    if limit is not None and seqlen > limit:
        raise InputError(f"{flag} {seqlen} is longer than the {limit} positions of {spec} "
                         "(max_position_embeddings)", hint=f"use {flag} {limit} or less")


def prune_pattern(text: str | None) -> tuple[int, int] | None:
    """--pattern N:M for pruning: N weights kept per group of M, 1 <= N <= M. 0:M would prune everything
    (as -s 1.0 would, which is refused too)."""
    if text is None:
        return None
    from owlctl.engine.allocation import parse_pattern

    nm = parse_pattern(text)
    assert nm is not None
    if nm[0] < 1:
        raise InputError(f"--pattern {text} keeps no weight in any group (100% sparse)",
                         hint="N is the number of weights KEPT per group of M, e.g. 2:4 (50%) or 3:8")
    return nm


def check_pattern_fits(nm: tuple[int, int] | None, config: dict, spec: str) -> None:
    """M must divide the input width of every prunable Linear (shapes from config.json)."""
    if nm is None:
        return
    from owlctl.families import config_input_widths

    widths = config_input_widths(config)
    if not widths:
        return  # unknown family: checked on the loaded model instead
    bad = sorted(w for w in widths if w % nm[1])
    if bad:
        good = sorted(m for m in (2, 4, 8, 16, 32) if all(w % m == 0 for w in widths))
        raise InputError(f"N:M with M={nm[1]} needs M to divide every input width, but {spec} has Linears "
                         f"with {', '.join(map(str, bad))} inputs",
                         hint=f"choose M among {', '.join(map(str, good)) or 'the divisors of the widths'}")


def check_owl_knobs(outlier_m: float | None, lam: float | None, target: float | None = None) -> None:
    from owlctl.errors import InputError

    try:
        finite("--outlier-m", outlier_m, lo=0.0, lo_open=True)
        finite("--lambda", lam, lo=0.0)
    except InputError as e:
        raise InputError(e.message, hint="the paper's values: -m 5 -l 0.08 (unstructured), -m 6 -l 2 (mixed "
                                         "N:M); -l 0 gives the uniform allocation") from None
    if target is not None:
        finite("--target-sparsity", target, lo=0.0, hi=1.0, hi_open=True)


def require(module: str, what: str, extra: str) -> None:
    """A clear error (before any work) when an optional dependency is missing."""
    try:
        missing = importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a broken install, or blocked in sys.modules
        missing = True
    if missing:
        raise InputError(f"{what} needs the Python package {module!r}, which is not installed",
                         hint=f"pip install 'owlctl[{extra}]'")


def model_inputs(spec: str) -> list[Any]:
    """Local paths a command reads for ``spec`` (so -o can be refused when it is one of them)."""
    from pathlib import Path

    p = Path(spec).expanduser()
    return [p] if p.exists() else []
