"""Token ids: the tokenizer's BOS handling, token streams cached on disk, and seeded calibration windows
(SPEC 1.1).

BOS (``--bos``). ``never`` is the reference protocol: a split is tokenised as one stream with the
tokenizer's default special tokens, so only the stream's start carries a BOS (when the tokenizer adds one).
``always``: the stream is tokenised without special tokens and every calibration or evaluation window is
[BOS] + (seqlen - 1) stream tokens. ``auto`` is ``always`` for tokenizers that add a BOS to every sequence
by default (Gemma, LLaMA-2's sentencepiece), ``never`` otherwise (e.g. SmolLM2, GPT-2 BPE).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any

from owlctl.engine.data.fingerprint import text_fingerprint
from owlctl.engine.data.sources import documents, split_info
from owlctl.errors import DataError, InputError


@dataclass
class Calibration:
    """Calibration token ids (nsamples, seqlen) and their provenance."""

    input_ids: Any  # torch.LongTensor (nsamples, seqlen)
    source: str
    nsamples: int
    seqlen: int
    seed: int
    sha256: str
    bos: str = "never"  # resolved: "always" | "never"
    bos_requested: str | None = None  # what was asked ("auto" | "always" | "never")
    split: dict | None = None  # split_info() of the source
    fingerprint: dict | None = None  # text_fingerprint() of the calibration text

    def as_dict(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "tokens_sha256": self.sha256, "bos": self.bos, "bos_requested": self.bos_requested or self.bos,
                "split": self.split, "fingerprint": self.fingerprint}


# ------------------------------------------------------------------------------------------ tokens
def _tokenizer_key(tok: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def tokenizer_adds_bos(tok: Any) -> bool:
    """Whether ``tok`` prepends its BOS token to every text by default (add_special_tokens=True)."""
    bos = getattr(tok, "bos_token_id", None)
    if tok is None or bos is None:
        return False
    with_specials = tok("a", add_special_tokens=True).input_ids
    without = tok("a", add_special_tokens=False).input_ids
    return bool(with_specials) and with_specials[0] == bos and without[:1] != [bos]


def resolve_bos(tok: Any, requested: str) -> str:
    """--bos auto | always | never -> "always" | "never" (module docstring). InputError on a bad value or when
    "always" is asked of a tokenizer without a BOS token."""
    from owlctl.options import Bos, check_choice

    check_choice("--bos", requested, Bos)
    if requested == "auto":
        return "always" if tokenizer_adds_bos(tok) else "never"
    if requested == "always" and getattr(tok, "bos_token_id", None) is None:
        raise InputError("--bos always, but the tokenizer has no BOS token", hint="use --bos never (or auto)")
    return requested


def bos_warning(tok: Any, resolved: str) -> str | None:
    """The warning to show when a tokenizer that adds BOS runs with windows that lack it, else None."""
    if resolved == "never" and tokenizer_adds_bos(tok):
        return (f"the tokenizer adds {tok.bos_token!r} to every sequence, but --bos never cuts windows from one "
                "stream, so only the first window starts with it (the reference protocol); models trained with "
                "a BOS per sequence score worse this way; --bos always (the default auto) adds it per window")
    return None


def _stream(text: str, tok: Any, bos: str, what: str = "text") -> Any:
    """``text`` tokenised once; cached on disk by tokenizer, text and special-token setting."""
    import numpy as np
    import torch

    from owlctl.engine.models import cache_dir

    specials = bos != "always"
    # The "never" key is the one owlctl always used, so existing caches stay valid.
    tag = "" if specials else "no-special-tokens|"
    key = hashlib.sha256(f"{_tokenizer_key(tok)}|{len(text)}|{tag}".encode() + text.encode()).hexdigest()[:24]
    cache = cache_dir() / "tokens" / f"{key}.npy"
    if cache.is_file():
        return torch.from_numpy(np.load(cache)).long()
    from owlctl.progress import note

    note(f"tokenising {what} ({len(text) / 1e6:.1f} M characters; cached for next time)")
    ids = tok(text, return_tensors="pt", add_special_tokens=specials, verbose=False).input_ids[0]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, ids.numpy().astype(np.int32))
        os.replace(tmp, cache)
    except OSError:
        pass
    return ids


def token_stream(source: str, split: str, tok: Any, bos: str = "never") -> Any:
    """The split's documents joined and tokenised once (cached on disk for files that do not change): with
    the tokenizer's default special tokens for ``bos="never"``, without any for ``"always"`` (the windows
    then get their BOS from engine.perplexity.windows / calibration)."""
    docs, joiner = documents(source, split)
    return _stream(("\n\n" if joiner == "doc" else joiner).join(docs), tok, bos, f"{source} ({split} split)")


# ------------------------------------------------------------------------------------- calibration
def calibration(source: str, tok: Any, nsamples: int, seqlen: int, seed: int = 0, bos: str = "never",
                bos_requested: str | None = None) -> Calibration:
    """Seeded calibration windows. Document sources (c4, .jsonl) follow SPEC 1.1 exactly: draw a random
    document, redraw until it has more than seqlen tokens, take a random window. Text sources (builtin:wiki,
    wikitext2, .txt, folders) are tokenised once and windows are drawn from the stream. A local RNG is used.
    ``bos`` (resolved, see resolve_bos): "never" = the reference; "always" = each window is [BOS] + seqlen - 1
    tokens of text tokenised without special tokens."""
    import torch

    if nsamples < 1 or seqlen < 2:
        raise InputError("--nsamples must be >= 1 and --seqlen >= 2")
    if tok is None:
        from owlctl.errors import ModelError

        raise ModelError("the model has no tokenizer, so calibration text cannot be tokenised",
                         hint="save a tokenizer beside the weights (tokenizer.json / tokenizer_config.json)")
    from owlctl.progress import note

    note(f"calibration data: {nsamples} x {seqlen} tokens of {source} (seed {seed})")
    if bos not in ("always", "never"):
        bos = resolve_bos(tok, bos)
    body = seqlen - 1 if bos == "always" else seqlen  # text tokens per window
    head = [int(tok.bos_token_id)] if bos == "always" else []
    rng = random.Random(seed)
    docs, joiner = documents(source, "calib")
    rows = []
    used: list[str] = docs
    if joiner == "doc":
        tries, picked = 0, {}
        while len(rows) < nsamples:
            tries += 1
            if tries > 200 * nsamples:
                raise DataError(f"{source}: too few documents longer than {seqlen} tokens",
                                hint="lower --seqlen or use a text source (builtin:wiki, a .txt file)")
            k = rng.randint(0, len(docs) - 1)
            ids = tok(docs[k], return_tensors="pt", add_special_tokens=bos != "always").input_ids[0]
            if ids.numel() <= body:
                continue
            start = rng.randint(0, ids.numel() - body - 1)
            rows.append(torch.cat([torch.tensor(head, dtype=ids.dtype), ids[start:start + body]]))
            picked[k] = docs[k]
        used = [picked[k] for k in sorted(picked)]  # the calibration text: the documents windows came from
    else:
        ids = _stream(("\n\n" if joiner == "doc" else joiner).join(docs), tok, bos, f"{source} (calibration split)")
        if ids.numel() < nsamples * body + 1:
            raise DataError(
                f"{source} has {ids.numel()} calibration tokens, fewer than --nsamples x --seqlen = "
                f"{nsamples} x {seqlen} = {nsamples * seqlen}",
                hint="lower --nsamples or --seqlen, or use a larger corpus")
        for _ in range(nsamples):
            start = rng.randint(0, ids.numel() - body - 1)
            rows.append(torch.cat([torch.tensor(head, dtype=ids.dtype), ids[start:start + body]]))
    input_ids = torch.stack(rows).long()
    sha = hashlib.sha256(input_ids.to(torch.int64).numpy().tobytes()).hexdigest()
    return Calibration(input_ids, source, nsamples, seqlen, seed, sha, bos=bos, bos_requested=bos_requested or bos,
                       split=split_info(source), fingerprint=text_fingerprint(used))
