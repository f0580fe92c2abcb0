"""stdout carries results only; everything else (logs, hints, progress) goes to stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator


class _LazyConsole:
    """A rich Console created on first use: `owlctl allocate --json` never needs to import rich."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console: Any = None

    def get(self) -> Any:
        """The real rich Console (created now if needed): pass this, not the proxy, to rich."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)

    # Dunder methods bypass __getattr__; rich's Live does `with console:`.
    def __enter__(self) -> Any:
        return self.get().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.get().__exit__(*exc)


out = _LazyConsole(soft_wrap=True)  # results
err = _LazyConsole(stderr=True, soft_wrap=True)  # logs, warnings, progress

_quiet = False


def set_quiet(q: bool) -> None:
    global _quiet
    _quiet = q
    _install_log_handler()


def quiet() -> bool:
    return _quiet


def log(msg: str) -> None:
    """A plain message on stderr (no rich markup is interpreted in ``msg``)."""
    if not _quiet:
        err.print(msg, highlight=False, markup=False)


def warn(msg: str) -> None:
    from rich.markup import escape

    err.print(f"[yellow]warning:[/yellow] {escape(msg)}", highlight=False)


def print_json(doc: Any) -> None:
    """Exactly one JSON document on stdout; an owlctl document is first checked against its type."""
    from owlctl.formats.kinds import VERSIONS, parse_schema

    parsed = parse_schema(doc.get("schema")) if isinstance(doc, dict) else None
    if parsed is not None and parsed[0] in VERSIONS:
        from owlctl.formats.documents import validate

        validate(parsed[0], doc, source=f"the {parsed[0]} document")
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


class Progress:
    """Progress reporter handed to ops (see owlctl.progress). On a terminal: a rich bar on stderr. Off a
    terminal (nohup, a batch scheduler, `2> log`): one plain line per step, at most one per ~10 s for tasks
    with many steps, e.g. `prune (wanda) block 7/30  41 s`. Nothing with -q."""

    def __init__(self) -> None:
        # TERM=dumb (Emacs shells, some CI consoles) cannot move the cursor: plain lines there too
        self.interactive = (not _quiet) and err.is_terminal and not err.is_dumb_terminal

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Any]:
        from owlctl.progress import NullTask

        if _quiet:
            yield NullTask()
            return
        if not self.interactive:
            yield _PlainTask(description, total)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RP

        with RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"), console=err.get(), transient=False) as p:
            tid = p.add_task(description, total=total, info="")
            yield _RichTask(p, tid)


class _PlainTask:
    """Plain progress lines for logs: every step of a short task (blocks), every ~10 s of a long one."""

    MANY = 64  # more steps than this: time-based lines
    INTERVAL = 10.0

    def __init__(self, description: str, total: int | None) -> None:
        import time

        self.description, self.total, self.done = description, total, 0
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        import time

        self.done += n
        now = time.monotonic()
        final = self.total is not None and self.done >= self.total
        many = self.total is None or self.total > self.MANY
        if final or not many or now - self.last >= self.INTERVAL:
            self.last = now
            count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
            what = info if info and "/" in info else f"{info} {count}" if info else count
            sys.stderr.write(f"{self.description} {what}  {now - self.t0:.0f} s\n")
            sys.stderr.flush()


class _RichTask:
    def __init__(self, p: Any, tid: Any) -> None:
        self.p, self.tid = p, tid

    def advance(self, n: int = 1, info: str | None = None) -> None:
        if info is None:
            self.p.update(self.tid, advance=n)
        else:
            self.p.update(self.tid, advance=n, info=info)


def _install_log_handler() -> None:
    import logging

    logger = logging.getLogger("owlctl")

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not _quiet:
                log(record.getMessage())

    if not any(getattr(h, "_owlctl_cli", False) for h in logger.handlers):
        h = Handler(logging.INFO)
        h._owlctl_cli = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# errno values that mean "the environment refused the write", not a bug: shown as a message with a hint.
_ENV_ERRNOS = {"ENOSPC": "free some space, or write to another disk with -o",
               "EDQUOT": "the disk quota is exhausted; free some space, or choose another -o",
               "EROFS": "the file system is read-only; choose a writable -o",
               "EACCES": "you may not write there; choose another -o, or fix the permissions",
               "EPERM": "you may not write there; choose another -o, or fix the permissions",
               "ENOTDIR": "a part of the path is a file, not a directory; choose another -o"}


def _error(message: str, hint: str | None) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    if hint:
        err.print(f"[dim]hint:[/dim] {escape(hint)}", highlight=False)


def _interrupted(what: str) -> None:
    from owlctl.formats.claims import finished_outputs

    done = finished_outputs()
    kept = f"; finished before that and kept: {', '.join(done)}" if done else ""
    err.print(f"[red]{what}[/red]: no partial output was left behind{kept}", highlight=False)


@contextmanager
def _owlctl_warnings_to_stderr() -> Iterator[None]:
    """Show the ops layer's OwlctlWarnings as `warning: ...` lines (every time, not once per place)."""
    import warnings

    from owlctl.errors import OwlctlWarning

    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if issubclass(category, OwlctlWarning):
                if not _quiet_rank():
                    warn(str(message))
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.simplefilter("always", OwlctlWarning)
        warnings.showwarning = show
        yield


def _quiet_rank() -> bool:
    """A launched process other than rank 0 (torchrun, accelerate launch): it leaves the messages to rank 0."""
    from owlctl.engine.distributed import secondary

    return secondary()


def handle_errors(fn):
    """Decorator for command bodies: known failures -> message + hint on stderr, exit 1; Ctrl-C -> 130;
    SIGTERM (timeout, Slurm, docker, Kubernetes) is handled like Ctrl-C -> 143. Temporary outputs are
    removed by the context managers that made them before the message is printed.

    Unknown exceptions are bugs and keep their traceback. OWLCTL_DEBUG=1 shows tracebacks always.
    """
    import errno
    import functools
    import os
    import signal

    import typer

    from owlctl.errors import OwlctlError, Terminated

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:  # not the main thread
            previous = None
        try:
            with _owlctl_warnings_to_stderr():
                return fn(*args, **kwargs)
        except OwlctlError as e:
            if os.environ.get("OWLCTL_DEBUG") == "1":
                raise
            if getattr(e, "owlctl_rank", None) is not None:  # one process of several failed on its own
                _error(f"process rank {e.owlctl_rank}: {e.message}", e.hint)
            elif not _quiet_rank():  # the other processes of a launched run: rank 0 reports
                _error(e.message, e.hint)
            raise typer.Exit(1) from None
        except OSError as e:
            name = errno.errorcode.get(e.errno or -1, "")
            if name not in _ENV_ERRNOS or os.environ.get("OWLCTL_DEBUG") == "1":
                raise
            where = f": {e.filename}" if e.filename else ""
            _error(f"{e.strerror or e}{where}; nothing was written", _ENV_ERRNOS[name])
            raise typer.Exit(1) from None
        except Terminated:
            if not _quiet_rank():
                _interrupted("terminated (SIGTERM)")
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            if not _quiet_rank():
                _interrupted("interrupted")
            raise typer.Exit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper
