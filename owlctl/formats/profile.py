"""The ``owlctl.profile/1`` contract: per-block outlier statistics of a dense model (read side).

Written by ``owlctl profile`` (one dense pass); read by ``allocate`` and ``prune --from-profile``. Layout:

    {"schema": "owlctl.profile/1", "owlctl_version", "created",
     "model": {id, model_type, family, revision|null, content_sha256, num_blocks},
     "calibration": {source, nsamples, seqlen, seed, tokens_sha256},
     "score": {name, definition, outlier_rule, pct_units},
     "outlier_m": [3.0, 4.0, ...],                       # every M counted in the pass
     "blocks": [{index, name, numel, mean_score, score_sum,
                 "outlier_count": {"<M>": int}, "outlier_pct": {"<M>": float},     # keys are m_key(M)
                 "linears": [{name, shape: [C_out, C_in], numel, score_sum, max_score,
                              "outlier_count": {"<M>": int}}]}]}

Counts are the source of truth: ratios are recomputed as 100 * count / numel (percent).
"""

from __future__ import annotations

import math
import os
from typing import Any

from owlctl.errors import FormatError, InputError
from owlctl.formats._io import check_schema, read_json, sha256_file

PROFILE_HINT = "re-create it with `owlctl profile MODEL -o profile.json`"

_KINDS = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "num": ("a finite number",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
}


class DocChecker:
    """Field-by-field checks that turn a malformed document into one FormatError naming the field."""

    def __init__(self, source: str, hint: str) -> None:
        self.source, self.hint = source, hint

    def fail(self, problem: str) -> FormatError:
        return FormatError(f"{self.source}: {problem}", hint=self.hint)

    def get(self, d: Any, key: str, kind: str, where: str, nullable: bool = False) -> Any:
        if not isinstance(d, dict):
            raise self.fail(f"{where} must be an object")
        if key not in d:
            raise self.fail(f"{where}.{key} is missing")
        return self.check(d[key], kind, f"{where}.{key}", nullable)

    def check(self, v: Any, kind: str, where: str, nullable: bool = False) -> Any:
        if v is None and nullable:
            return None
        desc, ok = _KINDS[kind]
        if not ok(v):
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
            raise self.fail(f"{where} must be {desc}{' or null' if nullable else ''}, got {shown}")
        return v

    def count_map(self, d: Any, key: str, where: str, keys: list[str], numel: int, kind: str = "int") -> dict:
        """A {"<M>": value} map whose keys are exactly ``keys``; integer counts must lie in [0, numel]."""
        mp = self.get(d, key, "dict", where)
        if sorted(mp) != sorted(keys):
            raise self.fail(f"{where}.{key} has M keys {sorted(mp)} but outlier_m lists {sorted(keys)}")
        for k in keys:
            v = self.check(mp[k], kind, f"{where}.{key}[{k!r}]")
            if kind == "int" and not 0 <= v <= numel:
                raise self.fail(f"{where}.{key}[{k!r}] = {v} is outside [0, numel={numel}]")
        return mp


def m_key(m: float) -> str:
    """The JSON key of an outlier threshold M: 5.0 -> "5", 5.5 -> "5.5"."""
    return f"{float(m):g}"


def validate_profile(doc: Any, source: str = "profile") -> dict:
    """Check every field ``allocate`` and ``prune`` rely on; raise FormatError naming the first bad one."""
    c = DocChecker(source, PROFILE_HINT)
    if not isinstance(doc, dict):
        raise c.fail("top level is not an object")
    doc = check_schema(doc, "profile", source=source)
    model = c.get(doc, "model", "dict", "profile")
    for key in ("id", "model_type", "family", "content_sha256"):
        c.get(model, key, "str", "model")
    c.get(model, "revision", "str", "model", nullable=True)
    num_blocks = c.get(model, "num_blocks", "int", "model")
    if num_blocks < 1:
        raise c.fail(f"model.num_blocks must be >= 1, got {num_blocks}")
    calib = c.get(doc, "calibration", "dict", "profile")
    c.get(calib, "source", "str", "calibration")
    c.get(calib, "tokens_sha256", "str", "calibration")
    for key in ("nsamples", "seqlen", "seed"):
        c.get(calib, key, "int", "calibration")
    score = c.get(doc, "score", "dict", "profile")
    for key in ("name", "definition", "outlier_rule", "pct_units"):
        c.get(score, key, "str", "score")
    keys = _check_ms(c, doc)
    blocks = c.get(doc, "blocks", "list", "profile")
    if len(blocks) != num_blocks:
        raise c.fail(f"the profile lists {len(blocks)} blocks but model.num_blocks is {num_blocks}")
    for i, block in enumerate(blocks):
        _check_block(c, block, i, num_blocks, keys)
    from owlctl.formats.documents import validate

    return validate("profile", doc, source)


def _check_ms(c: DocChecker, doc: dict) -> list[str]:
    ms = c.get(doc, "outlier_m", "list", "profile")
    if not ms:
        raise c.fail("outlier_m is empty")
    for i, m in enumerate(ms):
        if c.check(m, "num", f"outlier_m[{i}]") <= 0:
            raise c.fail(f"outlier_m[{i}] must be positive, got {m}")
    keys = [m_key(m) for m in ms]
    if len(set(keys)) != len(keys):
        raise c.fail(f"outlier_m lists a value twice: {ms}")
    return keys


def _check_block(c: DocChecker, block: Any, i: int, num_blocks: int, keys: list[str]) -> None:
    where = f"blocks[{i}]"
    index = c.get(block, "index", "int", where)
    if index != i:
        raise c.fail(f"{where}.index is {index}; block indices must be 0..{num_blocks - 1} in order")
    c.get(block, "name", "str", where)
    numel = c.get(block, "numel", "int", where)
    if numel < 1:
        raise c.fail(f"{where}.numel must be >= 1, got {numel}")
    c.get(block, "mean_score", "num", where)
    c.get(block, "score_sum", "num", where)
    c.count_map(block, "outlier_count", where, keys, numel)
    c.count_map(block, "outlier_pct", where, keys, numel, kind="num")
    linears = c.get(block, "linears", "list", where)
    total = 0
    for j, lin in enumerate(linears):
        lw = f"{where}.linears[{j}]"
        c.get(lin, "name", "str", lw)
        shape = c.get(lin, "shape", "list", lw)
        if len(shape) != 2 or not all(_KINDS["int"][1](d) and d > 0 for d in shape):
            raise c.fail(f"{lw}.shape must be [C_out, C_in] (positive integers), got {shape}")
        lnumel = c.get(lin, "numel", "int", lw)
        if lnumel != shape[0] * shape[1]:
            raise c.fail(f"{lw}.numel is {lnumel} but its shape {shape} holds {shape[0] * shape[1]}")
        c.get(lin, "score_sum", "num", lw)
        c.get(lin, "max_score", "num", lw)
        c.count_map(lin, "outlier_count", lw, keys, lnumel)
        total += lnumel
    if linears and total != numel:
        raise c.fail(f"{where}.numel is {numel} but its linears hold {total} weights")


def read_profile(path: str | os.PathLike) -> tuple[dict, str]:
    """Read and validate a profile; return (document, sha256 of the file bytes)."""
    doc = read_json(path, "profile")
    validate_profile(doc, source=str(path))
    return doc, sha256_file(path)


def profiled_m(doc: dict) -> list[float]:
    return [float(m) for m in doc["outlier_m"]]


def block_ratios(doc: dict, m: float) -> list[float]:
    """Outlier ratio D_l in percent for threshold M, recomputed from the stored counts."""
    key = m_key(m)
    have = [m_key(x) for x in doc["outlier_m"]]
    if key not in have:
        raise InputError(
            f"outlier M = {key} was not profiled; this profile has M = {', '.join(have)}",
            hint=f"pick one of those with --outlier-m, or re-run `owlctl profile MODEL -o profile.json "
                 f"--outlier-m {','.join(sorted(set(have) | {key}, key=float))}`",
        )
    return [100.0 * b["outlier_count"][key] / b["numel"] for b in doc["blocks"]]


def block_numels(doc: dict) -> list[int]:
    return [int(b["numel"]) for b in doc["blocks"]]


def block_names(doc: dict) -> list[str]:
    return [str(b["name"]) for b in doc["blocks"]]
