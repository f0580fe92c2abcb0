"""Allocation documents (owlctl.allocation) from a profile: OWL's per-block sparsity or mixed N:M (SPEC 3, 4),
or the uniform baseline. Pure math on the profile's counts; no torch, milliseconds.

Defaults: unstructured M = 5, lambda = 0.08 (the paper's LLaMA-7B setting); mixed N:M M = 6, lambda = 2
(the reference README's N:M example)."""

from __future__ import annotations

import math
from typing import Any

from owlctl.core import allocation as core
from owlctl.errors import InputError
from owlctl.formats.allocation import build_allocation_doc
from owlctl.formats.profile import block_names, block_numels, block_ratios, m_key, validate_profile
from owlctl.options import Allocator, Balance, Clamp, check_choice

UNSTRUCTURED_DEFAULTS = {"outlier_m": 5.0, "lam": 0.08}


NM_DEFAULTS = {"outlier_m": 6.0, "lam": 2.0}


def parse_pattern(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """"3:8" -> (n_keep=3, m=8); None -> None (unstructured). Bad input -> InputError with the N:M hint."""
    if text is None:
        return None
    try:
        if isinstance(text, tuple):
            return core.parse_pattern(f"{text[0]}:{text[1]}")
        return core.parse_pattern(text)
    except ValueError as e:
        raise InputError(f"--pattern: {e}", hint=core.NM_HINT) from None


def _check_fraction(flag: str, value: float, upper_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value and (
        value < 1.0 if upper_open else value <= 1.0)
    if not ok:
        raise InputError(f"{flag} must be a fraction in [0, 1), got {value}",
                         hint="sparsity is the FRACTION of weights pruned, e.g. 0.7 for 70%")


def allocation_from_profile(
    profile_doc: dict,
    profile_sha: str | None,
    profile_path: str | None,
    *,
    target_sparsity: float | None = None,
    outlier_m: float | None = None,
    lam: float | None = None,
    allocator: str = "owl",
    pattern: str | tuple[int, int] | None = None,
    balance: str = "blocks",
    clamp: str = "redistribute",
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
    special: bool = False,
    command: str = "allocate",
) -> dict:
    """Compute the allocation document for a (validated or in-memory) profile. Raises InputError on bad input."""
    validate_profile(profile_doc, source=profile_path or "profile")
    check_choice("--allocator", allocator, Allocator)
    check_choice("--balance", balance, Balance)
    check_choice("--clamp", clamp, Clamp)
    nm = parse_pattern(pattern)
    defaults = NM_DEFAULTS if nm else UNSTRUCTURED_DEFAULTS
    m_val = defaults["outlier_m"] if outlier_m is None else float(outlier_m)
    lam_val = defaults["lam"] if lam is None else float(lam)
    _check_knobs(outlier_m, m_val, lam, lam_val, min_sparsity, max_sparsity)
    target_sparsity = _check_target(nm, target_sparsity, allocator, balance, clamp, special, min_sparsity,
                                    max_sparsity)
    numels = block_numels(profile_doc)
    have_m = {m_key(x) for x in profile_doc["outlier_m"]}
    if allocator == "uniform" and outlier_m is None and m_key(m_val) not in have_m:
        m_val = None  # the ratios are only shown beside a uniform allocation; don't fail on a default M
    ratios = block_ratios(profile_doc, m_val) if m_val is not None else None
    params = {"allocator": allocator, "target_sparsity": target_sparsity, "outlier_m": m_val,
              "lambda": lam_val if allocator == "owl" else None, "balance": balance, "clamp": clamp,
              "min_sparsity": float(min_sparsity), "max_sparsity": float(max_sparsity), "special": bool(special)}
    try:
        if nm:
            n_keeps = (core.mixed_nm_keep(ratios, nm[0], nm[1], lam_val, special=special) if allocator == "owl"
                       else [nm[0]] * len(numels))
            sparsities = None
        else:
            n_keeps = None
            sparsities = (core.owl_sparsities(ratios, target_sparsity, lam_val,
                                              weights=numels if balance == "params" else None, clamp=clamp,
                                              min_sparsity=min_sparsity, max_sparsity=max_sparsity)
                          if allocator == "owl" else core.uniform_sparsities(len(numels), target_sparsity))
    except ValueError as e:
        raise InputError(str(e)) from None
    return build_allocation_doc(
        block_names=block_names(profile_doc), block_numels=numels, outlier_pcts=ratios,
        model=profile_doc["model"], params=params, pattern=_pattern_dict(nm),
        sparsities=sparsities, n_keeps=n_keeps, profile_sha256=profile_sha, profile_path=profile_path,
        command=command, profile_calibration=profile_doc.get("calibration"))


def _check_knobs(outlier_m: Any, m_val: float, lam: Any, lam_val: float, min_sparsity: float,
                 max_sparsity: float) -> None:
    if not (math.isfinite(m_val) and m_val > 0):
        raise InputError(f"--outlier-m must be positive, got {outlier_m}")
    if not (math.isfinite(lam_val) and lam_val >= 0):
        raise InputError(f"--lambda must be >= 0, got {lam}",
                         hint="lambda sets the spread of per-block sparsities (span 2*lambda); 0 means uniform")
    _check_fraction("--min-sparsity", min_sparsity)
    _check_fraction("--max-sparsity", max_sparsity)
    if min_sparsity > max_sparsity:
        raise InputError(f"--min-sparsity {min_sparsity} is above --max-sparsity {max_sparsity}")


def _check_target(nm: tuple[int, int] | None, target: float | None, allocator: str, balance: str, clamp: str,
                  special: bool, min_sparsity: float, max_sparsity: float) -> float | None:
    """The target sparsity the pattern allows: None for mixed N:M (it comes from N:M), else a checked S."""
    if nm:
        n_keep, m = nm
        base = 1.0 - n_keep / m
        if target is not None and abs(target - base) > 1e-9:
            raise InputError(f"--target-sparsity {target} conflicts with --pattern {n_keep}:{m} ({base:.1%} sparse)",
                             hint="with --pattern the sparsity comes from N:M; drop --target-sparsity")
        if balance != "blocks":
            raise InputError("--balance params applies to unstructured allocation only",
                             hint="mixed N:M rounds each block to whole N steps; drop --balance")
        return None
    if special:
        raise InputError("--special applies to mixed N:M only", hint="add --pattern N:M, or drop --special")
    if target is None:
        raise InputError("--target-sparsity is required for unstructured allocation",
                         hint="e.g. `owlctl allocate profile.json -s 0.7`, or give --pattern N:M")
    _check_fraction("--target-sparsity", target)
    if allocator == "owl" and clamp == "redistribute" and not min_sparsity <= target <= max_sparsity:
        raise InputError(f"--target-sparsity {target} is outside [--min-sparsity {min_sparsity}, "
                         f"--max-sparsity {max_sparsity}]", hint="raise --max-sparsity (below 1)")
    return target


def uniform_allocation(model: dict, block_names: list[str], block_numels: list[int],
                       target_sparsity: float | None = None,
                       pattern: str | tuple[int, int] | None = None, command: str = "prune") -> dict:
    """The uniform allocation for a model without a profile (`prune --uniform`); profile is null."""
    nm = parse_pattern(pattern)
    if not block_names or len(block_names) != len(block_numels):
        raise InputError("uniform allocation needs one name and one numel per block")
    if nm is None:
        if target_sparsity is None:
            raise InputError("--target-sparsity is required for unstructured pruning", hint="e.g. -s 0.5")
        _check_fraction("--target-sparsity", target_sparsity)
    elif target_sparsity is not None and abs(target_sparsity - (1.0 - nm[0] / nm[1])) > 1e-9:
        raise InputError(f"--target-sparsity {target_sparsity} conflicts with --pattern {nm[0]}:{nm[1]}",
                         hint="with --pattern the sparsity comes from N:M; drop --target-sparsity")
    L = len(block_names)
    params = {"allocator": "uniform", "target_sparsity": None if nm else float(target_sparsity),
              "outlier_m": None, "lambda": None, "balance": "blocks", "clamp": "none",
              "min_sparsity": 0.0, "max_sparsity": 0.99, "special": False}
    return build_allocation_doc(
        block_names=list(block_names), block_numels=list(block_numels), outlier_pcts=None, model=model,
        params=params, pattern=_pattern_dict(nm),
        sparsities=None if nm else [float(target_sparsity)] * L, n_keeps=[nm[0]] * L if nm else None,
        command=command)


def _pattern_dict(nm: tuple[int, int] | None) -> dict[str, Any]:
    return {"kind": "unstructured"} if nm is None else {"kind": "nm", "n_keep": nm[0], "m": nm[1]}
