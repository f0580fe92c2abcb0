"""Atomic writes, hashing and schema checks shared by every owlctl file format."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from owlctl import __version__
from owlctl.errors import FormatError, OutputExistsError


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite ``path`` without ``force``; return it as a Path. Call before expensive work."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputExistsError(f"{p} already exists", hint="pass --force to overwrite it, or choose another -o")
    return p


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_mode(is_dir: bool) -> int:
    """What a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], force: bool = False) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place (never half a file)."""
    p = check_output(path, force)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, _default_mode(False))
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), force=force)


def write_json(path: str | os.PathLike, doc: dict, force: bool = False) -> Path:
    return atomic_write_text(path, dumps(doc), force=force)


def read_json(path: str | os.PathLike, kind: str, remake: str | None = None) -> dict:
    """Read an owlctl JSON document of ``kind`` ("profile", "allocation", ...) and check its schema tag.
    ``remake`` is the command that re-creates the file (default: `owlctl KIND ...`), shown in hints."""
    p = Path(path)
    remake = remake or f"owlctl {kind} ..."
    if not p.is_file():
        raise FormatError(f"{kind} file not found: {p}", hint=f"check the path, or create it with `{remake}`")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(
            f"{p} is not valid JSON ({e}); it may be truncated or hand-edited",
            hint=f"re-create it with `{remake}`",
        ) from None
    if not isinstance(doc, dict):
        raise FormatError(f"{p} is not an owlctl {kind} document (top level is not an object)")
    check_schema(doc, kind, source=str(p), remake=remake)
    return doc


SCHEMAS = {
    "profile": "owlctl.profile/1",
    "allocation": "owlctl.allocation/1",
    "report": "owlctl.report/1",
    "eval": "owlctl.eval/1",
    "bench": "owlctl.bench/1",
    "packed": "owlctl.packed/1",
    "pipeline": "owlctl.pipeline/1",
    "onnx": "owlctl.onnx/1",
}


def check_schema(doc: dict, kind: str, source: str = "document", remake: str | None = None) -> None:
    want = SCHEMAS[kind]
    got = doc.get("schema")
    if got == want:
        return
    remake = remake or f"owlctl {kind} ..."
    producer = doc.get("owlctl_version", "an unknown program")
    if isinstance(got, str) and got.startswith(f"owlctl.{kind}/"):
        raise FormatError(
            f"{source} has schema {got} (written by owlctl {producer}); this owlctl {__version__} reads {want}",
            hint=f"re-create it with this version: `{remake}`",
        )
    raise FormatError(
        f"{source} is not an owlctl {kind} file (schema {got!r}, expected {want!r})",
        hint=f"pass a file written by `{remake}`",
    )


def header(kind: str) -> dict:
    return {"schema": SCHEMAS[kind], "owlctl_version": __version__}


def replace_dir_atomically(tmp_dir: Path, final: Path, force: bool) -> None:
    """Move a finished temporary directory into place; an existing ``final`` is removed only with ``force``."""
    if final.exists():
        if not force:
            raise OutputExistsError(f"{final} already exists", hint="pass --force to overwrite it")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp_dir, final)


def temp_dir_beside(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    os.chmod(tmp, _default_mode(True))
    return tmp
