"""Fingerprints of calibration text, so ``eval`` can refuse to evaluate on text the model was calibrated on."""

from __future__ import annotations

import hashlib

from owlctl.engine.data.sources import _paragraphs

MIN_PARAGRAPH_CHARS = 40  # shorter paragraphs (headings, "References") are not fingerprinted


MAX_FINGERPRINTS = 1024  # above this, a content-defined 1/2^k sample of the paragraph hashes is kept


# ------------------------------------------------------------------------------------ fingerprints
def _norm_paragraphs(texts: list[str]) -> list[str]:
    out = []
    for t in texts:
        for p in _paragraphs(t):
            p = " ".join(p.split())
            if len(p) >= MIN_PARAGRAPH_CHARS:
                out.append(p)
    return out


def _phash(p: str) -> str:
    return hashlib.sha256(p.encode()).hexdigest()[:16]


def text_fingerprint(texts: list[str]) -> dict:
    """A compact fingerprint of calibration text: the sha256 of the joined text and 64-bit hashes of its
    paragraphs (whitespace-normalised, at least MIN_PARAGRAPH_CHARS long). Above MAX_FINGERPRINTS paragraphs
    only hashes divisible by ``sample_mod`` (a power of two) are kept: the choice depends on the content
    alone, so the same paragraph seen at evaluation is checked against the same sample."""
    hashes = sorted({_phash(p) for p in _norm_paragraphs(texts)})
    mod = 1
    while len(hashes) / mod > MAX_FINGERPRINTS:
        mod *= 2
    kept = [h for h in hashes if int(h, 16) % mod == 0]
    return {"text_sha256": hashlib.sha256("\n\n".join(texts).encode()).hexdigest(),
            "paragraphs": {"min_chars": MIN_PARAGRAPH_CHARS, "count": len(hashes), "sample_mod": mod,
                           "sha256_16": kept}}


def fingerprint_overlap(fingerprint: dict | None, texts: list[str]) -> tuple[int, int, list[str]]:
    """(paragraphs of ``texts`` checked, how many of them are calibration paragraphs, a few examples)."""
    fp = (fingerprint or {}).get("paragraphs") or {}
    known = set(fp.get("sha256_16") or ())
    if not known:
        return 0, 0, []
    mod = int(fp.get("sample_mod") or 1)
    checked, hits, examples = 0, 0, []
    for p in _norm_paragraphs(texts):
        h = _phash(p)
        if int(h, 16) % mod:
            continue
        checked += 1
        if h in known:
            hits += 1
            if len(examples) < 3:
                examples.append(p[:80] + ("..." if len(p) > 80 else ""))
    return checked, hits, examples
