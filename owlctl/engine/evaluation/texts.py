"""Evaluation text: token streams per source, C4's window cap, the hash of the windows scored, and the refusal
to evaluate on text the model was calibrated on (its recorded fingerprints)."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from owlctl.errors import ModelError

SPLITS = ("test", "validation")  # never "calib": evaluating on calibration text would flatter the model


C4_WINDOWS = 256  # SparseGPT's C4 protocol (SPEC 7.2): 256 windows of the validation shard


# -------------------------------------------------------------------------------------- perplexity
def token_streams(data: Sequence[str], split: str, tok: Any, bos: str = "auto") -> dict[str, Any]:
    """{source: 1-D token ids} for each evaluation source, each tokenised once (cached on disk); ``bos`` as in
    evaluate_loaded (the streams of "always" carry no special tokens: the windows get the BOS)."""
    from owlctl.engine.data import resolve_bos, token_stream

    if tok is None:
        raise ModelError("the model has no tokenizer, so its perplexity cannot be measured on text",
                         hint="save a tokenizer beside the weights (tokenizer.json / tokenizer_config.json)")
    bos = resolve_bos(tok, bos)
    return {source: token_stream(source, split, tok, bos) for source in dict.fromkeys(data)}


def calibration_records(records: dict | None) -> list[dict]:
    """The calibration blocks a checkpoint records: its prune calibration and its allocation's profile's."""
    out = []
    rep = (records or {}).get("report") or {}
    alloc = (records or {}).get("allocation") or {}
    for cal in (rep.get("calibration"), (alloc.get("profile") or {}).get("calibration")):
        if isinstance(cal, dict) and cal not in out:
            out.append(cal)
    return out


def check_calibration_overlap(calibrations: Sequence[dict], data: Sequence[str], split: str) -> list[dict]:
    """Refuse (DataError) evaluation text that overlaps recorded calibration text: any paragraph of the
    evaluation split whose hash is among the calibration fingerprint's (engine.data.text_fingerprint; this
    catches the same file, a copy, a folder and one of its files, ...). Returns what was checked."""
    from owlctl.engine.data import fingerprint_overlap, overlap_texts
    from owlctl.errors import DataError

    checks = []
    cals = [c for c in calibrations if (c.get("fingerprint") or {}).get("paragraphs")]
    if not cals:
        return checks
    for source in dict.fromkeys(data):
        docs = overlap_texts(source, split)
        for cal in cals:
            checked, hits, examples = fingerprint_overlap(cal["fingerprint"], docs)
            checks.append({"source": source, "split": split, "calibration_source": cal.get("source"),
                           "paragraphs_checked": checked, "overlapping": hits})
            if hits:
                rule = (cal.get("split") or {}).get("rule", "?")
                raise DataError(
                    f"the {split} split of {source} overlaps the calibration text: {hits} of its {checked} "
                    f"checked paragraphs are calibration paragraphs of {cal.get('source')} (split rule: {rule}), "
                    f"e.g. {examples[0]!r}",
                    hint="evaluate on text the model was not calibrated on: another --data, or the "
                         "validation / test split of the calibration source itself (disjoint by construction)")
    return checks


def _windows_cap(source: str, max_windows: int | None) -> int | None:
    if source == "c4":
        return C4_WINDOWS if max_windows is None else min(max_windows, C4_WINDOWS)
    return max_windows


def _windows_sha256(ids: Any, seqlen: int, cap: int | None, bos_id: int | None = None) -> str:
    import torch

    from owlctl.engine.evaluation.perplexity import windows

    wins = windows(ids, seqlen, cap, bos_id)
    return hashlib.sha256(wins.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
