"""The ``owlctl.allocation/2`` contract: one sparsity (or N of N:M) per decoder block (the type is
formats.documents.AllocationDoc; /1 files are read and upgraded).

    {envelope: schema, owlctl_version, created, command, model (the profile's), seconds,
     "profile": {"sha256": str|null, "path": str|null,             # null for `prune --uniform`
                 "calibration": {...}|null},                       # the profile's calibration block (BOS, text)
     "params": {allocator, target_sparsity, outlier_m, lambda, balance, clamp, min_sparsity, max_sparsity,
                special, search|null},
     "pattern": {"kind": "unstructured"} | {"kind": "nm", "n_keep": int, "m": int},   # n_keep = weights KEPT
     "blocks": [{index, name, numel, outlier_pct (percent)|null, sparsity (fraction), n_keep|null}],
     "target_sparsity": float|null, "allocated_sparsity": float (parameter-weighted mean),
     "mean_block_sparsity": float (unweighted), "drift": float|null}

For N:M, block sparsity = 1 - n_keep/m and target_sparsity is the uniform pattern's sparsity, so drift
reports how far rounding and clamping moved the mixed N:M mean.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from owlctl.formats._io import check_schema, dumps, header, read_json, sha256_bytes, sha256_file, write_json
from owlctl.formats.profile import DocChecker
from owlctl.options import Allocator, Balance, Clamp

ALLOCATION_HINT = "re-create it with `owlctl allocate PROFILE -o allocation.json`"
ALLOCATORS = Allocator.values()
BALANCES = Balance.values()
CLAMPS = Clamp.values()


def _mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    if weights is None:
        return math.fsum(values) / len(values)
    return math.fsum(w * v for w, v in zip(weights, values)) / math.fsum(weights)


def build_allocation_doc(
    *,
    block_names: Sequence[str],
    block_numels: Sequence[int],
    outlier_pcts: Sequence[float] | None,
    model: dict,
    params: dict,
    pattern: dict,
    sparsities: Sequence[float] | None = None,
    n_keeps: Sequence[int] | None = None,
    profile_sha256: str | None = None,
    profile_path: str | None = None,
    profile_calibration: dict | None = None,
    created: str | None = None,
    command: str = "allocate",
) -> dict:
    """Assemble (and validate) an allocation document. Give ``sparsities`` for unstructured, ``n_keeps`` for N:M."""
    n = len(block_names)
    if pattern.get("kind") == "nm":
        if n_keeps is None or len(n_keeps) != n:
            raise ValueError("an N:M allocation needs one n_keep per block")
        m = pattern["m"]
        sparsities = [1.0 - k / m for k in n_keeps]
        target = 1.0 - pattern["n_keep"] / m
    else:
        if sparsities is None or len(sparsities) != n:
            raise ValueError("an unstructured allocation needs one sparsity per block")
        n_keeps = [None] * n
        target = params.get("target_sparsity")
    if len(block_numels) != n or (outlier_pcts is not None and len(outlier_pcts) != n):
        raise ValueError("block names, numels and outlier ratios differ in length")
    pcts = list(outlier_pcts) if outlier_pcts is not None else [None] * n
    blocks = [
        {"index": i, "name": block_names[i], "numel": int(block_numels[i]),
         "outlier_pct": None if pcts[i] is None else float(pcts[i]), "sparsity": float(sparsities[i]),
         "n_keep": None if n_keeps[i] is None else int(n_keeps[i])}
        for i in range(n)
    ]
    mean = _mean([b["sparsity"] for b in blocks])
    weighted = _mean([b["sparsity"] for b in blocks], [b["numel"] for b in blocks])
    doc = {
        **header("allocation", command, dict(model), created=created),
        "profile": {"sha256": profile_sha256, "path": profile_path, "calibration": profile_calibration},
        "params": dict(params),
        "pattern": dict(pattern),
        "blocks": blocks,
        "target_sparsity": target,
        "allocated_sparsity": weighted,  # parameter-weighted: the fraction of prunable weights removed
        "mean_block_sparsity": mean,
        "drift": None if target is None else weighted - target,
    }
    return validate_allocation(doc, source="allocation")


def validate_allocation(doc: Any, source: str = "allocation") -> dict:
    """Check every field ``prune`` relies on; raise FormatError naming the first bad one."""
    c = DocChecker(source, ALLOCATION_HINT)
    if not isinstance(doc, dict):
        raise c.fail("top level is not an object")
    doc = check_schema(doc, "allocation", source=source)
    prof = c.get(doc, "profile", "dict", "allocation")
    c.get(prof, "sha256", "str", "profile", nullable=True)
    c.get(prof, "path", "str", "profile", nullable=True)
    model = c.get(doc, "model", "dict", "allocation")
    _check_params(c, c.get(doc, "params", "dict", "allocation"))
    pat = c.get(doc, "pattern", "dict", "allocation")
    kind = c.get(pat, "kind", "str", "pattern")
    if kind == "nm":
        n_keep, m = c.get(pat, "n_keep", "int", "pattern"), c.get(pat, "m", "int", "pattern")
        if not (m >= 1 and 0 <= n_keep <= m):
            raise c.fail(f"pattern {n_keep}:{m} is invalid; need M >= 1 and 0 <= N <= M")
    elif kind != "unstructured":
        raise c.fail(f"pattern.kind is {kind!r}; expected 'unstructured' or 'nm'")
    blocks = c.get(doc, "blocks", "list", "allocation")
    if not blocks:
        raise c.fail("blocks is empty")
    num_blocks = model.get("num_blocks")
    if isinstance(num_blocks, int) and num_blocks != len(blocks):
        raise c.fail(f"the allocation lists {len(blocks)} blocks but model.num_blocks is {num_blocks}")
    for i, b in enumerate(blocks):
        _check_block(c, b, i, len(blocks), pat)
    c.get(doc, "allocated_sparsity", "num", "allocation")
    c.get(doc, "mean_block_sparsity", "num", "allocation")
    c.get(doc, "target_sparsity", "num", "allocation", nullable=True)
    c.get(doc, "drift", "num", "allocation", nullable=True)
    from owlctl.formats.documents import validate

    return validate("allocation", doc, source)


def _check_params(c: DocChecker, p: dict) -> None:
    for key, allowed in (("allocator", ALLOCATORS), ("balance", BALANCES), ("clamp", CLAMPS)):
        if c.get(p, key, "str", "params") not in allowed:
            raise c.fail(f"params.{key} is {p[key]!r}; expected one of {', '.join(allowed)}")
    target = c.get(p, "target_sparsity", "num", "params", nullable=True)
    if target is not None and not 0 <= target < 1:
        raise c.fail(f"params.target_sparsity must be in [0, 1), got {target}")
    c.get(p, "outlier_m", "num", "params", nullable=True)
    lam = c.get(p, "lambda", "num", "params", nullable=True)
    if lam is not None and lam < 0:
        raise c.fail(f"params.lambda must be >= 0, got {lam}")
    c.get(p, "min_sparsity", "num", "params")
    c.get(p, "max_sparsity", "num", "params")
    c.get(p, "special", "bool", "params")


def _check_block(c: DocChecker, b: Any, i: int, n: int, pat: dict) -> None:
    where = f"blocks[{i}]"
    if c.get(b, "index", "int", where) != i:
        raise c.fail(f"{where}.index is {b['index']}; block indices must be 0..{n - 1} in order")
    c.get(b, "name", "str", where)
    if c.get(b, "numel", "int", where) < 1:
        raise c.fail(f"{where}.numel must be >= 1, got {b['numel']}")
    c.get(b, "outlier_pct", "num", where, nullable=True)
    s = c.get(b, "sparsity", "num", where)
    k = c.get(b, "n_keep", "int", where, nullable=True)
    if pat["kind"] == "nm":
        if k is None or not 0 <= k <= pat["m"]:
            raise c.fail(f"{where}.n_keep must be an integer in [0, {pat['m']}], got {k}")
        if abs(s - (1.0 - k / pat["m"])) > 1e-9:
            raise c.fail(f"{where}.sparsity {s} does not match n_keep {k} of {pat['m']}")
    else:
        if k is not None:
            raise c.fail(f"{where}.n_keep must be null for an unstructured pattern")
        if not 0 <= s < 1:
            raise c.fail(f"{where}.sparsity must be in [0, 1), got {s}")


def write_allocation(doc: dict, path: str | os.PathLike, force: bool = False):
    """Validate, then write atomically; an existing ``path`` needs ``force``. Returns the Path."""
    validate_allocation(doc)
    return write_json(path, doc, force=force)


def read_allocation(path: str | os.PathLike) -> tuple[dict, str]:
    """Read and validate an allocation; return (document, sha256 of the file bytes)."""
    doc = read_json(path, "allocation")
    validate_allocation(doc, source=str(path))
    return doc, sha256_file(path)


def allocation_sha256(doc: dict) -> str:
    """sha256 of the canonical text; equals the file's sha256 when written by write_allocation."""
    return sha256_bytes(dumps(doc).encode("utf-8"))


def block_sparsities(doc: dict) -> list[float]:
    return [float(b["sparsity"]) for b in doc["blocks"]]
