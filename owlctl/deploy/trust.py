"""Refuse to run code from places other users can write to.

owlctl executes two things it did not import from site-packages: its compiled sparse kernels (a shared
library in the cache) and the DeepSparse venv's interpreter. With a shared ``OWLCTL_CACHE`` or
``XDG_CACHE_HOME`` anyone who can write there could plant either. Before use, the file and every directory
from it up to the cache root must be owned by the current user (or root) and not writable by group or
others, and its sha256 must match the one recorded when owlctl built or installed it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from owlctl.errors import OwlctlError


class UntrustedFileError(OwlctlError):
    """A file owlctl would execute is not private to this user, or changed since owlctl recorded it."""


def _chain(p: Path, root: Path | None) -> list[Path]:
    """``p`` and its parent directories up to and including ``root`` (just ``p`` without a root)."""
    chain = [p]
    if root is not None:
        q = p.parent
        while q == root or root in q.parents:
            chain.append(q)
            if q == root:
                break
            q = q.parent
    return chain


def check_stat(st: os.stat_result, path: Path, what: str, *, want_dir: bool = False, allow_root: bool = True,
               error: type[OwlctlError] = UntrustedFileError, hint: str | None = None) -> None:
    """One file's or directory's status (from lstat or fstat): not a symbolic link, the expected kind, owned
    by this user (or root with ``allow_root``), not writable by group or others."""
    uid = os.getuid()
    kind = "directory" if want_dir else "file"
    hint = hint or f"remove {path}, or point OWLCTL_CACHE at a directory only you can write"
    if stat.S_ISLNK(st.st_mode):
        raise error(f"refusing the {what} {kind} {path}: it is a symbolic link", hint=hint)
    if want_dir != stat.S_ISDIR(st.st_mode) or (not want_dir and not stat.S_ISREG(st.st_mode)):
        raise error(f"refusing {path}: not a regular {kind}", hint=hint)
    if st.st_uid != uid and not (allow_root and st.st_uid == 0):
        raise error(f"refusing the {what} {kind} {path}: owned by uid {st.st_uid}, not by you (uid {uid})",
                    hint=hint)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise error(f"refusing the {what} {kind} {path}: it is group- or world-writable "
                    f"(mode {stat.S_IMODE(st.st_mode):o})", hint=hint)


def sha256_fd(fd: int) -> str:
    """sha256 of an open file, read from its start (what is checked is what is then loaded)."""
    import hashlib

    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def check_private(path: Path, root: Path | None = None, what: str = "file") -> None:
    """``path`` (and each parent up to ``root``) is owned by this user or root and not group/world-writable
    (a sticky parent such as /tmp is fine: others cannot replace what is in it)."""
    uid = os.getuid()
    p = Path(path)
    for q in _chain(p, Path(root) if root is not None else None):
        try:
            st = q.lstat() if q == p else q.stat()
        except FileNotFoundError:
            raise UntrustedFileError(f"{what} {q} does not exist") from None
        if st.st_uid not in (uid, 0):
            raise UntrustedFileError(
                f"refusing to use {what} {p}: {q} is owned by uid {st.st_uid}, not by you (uid {uid})",
                hint=f"remove {q}, or point OWLCTL_CACHE at a directory only you can write")
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and q != p
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
            raise UntrustedFileError(
                f"refusing to use {what} {p}: {q} is writable by other users (mode {stat.filemode(st.st_mode)})",
                hint=f"`chmod go-w {q}`, or point OWLCTL_CACHE at a directory only you can write")


def sha256(path: Path) -> str:
    from owlctl.formats._io import sha256_file

    return sha256_file(path)


def check_recorded(path: Path, expected: str | None, what: str) -> None:
    """The file's sha256 equals what owlctl recorded when it made it."""
    got = sha256(path)
    if not expected or got != expected:
        raise UntrustedFileError(f"refusing to use {what} {path}: its sha256 {got[:16]}... differs from the one "
                                 f"recorded when owlctl made it ({(expected or 'none')[:16]}...)",
                                 hint=f"remove {path} (owlctl rebuilds or re-installs it)")
