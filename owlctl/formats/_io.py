"""Atomic writes, hashing and schema checks shared by every owlctl file format."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any, Callable

from owlctl import __version__
from owlctl.errors import FormatError
from owlctl.formats.claims import OutputClaim


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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], force: bool = False,
                 inputs: Any = ()) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place (never half a file)."""
    with OutputClaim(path, force=force, kind="file", inputs=inputs) as claim:
        assert claim.tmp is not None
        with open(claim.tmp, "wb") as f:
            write(f)
        return claim.commit()


def atomic_write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), force=force)


def write_json(path: str | os.PathLike, doc: dict, force: bool = False, kind: str | None = None) -> Path:
    """Write ``doc`` atomically; with ``kind`` it is first checked against its document type."""
    if kind is not None:
        from owlctl.formats.documents import validate

        validate(kind, doc)
    return atomic_write_text(path, dumps(doc), force=force)


def write_claimed(claim: "OutputClaim", kind: str, doc: dict) -> Path:
    """Check ``doc`` against its type, write it into the claim's temporary file and commit it."""
    from owlctl.formats.documents import validate

    validate(kind, doc)
    assert claim.tmp is not None
    claim.tmp.write_text(dumps(doc), encoding="utf-8")
    return claim.commit()


# The command that writes each kind of document (shown in hints), and the option that reads it.
REMAKE = {"profile": "owlctl profile MODEL -o profile.json",
          "allocation": "owlctl allocate PROFILE -s S -o allocation.json",
          "report": "owlctl prune MODEL ... -o CHECKPOINT",
          "eval": "owlctl eval CHECKPOINT --json", "bench": "owlctl bench MODEL --json",
          "pipeline": "owlctl pipeline -o DIR"}
READ_BY = {"profile": "--from-profile", "allocation": "--allocation"}


def read_json(path: str | os.PathLike, kind: str, remake: str | None = None) -> dict:
    """Read an owlctl JSON document of ``kind`` ("profile", "allocation", ...) and check its schema tag.
    ``remake`` is the command that re-creates the file, shown in hints."""
    p = Path(path)
    remake = remake or REMAKE.get(kind, f"owlctl {kind} ...")
    if p.is_dir():
        raise FormatError(f"{p} is a directory, not an owlctl {kind} file",
                          hint=f"pass the JSON file itself, e.g. {p / (kind + '.json')}, or create it with `{remake}`")
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
    return check_schema(doc, kind, source=str(p), remake=remake)


def check_schema(doc: dict, kind: str, source: str = "document", remake: str | None = None) -> dict:
    """``doc`` if its schema is ``kind`` at the current version; an older readable version upgraded to the
    current shape; otherwise a FormatError saying what the file is and what to do."""
    from owlctl.formats.kinds import OLDEST, VERSIONS, parse_schema, schema_name

    want = schema_name(kind)
    got = doc.get("schema")
    if got == want:
        return doc
    remake = remake or REMAKE.get(kind, f"owlctl {kind} ...")
    producer = doc.get("owlctl_version", "an unknown program")
    parsed = parse_schema(got)
    if parsed is not None and parsed[0] == kind and OLDEST.get(kind, VERSIONS[kind]) <= parsed[1] < VERSIONS[kind]:
        from owlctl.formats.documents import upgrade

        return upgrade(kind, doc)
    if parsed is not None and parsed[0] != kind and parsed[0] in VERSIONS:
        other = parsed[0]
        flag = f"; pass it with {READ_BY[other]}" if other in READ_BY else ""
        raise FormatError(f"{source} is an owlctl {other} file, not an owlctl {kind} file{flag}",
                          hint=f"the {kind} file is written by `{remake}`")
    if parsed is not None and parsed[0] == kind:
        raise FormatError(
            f"{source} has schema {got} (written by owlctl {producer}); this owlctl {__version__} reads {want}",
            hint=f"re-create it with this version: `{remake}`",
        )
    raise FormatError(
        f"{source} is not an owlctl {kind} file (schema {got!r}, expected {want!r})",
        hint=f"pass a file written by `{remake}`",
    )


def header(kind: str, command: str | None = None, model: dict | None = None, seconds: dict | None = None,
           created: str | None = None) -> dict:
    """The envelope every document starts with (formats.documents): schema, owlctl_version, created,
    command, model, seconds; the command's own fields follow."""
    import datetime as _dt

    from owlctl.formats.kinds import schema_name

    created = created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return {"schema": schema_name(kind), "owlctl_version": __version__, "created": created,
            "command": command or kind, "model": model, "seconds": dict(seconds or {})}


