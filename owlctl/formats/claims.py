"""Claiming an output before the work: refusing to overwrite (without --force), the input itself, a file where
a directory goes; a lock beside it; stale partials of killed runs removed; the temporary file or directory
created at once beside the target and renamed into place at the end (never half an output)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from owlctl.errors import OutputError, OutputExistsError

_FINISHED: list[str] = []  # outputs this process completed (named in the message when it is interrupted)


def finished_outputs() -> list[str]:
    return list(_FINISHED)


def check_output(path: str | os.PathLike, force: bool, kind: str | None = None) -> Path:
    """Refuse to overwrite ``path`` without ``force``, and to put a file where a directory is (or the
    reverse: ``kind`` "file" | "dir"); return it as a Path. Call before expensive work."""
    p = Path(path)
    if p.is_dir() and kind == "file":
        raise OutputError(f"{p} is a directory, but -o names the file to write",
                          hint=f"give a file name, e.g. -o {p / 'out.json'}")
    if (p.exists() or p.is_symlink()) and not p.is_dir() and kind == "dir":
        raise OutputError(f"{p} is a file, but -o names the directory to write",
                          hint="remove the file or choose another -o (it is not replaced, even with --force)")
    if (p.exists() or p.is_symlink()) and not force:
        raise OutputExistsError(f"{p} already exists", hint="pass --force to overwrite it, or choose another -o")
    return p


def check_not_input(output: Path, inputs: Any) -> None:
    """Refuse an output that is one of the inputs, or a folder holding one: replacing it (with --force)
    would delete what is being read."""
    out = Path(output).resolve()
    for src in inputs or ():
        if src is None:
            continue
        s = Path(src).expanduser()
        if not s.exists():
            continue
        s = s.resolve()
        if out == s or out in s.parents:
            what = "the input" if out == s else "a folder that holds the input"
            raise OutputError(f"-o {output} is {what} {src}; writing it would delete the input while it is read",
                              hint="choose another -o")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PARTIAL = ".partial-"


def _partial_prefix(final: Path) -> str:
    return f".{final.name}{_PARTIAL}{os.getpid()}-"


def remove_stale_partials(final: Path) -> list[str]:
    """Remove ``.NAME.partial-<pid>-*`` leftovers of ``final`` whose process no longer exists (a run killed
    by SIGKILL or a power cut); return their names. Leftovers of live processes are kept."""
    removed = []
    parent = final.parent
    if not parent.is_dir():
        return removed
    for q in parent.glob(f".{glob_escape(final.name)}{_PARTIAL}*"):
        pid_text = q.name[len(f".{final.name}{_PARTIAL}"):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(q, ignore_errors=True) if q.is_dir() and not q.is_symlink() else q.unlink(missing_ok=True)
        removed.append(q.name)
    if removed:
        from owlctl.progress import note

        note(f"removed {len(removed)} stale partial output(s) of {final.name} left by a killed run: "
             + ", ".join(removed))
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


class OutputClaim:
    """Reserve an output at the start of a command, before any expensive work.

    Refuses an existing output without ``force`` (and a file where a directory goes or the reverse), an
    output that is one of ``inputs``; takes a lock beside it so a second owlctl aimed at the same output
    fails at once instead of after all its work; removes stale partials of killed runs; refuses a disk
    with less than ``need_bytes`` free; creates the temporary file or directory beside the output now (so
    a read-only or missing location fails in seconds). ``commit()`` renames the finished temporary into
    place; leaving the ``with`` block without it removes the temporary and the lock, so a failure or an
    interrupt leaves the parent directory as it was.
    """

    def __init__(self, path: str | os.PathLike, *, force: bool, kind: str, inputs: Any = (),
                 need_bytes: int | None = None) -> None:
        if kind not in ("file", "dir"):
            raise ValueError(kind)
        self.path, self.force, self.kind = Path(path), force, kind
        self.inputs, self.need_bytes = inputs, need_bytes
        self.tmp: Path | None = None
        self.lock: Path | None = None
        self.committed = False

    def __enter__(self) -> "OutputClaim":
        p = check_output(self.path, self.force, self.kind)
        check_not_input(p, self.inputs)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            remove_stale_partials(p)
            if self.need_bytes:
                free = shutil.disk_usage(p.parent).free
                if free < self.need_bytes:
                    raise OutputError(f"{p.parent} has {free / 2**20:.0f} MiB free, but the output needs about "
                                      f"{self.need_bytes / 2**20:.0f} MiB",
                                      hint="free some space, or write to another disk with -o")
            if self.kind == "dir":
                self.tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(p), dir=p.parent))
                os.chmod(self.tmp, _default_mode(True))
            else:
                fd, tmp = tempfile.mkstemp(prefix=_partial_prefix(p), suffix=".tmp", dir=p.parent)
                os.close(fd)
                self.tmp = Path(tmp)
        except BaseException:
            self._release()
            raise
        return self

    def _take_lock(self) -> None:
        import socket

        lock = self.path.parent / f".{self.path.name}.owlctl-lock"
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid_s, host = (lock.read_text().split() + ["", ""])[:2]
                except OSError:
                    pid_s, host = "", ""
                if host == socket.gethostname() and pid_s.isdigit() and not _pid_alive(int(pid_s)):
                    lock.unlink(missing_ok=True)  # its owner is gone
                    continue
                raise OutputError(f"another owlctl process (pid {pid_s or '?'} on {host or '?'}) is writing "
                                  f"{self.path}", hint=f"wait for it to finish, or remove {lock} if it is not "
                                  "running") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.lock = lock
            return
        raise OutputError(f"could not lock {self.path}", hint=f"remove {lock} if no owlctl is running")

    def commit(self) -> Path:
        """Move the finished temporary into place (an existing output is replaced only with ``force``)."""
        assert self.tmp is not None
        if self.kind == "dir":
            replace_dir_atomically(self.tmp, self.path, self.force)
        else:
            check_output(self.path, self.force, "file")
            os.chmod(self.tmp, _default_mode(False))
            os.replace(self.tmp, self.path)
        self.committed = True
        if not any(_PARTIAL in part for part in self.path.resolve().parts[:-1]):  # not inside another temporary
            _FINISHED.append(str(self.path))
        return self.path

    def _release(self) -> None:
        if self.tmp is not None and not self.committed:
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                self.tmp.unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)
            self.lock = None

    def __exit__(self, *exc: Any) -> None:
        self._release()


def _default_mode(is_dir: bool) -> int:
    """What a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def replace_dir_atomically(tmp_dir: Path, final: Path, force: bool) -> None:
    """Move a finished temporary directory into place; an existing ``final`` is removed only with ``force``,
    and a file there is never replaced by a directory."""
    check_output(final, force, "dir")
    if final.exists():
        old = final.with_name(f".{final.name}{_PARTIAL}{os.getpid()}-old")
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)
